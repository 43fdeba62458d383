"""`instascene run DATASET --out RUN`: stream a dataset folder through the pipeline (no ROS).

Writes the run folder: config.json (resolved), run.log, metrics.json, renders/ (held-out
renders beside ground truth), scene.ply (3DGS layout), instance_masks/<stem>.png and
instances/<id>.ply, map.instascene (the saved map) and overlays.png; with --complete also
completed/<id>.ply (watertight, world frame), completed/<id>.json and pictures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import time

from instascene_ros.commands.publish_dataset import parse_millimetres_degrees

log = logging.getLogger("instascene.run")
# Pipeline timings that belong to the instance decomposition (tracker + feature field), as
# opposed to mapping: the issue budgets the decomposition on its own.
DECOMPOSITION_STAGES = ("trace", "retrace", "tracker", "features", "instances")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="map a dataset folder offline and write a run folder with metrics and pictures",
        description="Stream a dataset folder (transforms.json, see README) frame by frame through the online "
                    "pipeline: mapping, spatial Gaussian tracker, instance feature field, instances. Held-out "
                    "frames (split: test, else every 8th) are never fitted; they are rendered and scored.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("dataset", type=pathlib.Path, help="dataset folder with transforms.json")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="run folder to write")
    parser.add_argument("--preset", default="cpu", choices=["cpu", "paper"], help="mapper budgets")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: numba kernels; cuda: gsplat")
    parser.add_argument("--primitive", default="3dgs", choices=["3dgs", "2dgs"],
                        help="3D Gaussians, or 2D Gaussian surfels (2DGS: median depth and normals; metrics.json "
                             "then also scores the median depth)")
    parser.add_argument("--no-depth", action="store_true", help="ignore depth (RGB-only mapping)")
    parser.add_argument("--no-masks", action="store_true", help="ignore 2D masks (no instances)")
    parser.add_argument("--instance-field", default="instascene", choices=["instascene", "codebook", "classifier"],
                        help="decomposition: InstaScene's contrastive field (default), Unified-Lift's codebook, "
                             "or the Gaussian Grouping identity-classifier baseline on video-associated ids")
    parser.add_argument("--mask-every", type=int, default=1,
                        help="use the 2D mask of every n-th training frame only (a real segmenter runs at ~1 Hz)")
    parser.add_argument("--finish-seconds", type=float, default=None, help="time cap of the final refinement")
    parser.add_argument("--finish-feature-steps", type=int, default=None,
                        help="feature-field steps at the end of the stream (default: the pipeline's 300)")
    parser.add_argument("--pose-noise", type=parse_millimetres_degrees, default=(0.0, 0.0), metavar="MM,DEG",
                        help="perturb each training frame's pose (random translation in mm, rotation in degrees, "
                             "seeded): robot kinematics as the mapper sees them; test frames keep their true poses")
    parser.add_argument("--no-pose-refinement", action="store_true",
                        help="map at the given poses (no depth ICP of keyframes against the map)")
    parser.add_argument("--photometric-poses", type=parse_millimetres_degrees, default=None, metavar="MM,DEG",
                        help="photometric pose refinement: every mapping iteration also steps the trained "
                             "keyframe's pose (Adam, at most about this many mm and degrees a step) down the "
                             "mapping loss, once ICP has corrected half of the keyframes; 0,0 turns it off "
                             "(default: PoseRefinementConfig's 0.2,0.03)")
    parser.add_argument("--max-frames", type=int, default=0, help="stop after this many training frames (0 = all)")
    parser.add_argument("--threads", type=int, default=2, help="numba threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--complete", action="store_true",
                        help="complete every instance at the end: completed/<id>.ply (watertight, world frame; <id> as "
                             "in instance_masks/), completed/<id>.json (pose, flags, views) and completed/<id>.png")
    parser.add_argument("--generator", default="geometric", choices=["geometric", "diffusion"],
                        help="completion generator (diffusion needs --model-path)")
    parser.add_argument("--model-path", default="", help="diffusion generator: local model folder")
    parser.set_defaults(run=run)


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return str(value)
    return value


def complete_instances(pipeline, folder: pathlib.Path, generator: str, model_path: str = "",
                       progress: bool = True) -> dict:
    """Complete every instance of the pipeline's map into `folder`; returns per-instance facts."""
    import numpy as np
    from tqdm.auto import tqdm

    from instascene_ros.core.complete.pictures import completion_sheet, save_png
    from instascene_ros.core.complete.views import views_contact_sheet

    folder.mkdir(parents=True, exist_ok=True)
    pipeline.config.completion.diffusion.model_path = model_path
    summary = {}
    for info in tqdm(pipeline.snapshot.instances, desc="completing", unit="object", disable=not progress):
        outcome = pipeline.complete(int(info.id), generator=generator)
        if not outcome.success:
            log.warning("instance %d not completed: %s", info.id, outcome.message)
            summary[int(info.id)] = {"success": False, "message": outcome.message}
            continue
        completed = outcome.result.completed
        completed.mesh_world().export(folder / f"{info.id}.ply")
        sheet, labels = completion_sheet(completed)
        save_png(sheet, folder / f"{info.id}.png")
        renders = completed.info.get("view_renders")
        record = {"success": True, "message": outcome.message, "pose_T_world_object": completed.T_world_object.tolist(),
                  "bbox_size": completed.bbox_size.tolist(), "confidence": completed.confidence,
                  "generated_vertex_share": float(np.mean(completed.vertex_generated)),
                  "views": [{"index": v.index, "known": v.known, "agreement": round(v.agreement, 3),
                             "angle_to_observation_deg": round(v.observed_angle_deg, 1)} for v in completed.views],
                  "timings_s": completed.timings,
                  "info": {k: v for k, v in completed.info.items() if isinstance(v, (int, float, str, bool))}}
        if renders is not None:
            generated = completed.generated
            by_index = {} if generated is None else {i: generated.rgb[k] for k, i in enumerate(generated.indices)}
            save_png(views_contact_sheet(completed.views, renders["object_rgb"], generated=by_index),
                     folder / f"{info.id}_views.png")
        (folder / f"{info.id}.json").write_text(json.dumps(_jsonable(record), indent=2))
        summary[int(info.id)] = {k: record[k] for k in ("success", "confidence", "generated_vertex_share")} | \
            {"seconds": completed.timings.get("total_s")}
    ok = [s for s in summary.values() if s["success"]]
    log.info("completed %d of %d instances into %s", len(ok), len(summary), folder)
    return summary


