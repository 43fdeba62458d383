"""`instascene bench segment`: instance decomposition on noisy masks, over report seeds.

Protocol (per seed; report seeds 11-15 are disjoint from the development seed 0):

1. Scene: `instascene make-scene` (hemisphere trajectory, simulated segmenter noise
   `--mask-noise`, default 1 = typical: per-view ids, splits, merges of touching objects, missed
   and ragged masks).
2. Product row: `instascene run SCENE --out RUN` as a robot would run it (mapping, tracker and
   feature field interleaved online, then the final refinement). Scored by the run itself
   (core/evaluation.py): mIoU and boundary IoU with ONE predicted id per object for all held-out
   views, chosen from training views only; PQ^scene; instance clouds against the ground-truth
   meshes (precision within 5 mm, contamination); identical touching pairs kept apart (each
   object its own id, matched at IoU >= 0.5). `decomposition_s` is the time the run spent in
   the decomposition's stages (tracing, tracker, feature field, extraction), `wall_s` the
   whole run's, mapping included (the decomposition runs beside the mapper). Beside it, the
   map's geometry bound: the training views' ground-truth masks lifted onto the Gaussians by
   blend-weight vote, rendered back through the map and scored the same way: what a perfect
   decomposition of this map would score. The gap between the two is segmentation's;
   what the bound misses is the map's.
3. Ablation on the same map: RUN/map.instascene is loaded, and for every variant the tracker
   re-traces every keyframe on the final map and is solved with the variant's tracker config,
   then a fresh feature field is trained `--ablation-steps` steps on the run's keyframes, masks
   and those priors, extracted and scored the same way. The geometry is identical for all
   variants, so differences are the decomposition's. Variants, each the product's defaults with
   one part changed: InstaScene's ablation (noisy 2D masks only; 3D priors only; 3D priors + 2D
   masks; + cross-view = full); our eleven additions switched off one at a time (pixels near a
   change of mask id sampled by the field; no background cluster; the tracker tracing up to the
   contact between two masks; no mutual-containment links, so only third frames vote; no
   residual masks, the parts of under-segmented masks that no prior claims; no merge of an object
   cut into two clusters; no split of a cluster holding two objects that frames see apart over a
   run of views; no split of the members that lend a prior nothing; no second-mask
   cover rule in the under-segmentation filter, which counts a frame where a mask holds half of
   a second mask's own tracker as a split; no keeping a cluster whose masks together make a
   prior when the member filter leaves it none; a Gaussian left in every prior whose vote it
   passes, not only the one whose masks hold it most often) and all together ("InstaScene as published"); the
   under-segmentation filter's frame ratio lowered from the published 30% to 15%; the field's
   labels corrected where one prior's Gaussians dominate a pixel (an option, off by default); the Unified-Lift
   object codebook (instances read from its slots, no clustering); and the fair
   baseline: Gaussian Grouping's identity classifier trained on the masks made consistent by
   the video associator (mask IoU propagated between consecutive keyframes, warped by depth),
   not by our tracker; GradiSeg's LA-KNN regulariser and identity-gradient-guided densification
   (IGD, threshold percentile swept over 90 / 95 / 99) on our field, started half-way through
   the variant's steps as GradiSeg starts them half-way through its schedule. Label-reading options draw their masks by reading each rendered pixel
   the way they read Gaussians. The
   rendering PSNR cannot change between variants: the field's loss never reaches the
   geometry (its gradient stops at the rendered features; test_features checks it), except in
   the IGD rows, which split Gaussians.

`--reuse --rescore --instance-option NAME=VALUE`: the saved maps' instances extracted with that
InstanceConfig field set (typed as the field, `none` for an optional one; the JSON's "command"
records it), e.g. `island_gap=none` to score the maps without a rule.

Means and sample standard deviations over seeds. JSON: {"summary": {miou, biou, pq_scene,
cloud_precision, decomposition_s, wall_s (+ _std), identical_separated}, "scenes": [...], "ablation": {variant: {mean,
std and per-seed values}}, "ablation_steps": N}.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import sys
import time
from typing import Optional

import numpy as np

from instascene_ros.commands.bench import _fmt

METRICS = ("miou", "biou", "pq_scene", "cloud_precision")
QUERY_SIZE = 256  # segment_at_pixel is budgeted at 256 x 256


def add_parser(benches) -> None:
    sub = benches.add_parser("segment", help="instance decomposition on noisy masks over report seeds",
                             description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    sub.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
    sub.add_argument("--seeds", default="11,12,13,14,15", help="comma-separated report seeds")
    sub.add_argument("--res", type=int, default=256, help="image size")
    sub.add_argument("--views", type=int, default=60, help="training views")
    sub.add_argument("--mask-noise", type=int, default=1, help="simulated segmenter noise (0 clean, 1 typical, 2 poor)")
    sub.add_argument("--work", type=pathlib.Path, default=pathlib.Path("runs/bench"), help="scenes and run folders")
    sub.add_argument("--finish-seconds", type=float, default=None, help="cap of the final refinement per run")
    sub.add_argument("--ablation-steps", type=int, default=300,
                     help="feature-field steps of every ablation variant on the saved map (0: no ablation)")
    sub.add_argument("--variants", default="",
                     help="comma-separated subset of the ablation variants (default: all; see the table)")
    sub.add_argument("--reuse", action="store_true", help="reuse run folders that already hold map.instascene, and the ablation rows already in --json (resume)")
    sub.add_argument("--rescore", action="store_true",
                     help="with --reuse: score the saved product maps again with this code (map, tracker and field "
                          "as saved; instances, masks, the id choice and the clouds recomputed) instead of reading "
                          "the runs' metrics.json: for changes to how a finished map is read")
    sub.add_argument("--instance-option", action="append", default=[], metavar="NAME=VALUE",
                     help="with --reuse --rescore: set an InstanceConfig field for the extraction of every saved "
                          "map (repeatable; none for an optional one), e.g. island_gap=none")
    sub.add_argument("--threads", type=int, default=2, help="torch threads of the ablation")
    sub.set_defaults(run=run_segment)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One ablation row: the feature field's config and the tracker's, and which 2D masks.

    mask_keyframes: 0 = the run's masks on every keyframe; k = masks on only k keyframes evenly
    spread over the run (a segmenter at ~1 Hz behind a faster camera; mapping still sees every
    frame). clean_masks: the same scene's masks at noise level 0 (clean shapes, ids still
    renumbered per view) in place of the run's noisy ones, on the same map."""

    features: object
    tracker: object
    mask_keyframes: int = 0
    clean_masks: bool = False