def run(args) -> int:
    import numba
    import numpy as np
    from tqdm.auto import tqdm

    from instascene_ros.core.evaluation import evaluate_run
    from instascene_ros.core.io import DatasetError, load_dataset
    from instascene_ros.core.features import instance_field_config
    from instascene_ros.core.pipeline import Pipeline, PipelineConfig

    if args.device == "cuda":
        from instascene_ros.core.splat.gsplat_backend import cuda_unavailable_reason

        reason = cuda_unavailable_reason()
        if reason is not None:
            print(f"instascene run: device 'cuda': {reason}")
            return 2
    try:
        dataset = load_dataset(args.dataset)
    except DatasetError as error:
        print(f"instascene run: {error}")
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "run.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    numba.set_num_threads(max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS)))

    config = PipelineConfig.from_preset(args.preset, args.device)
    config.features = instance_field_config(args.instance_field, config.features)
    config.set_primitive(args.primitive)
    config.mapper.pose_refinement.enabled = not args.no_pose_refinement
    if args.photometric_poses is not None:
        refinement = config.mapper.pose_refinement
        refinement.photometric_step_m, refinement.photometric_step_deg = args.photometric_poses[0] / 1000.0, \
            args.photometric_poses[1]
    if args.finish_feature_steps is not None:
        config.cadence.finish_feature_steps = args.finish_feature_steps
    pipeline = Pipeline(config, progress_bar=not args.no_progress)
    log.info("CPU kernels ready in %.1f s (numba compiles once, then loads from its cache)", pipeline.warm_up())
    (out / "config.json").write_text(json.dumps({"dataset": str(args.dataset), "preset": args.preset,
                                                 "device": args.device, "no_depth": args.no_depth,
                                                 "no_masks": args.no_masks, "mask_every": args.mask_every,
                                                 "pose_noise_mm_deg": list(args.pose_noise),
                                                 "pipeline": _jsonable(config)}, indent=2, default=str))
    train = [frame for frame in dataset.frames if frame.meta.get("split") != "test"]
    if args.max_frames:
        train = train[: args.max_frames]
    if any(args.pose_noise):
        from instascene_ros.core.pose_refinement import perturb_pose
        rng = np.random.default_rng(0)
        for frame in train:
            frame.camera = dataclasses.replace(frame.camera, T_world_cam=perturb_pose(
                frame.camera.T_world_cam, rng, args.pose_noise[0] / 1000.0, args.pose_noise[1]))
    start = time.perf_counter()
    rejected, keyframes, keyframe_seconds = 0, 0, []
    stage_s: dict[str, float] = {}  # seconds per pipeline stage, streaming and finish together
    for index, frame in enumerate(tqdm(train, desc="mapping", unit="frame", disable=args.no_progress)):
        # Copies, not edits: evaluation still reads the dataset's training depth (which pixels of
        # a held-out view some training view saw).
        if args.no_depth:
            frame = dataclasses.replace(frame, depth=None)
        if args.no_masks or index % max(1, args.mask_every):
            frame = dataclasses.replace(frame, mask=None)
        tic = time.perf_counter()
        report = pipeline.add_frame(frame)
        for stage, seconds in report.timings.items():
            stage_s[stage] = stage_s.get(stage, 0.0) + seconds
        if not report.accepted:
            rejected += 1
        elif report.keyframe:
            keyframes += 1
            keyframe_seconds.append(time.perf_counter() - tic)
    stream_s = time.perf_counter() - start
    log.info("streamed %d frames (%d keyframes, %d rejected) in %.1f s", len(train), keyframes, rejected, stream_s)
    finish = pipeline.finish(time_budget_s=args.finish_seconds)
    wall_s = time.perf_counter() - start
    for stage in DECOMPOSITION_STAGES:
        stage_s[stage] = stage_s.get(stage, 0.0) + finish.get(stage, 0.0)
    stage_s["mapping"] = stage_s.get("mapping", 0.0) + finish.get("seconds", 0.0)
    pipeline.save(str(out / "map.instascene"))
    pipeline.mapper.scene.save_ply(out / "scene.ply")

    metrics = evaluate_run(pipeline, dataset, out, progress=not args.no_progress)
    metrics.update({"n_gaussians": int(pipeline.mapper.scene.n), "wall_s": round(wall_s, 2),
                    "stream_s": round(stream_s, 2), "keyframes": keyframes, "rejected_frames": rejected,
                    "keyframe_s_median": float(np.median(keyframe_seconds)) if keyframe_seconds else None,
                    "keyframe_s_max": float(np.max(keyframe_seconds)) if keyframe_seconds else None,
                    "finish": {k: v for k, v in finish.items() if isinstance(v, (int, float))},
                    "stage_s": {k: round(v, 2) for k, v in stage_s.items()},
                    # The decomposition's own share of the wall time (it runs beside the mapper).
                    "decomposition_s": round(sum(stage_s.get(k, 0.0) for k in DECOMPOSITION_STAGES), 2),
                    "preset": args.preset, "primitive": args.primitive, "rgb_only": bool(args.no_depth),
                    "pose_noise_mm_deg": list(args.pose_noise),
                    "keyframe_poses": dict(pipeline.mapper.pose_stats)})
    if args.complete:
        metrics["completion"] = complete_instances(pipeline, out / "completed", args.generator, args.model_path,
                                                   progress=not args.no_progress)
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2))
    summary = ", ".join(f"{key} {metrics[key]:.3f}" for key in ("psnr", "psnr_object", "ssim", "depth_error_mm",
                                                                 "miou", "biou", "pq_scene")
                        if isinstance(metrics.get(key), float))
    print(f"run folder: {out.resolve()}\n  {summary}\n  {metrics['n_gaussians']} Gaussians, "
          f"{len(pipeline.snapshot.instances)} instances, {wall_s:.0f} s")
    return 0