IGD_PERCENTILES = (90.0, 95.0, 99.0)  # the IGD threshold sweep (GradiSeg leaves it open)


def ablation_variants(features, tracker, steps: int = 300) -> dict:
    """name -> Variant. Every row is the product's defaults (`features`, `tracker`, the `cpu`
    preset) with only the named part changed. `steps`: the ablation's field steps, which the
    GradiSeg rows' schedule is scaled to."""
    def field(**changes) -> Variant:
        return Variant(dataclasses.replace(features, **changes), tracker)

    def field_gradiseg(**changes) -> Variant:
        # GradiSeg starts LA-KNN half-way through its 30k schedule (15k; the paper also says
        # 12k) and IGD once 3DGS densification ends (15k): half of this row's steps, then an
        # IGD pass every sixth of them (GradiSeg gives no interval).
        schedule = dict(start_step=steps // 2, igd_start_step=steps // 2, igd_interval=max(steps // 6, 1))
        return field(gradiseg=dataclasses.replace(features.gradiseg, **schedule, **changes))

    def field_codebook(**changes) -> Variant:
        return Variant(dataclasses.replace(features, codebook=dataclasses.replace(features.codebook, **changes)),
                       tracker)

    return {
        # InstaScene's ablation (its Table 4 rows), everything else as in the product.
        "noisy 2D masks only": field(lambda_cross=0.0, lambda_3d=0.0),
        "3D priors only": field(lambda_intra=0.0, lambda_cross=0.0),
        "3D priors + 2D masks": field(lambda_cross=0.0),
        "full (+ cross-view)": field(),
        # Our additions, each switched off alone.
        "full with every mask pixel sampled": field(mask_border_px=0.0),
        "full without background cluster": field(background_cluster=False),
        "full with background sampled by the border rule": field(background_by_margin=False),
        "full + labels corrected by the priors": field(prior_label_weight=0.5),
        "full + intra-view without under-segmented masks": field(intra_skips_undersegmented=True),
        "full with tracker tracing every mask pixel": Variant(features, dataclasses.replace(tracker, mask_border_px=0.0)),
        "full without mutual-containment links": Variant(
            features, dataclasses.replace(tracker, mutual_containment_link=False)),
        "full without residual masks": Variant(features, dataclasses.replace(tracker, residual_passes=0)),
        "full without split-object merge": Variant(features, dataclasses.replace(tracker, split_merge_consensus=None)),
        # The inverse of that merge by the same vote: a cluster holding two objects the segmenter
        # fused over a run of views and kept apart over another (seed 13's domino and cup).
        "full without separating objects seen apart": Variant(
            features, dataclasses.replace(tracker, separate_seen_apart=False)),
        "full without orphan split": Variant(features, dataclasses.replace(tracker, orphan_share=0.0)),
        # The share rule cannot see a small object merged into a big one (seed 13's cube and a
        # jenga, the live bench's cup under a mug): the filter also counts a frame where the mask
        # holds half of a second mask's own tracker. This row takes that rule out.
        "full without the second-mask cover rule": Variant(
            features, dataclasses.replace(tracker, undersegment_cover=0.0)),
        "full without the member filter's object rule": Variant(
            features, dataclasses.replace(tracker, member_filter_keeps_objects=False)),
        "full with overlapping priors": Variant(features, dataclasses.replace(tracker, disjoint_priors=False)),
        # All eleven off: InstaScene as published on these masks.
        "InstaScene as published": Variant(dataclasses.replace(features, mask_border_px=0.0, background_cluster=False),
                                           dataclasses.replace(tracker, mask_border_px=0.0,
                                                               mutual_containment_link=False, residual_passes=0,
                                                               split_merge_consensus=None, separate_seen_apart=False,
                                                               orphan_share=0.0,
                                                               undersegment_cover=0.0,
                                                               member_filter_keeps_objects=False,
                                                               disjoint_priors=False)),
        # InstaScene's (and MaskClustering's) under-segmentation filter drops a mask split by
        # other frames' masks in >= 30% of the frames that judge it. A pair merged by the
        # segmenter in a long run of views escapes it when its partner is hidden or merged
        # elsewhere in those frames (dev seed 1: merged masks split in 5-8 of 27-33 frames).
        "full with under-segmentation filter at 15% of frames": Variant(
            features, dataclasses.replace(tracker, undersegment_frame_ratio=0.15)),
        # Input: fewer masks (the robot case), clean masks (does the lifting lose information?).
        "full with masks on 6 keyframes": Variant(features, tracker, mask_keyframes=6),
        "full with masks on 16 keyframes": Variant(features, tracker, mask_keyframes=16),
        "full on clean masks (noise 0)": Variant(features, tracker, clean_masks=True),
        # Unified-Lift's and Gaussian Grouping's learning rates are set for ~30k iterations; in
        # the few hundred steps of this budget they barely move (classifier, 300 steps at the
        # published 5e-4 / 2.5e-3: cross-entropy 5.2 -> 4.1 of ln 256 = 5.5, no Gaussian above
        # the 0.5 read probability). Both therefore train 10x faster here, i.e. their features
        # at our field's 2.5e-2: the same budget and feature rate for every variant.
        "Unified-Lift object codebook (lr x10)": field_codebook(
            enabled=True, lr=10 * features.codebook.lr, feature_lr=10 * features.codebook.feature_lr),
        "identity classifier on video-associated ids (baseline) lr x10": field(
            objective="classifier", classifier=dataclasses.replace(
                features.classifier, lr=10 * features.classifier.lr, feature_lr=10 * features.classifier.feature_lr)),
        # GradiSeg's boundary refinements on our field (softmax over the instance prototypes in
        # place of its classifier). IGD splits Gaussians, so these rows change the geometry too.
        "full + GradiSeg LA-KNN": field_gradiseg(laknn=True),
        **{f"full + GradiSeg IGD p{percentile:g}": field_gradiseg(igd=True, igd_percentile=percentile)
           for percentile in IGD_PERCENTILES},
        "full + GradiSeg LA-KNN + IGD p95": field_gradiseg(laknn=True, igd=True, igd_percentile=95.0),
    }


def _variant_masks(variant: Variant, pipeline, args, seed: int):
    """The masks a variant trains on ({keyframe index: mask}), or None for the run's own."""
    if variant.clean_masks:
        from instascene_ros.commands.bench import _scene
        from instascene_ros.core.io.dataset import load_dataset

        # Same seed, same renders and poses; only the simulated segmenter differs.
        clean = load_dataset(_scene(args.work, seed, args.res, args.views, noise=0))
        by_name = {frame.name: frame.mask for frame in clean.frames}
        masks = {}
        for keyframe in pipeline.mapper.keyframes:
            if keyframe.index in pipeline.masks:
                if by_name.get(keyframe.name) is None:
                    raise SystemExit(f"clean scene has no mask for keyframe {keyframe.name}")
                masks[keyframe.index] = by_name[keyframe.name]
        return masks
    if variant.mask_keyframes:
        indices = sorted(pipeline.masks)
        chosen = np.unique(np.round(np.linspace(0, len(indices) - 1, min(variant.mask_keyframes, len(indices)))))
        return {indices[int(i)]: pipeline.masks[indices[int(i)]] for i in chosen}
    return None


def _load_map(run_dir: pathlib.Path, instances: Optional[dict] = None):
    """The run's saved map in a `cpu`-preset Pipeline, its instances extracted with the
    InstanceConfig fields `instances` set (`instance_overrides`)."""
    from instascene_ros.core.pipeline import Pipeline, PipelineConfig

    config = PipelineConfig.from_preset("cpu")
    config.instances = dataclasses.replace(config.instances, **(instances or {}))
    pipeline = Pipeline(config)
    pipeline.load(str(run_dir / "map.instascene"))
    return pipeline


def _pixel_query_ms(pipeline, dataset, size: int) -> tuple[float, float]:
    """Uncached pixel query on a saved map from the first held-out view, rendered at
    size x size (the issue's 256 px budget, whatever resolution the bench maps at): milliseconds
    for the id only and for the id with its mask."""
    from instascene_ros.core.evaluation import time_pixel_query

    test = [frame for frame in dataset.frames if frame.meta.get("split") == "test"] or dataset.frames
    camera = test[0].camera.scaled(size / test[0].camera.width)
    return time_pixel_query(pipeline, camera, return_mask=False), time_pixel_query(pipeline, camera, return_mask=True)


def identical_pairs_separated(scene: pathlib.Path, scores: dict) -> tuple[int, int]:
    """(separated, total) over the scene's identical touching pairs: a pair is separated when
    each object has its own predicted id and is matched at IoU >= 0.5 (the PQ match rule)."""
    pairs = json.loads((scene / "scene.json").read_text()).get("identical_touching_pairs", [])
    mapping, ious = scores.get("id_mapping") or {}, scores.get("per_object_iou") or {}
    separated = 0
    for a, b in pairs:
        first, second = mapping.get(str(a)), mapping.get(str(b))
        if first and second and first != second and min(ious.get(str(a), 0.0), ious.get(str(b), 0.0)) >= 0.5:
            separated += 1
    return separated, len(pairs)


def _share_separated(rows: list) -> object:
    """Identical touching pairs separated over all rows' scenes (None: no such pair)."""
    total = sum(row.get("identical_pairs") or 0 for row in rows)
    return sum(row.get("identical_separated") or 0 for row in rows) / total if total else None


def _stats(values: list) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _write(args, scenes: list, ablation: dict) -> tuple[dict, object]:
    """Summaries of the rows so far (in place), written to --json; returns (summary, full row)."""
    summary = {}
    for key in (*METRICS, "wall_s", "decomposition_s", "segment_at_pixel_ms", "segment_at_pixel_mask_ms",
                "miou_geometry_bound", "biou_geometry_bound"):
        summary[key], summary[f"{key}_std"] = _stats([s.get(key) for s in scenes])
    summary["identical_separated"] = _share_separated(scenes)
    for entry in ablation.values():
        for key in METRICS:
            entry[key], entry[f"{key}_std"] = _stats([row[key] for row in entry["seeds"]])
        entry["identical_separated"] = _share_separated(entry["seeds"])
    full = ablation.get("full (+ cross-view)")
    if full is not None:
        # Seeds differ far more from each other than variants on one seed: compare per seed.
        by_seed = {row["seed"]: row["miou"] for row in full["seeds"]}
        for entry in ablation.values():
            entry["full_minus_this_miou"], entry["full_minus_this_miou_std"] = _stats(
                [by_seed[row["seed"]] - row["miou"] for row in entry["seeds"]
                 if by_seed.get(row["seed"]) is not None and row["miou"] is not None])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.json.with_suffix(".tmp")
        temporary.write_text(json.dumps({"summary": summary, "scenes": scenes, "ablation": ablation,
                                         "ablation_steps": args.ablation_steps, "res": args.res,
                                         "views": args.views, "mask_noise": args.mask_noise,
                                         "command": " ".join(sys.argv)}, indent=2))
        temporary.replace(args.json)
    return summary, full


def run_segment(args) -> int:
    import torch

    from instascene_ros.commands.bench import _run, _scene, instance_overrides
    from instascene_ros.core.evaluation import geometry_bound, retrain_field_and_score, score_decomposition
    from instascene_ros.core.io.dataset import load_dataset
    from instascene_ros.core.pipeline import PipelineConfig

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    defaults = PipelineConfig.from_preset("cpu")
    variants = ablation_variants(defaults.features, defaults.tracker, args.ablation_steps)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()] or list(variants)
    unknown = [name for name in chosen if name not in variants]
    if unknown:  # before hours of mapping, not after
        raise SystemExit(f"unknown variant(s) {unknown}; choose among: {'; '.join(variants)}")
    if args.rescore and not args.reuse:
        raise SystemExit("--rescore scores saved product maps again: add --reuse (and the --work that holds them)")
    if args.instance_option and not args.rescore:
        raise SystemExit("--instance-option extracts the saved maps' instances again: add --reuse --rescore")
    instances = instance_overrides(args.instance_option)  # a typo stops the bench before any work
    scenes, ablation, skip_ablation = [], {}, args.ablation_steps <= 0
    if args.reuse and args.json and args.json.exists():
        # Keep the rows of an earlier run of the same maps that this run does not recompute.
        previous = json.loads(args.json.read_text())
        ablation = {name: {"seeds": [row for row in entry["seeds"] if row["seed"] in seeds]}
                    for name, entry in previous.get("ablation", {}).items()}
        if args.ablation_steps <= 0:  # only re-printing: the kept rows' step count
            args.ablation_steps = previous.get("ablation_steps", 0)
            args.variants, skip_ablation = "", True
    for seed in seeds:  # every product run first: the ablation below needs their maps
        scene = _scene(args.work, seed, args.res, args.views, noise=args.mask_noise)
        run_dir = args.work / f"segment-s{seed}-r{args.res}-v{args.views}-n{args.mask_noise}"
        reused = args.reuse and (run_dir / "map.instascene").exists() and (run_dir / "metrics.json").exists()
        metrics = json.loads((run_dir / "metrics.json").read_text()) if reused else _run(
            scene, run_dir, [], args.finish_seconds)
        # One load of the saved map for all; the query is timed first, on the untouched map.
        saved, dataset = _load_map(run_dir, instances if reused else None), load_dataset(scene)
        query_ms, query_mask_ms = _pixel_query_ms(saved, dataset, QUERY_SIZE)
        if reused and args.rescore:
            metrics = {**metrics, **score_decomposition(saved, dataset)}
        separated, pairs = identical_pairs_separated(scene, metrics)
        bound = geometry_bound(saved, dataset)  # what a perfect decomposition of this map scores
        scenes.append({"seed": seed, "run": str(run_dir), "scene": str(scene), **{k: metrics.get(k) for k in (
            *METRICS, "cloud_contamination", "n_instances", "wall_s", "decomposition_s", "psnr")},
            "identical_separated": separated, "identical_pairs": pairs, "segment_at_pixel_ms": query_ms,
            "segment_at_pixel_mask_ms": query_mask_ms, "miou_geometry_bound": bound.get("miou"),
            "biou_geometry_bound": bound.get("biou"), "per_object_iou": metrics.get("per_object_iou"),
            "per_object_iou_geometry_bound": bound.get("per_object_iou"), "rescored": bool(reused and args.rescore)})
        print(f"[bench segment] seed {seed}: product run mIoU {_fmt(metrics.get('miou'), 1)} (geometry bound "
              f"{_fmt(bound.get('miou'), 1)}), {_fmt(metrics.get('wall_s'), 0)} s, segment_at_pixel at {QUERY_SIZE} "
              f"px {query_ms:.0f} ms ({query_mask_ms:.0f} ms with its mask)", flush=True)
        _write(args, scenes, ablation)

    # Variant by variant (each over every seed), saving after every row: an interrupted bench
    # keeps whole rows, and `--reuse` resumes it without recomputing what is saved.
    for name in ([] if skip_ablation else chosen):
        for row_scene in scenes:
            seed = row_scene["seed"]
            rows = ablation.setdefault(name, {"seeds": []})["seeds"]
            if args.reuse and any(r["seed"] == seed for r in rows):
                continue
            pipeline = _load_map(pathlib.Path(row_scene["run"]))
            tic = time.perf_counter()
            variant = variants[name]
            masks = _variant_masks(variant, pipeline, args, seed)
            scene = pathlib.Path(row_scene["scene"])
            scores = retrain_field_and_score(pipeline, load_dataset(scene), variant.features, args.ablation_steps,
                                             tracker=variant.tracker, masks=masks)
            separated, pairs = identical_pairs_separated(scene, scores)
            row = {"seed": seed, **{k: scores.get(k) for k in (*METRICS, "cloud_contamination", "n_instances",
                                                                "train_s", "per_object_iou")},
                   "identical_separated": separated, "identical_pairs": pairs}
            rows[:] = [r for r in rows if r["seed"] != seed] + [row]
            print(f"[bench segment] seed {seed}: {name:<34} mIoU {_fmt(row['miou'], 1):>5}  BIoU "
                  f"{_fmt(row['biou'], 1):>5}  PQ {_fmt(row['pq_scene'])}  ({time.perf_counter() - tic:.0f} s)",
                  flush=True)
            _write(args, scenes, ablation)

    summary, full = _write(args, scenes, ablation)
    print()
    print(f"{'seed':>4} {'mIoU':>6} {'bound':>6} {'BIoU':>6} {'bound':>6} {'PQ':>5} {'cloud prec':>10} "
          f"{'instances':>9} {'wall s':>7} {'decomp s':>8} {'identical pairs apart':>21}")
    for s in scenes:
        print(f"{s['seed']:>4} {_fmt(s['miou'], 1):>6} {_fmt(s.get('miou_geometry_bound'), 1):>6} "
              f"{_fmt(s['biou'], 1):>6} {_fmt(s.get('biou_geometry_bound'), 1):>6} {_fmt(s['pq_scene']):>5} "
              f"{_fmt(s['cloud_precision']):>10} {s['n_instances']!s:>9} {_fmt(s['wall_s'], 0):>7} "
              f"{_fmt(s.get('decomposition_s'), 0):>8} "
              f"{s.get('identical_separated', 0)!s:>19}/{s.get('identical_pairs', 0)!s}")
    print(f"product (online run): {_fmt(summary['miou'], 1)} +- {_fmt(summary['miou_std'], 1)} mIoU, "
          f"{_fmt(summary['biou'], 1)} BIoU, PQ {_fmt(summary['pq_scene'])}, cloud precision "
          f"{_fmt(summary['cloud_precision'])}, identical touching pairs apart {_fmt(summary['identical_separated'])}, "
          f"decomposition {_fmt(summary['decomposition_s'], 0)} s of {_fmt(summary['wall_s'], 0)} s wall, "
          f"segment_at_pixel {_fmt(summary['segment_at_pixel_ms'], 0)} ms at {QUERY_SIZE} px uncached "
          f"({_fmt(summary['segment_at_pixel_mask_ms'], 0)} ms with its mask); geometry bound of these maps "
          f"{_fmt(summary['miou_geometry_bound'], 1)} mIoU, {_fmt(summary['biou_geometry_bound'], 1)} BIoU"
          f"\n  (targets: mIoU >= 85, BIoU >= 80, PQ >= 0.80, precision >= 0.95, pairs apart >= 0.90, "
          f"decomposition <= 300 s, segment_at_pixel <= 50 ms)")
    if ablation:
        print(f"\nablation on the saved maps ({args.ablation_steps} field steps each, mean +- std over seeds)")
        print(f"{'variant':<34} {'mIoU':>13} {'BIoU':>13} {'PQ':>11} {'cloud prec':>10} {'pairs apart':>11}  "
              f"full - this, per seed")
        for name, entry in ablation.items():
            gap = "" if entry is full or entry.get("full_minus_this_miou") is None else \
                f"{entry['full_minus_this_miou']:+.1f} +- {entry['full_minus_this_miou_std']:.1f}"
            print(f"{name:<34} {_fmt(entry['miou'], 1):>6} +- {_fmt(entry['miou_std'], 1):>4} "
                  f"{_fmt(entry['biou'], 1):>6} +- {_fmt(entry['biou_std'], 1):>4} "
                  f"{_fmt(entry['pq_scene']):>5} +- {_fmt(entry['pq_scene_std']):>4} "
                  f"{_fmt(entry['cloud_precision']):>10} {_fmt(entry.get('identical_separated')):>11}  {gap}")
    return 0
