"""`instascene bench live`: the node on a live 10 Hz stream, beside offline `instascene run`.

Protocol (one generated scene, the same data for every row):

1. Scene: `instascene make-scene` (hemisphere trajectory, `--views` dense views so that
   consecutive frames are a few millimetres apart, as a moving camera gives at 10 Hz;
   simulated segmenter noise 1).
2. Offline row: `instascene run SCENE` (every frame, mapping and decomposition, then the final
   refinement), scored on the held-out test ring.
3. Live rows: `instascene_node` (the launch manifest's command, product parameters: queue of 4,
   one numba thread) in its own process; `instascene publish-dataset --rate HZ --loops N`
   streams the training frames (image, camera_info, depth, the segmenter's masks, TF) for
   `--minutes`; the sequence repeats, as a robot circling the table again would. Meanwhile a
   planner stand-in (ros/live_probe.py) calls `~/list_instances` and `~/segment_at_pixel` every
   `--probe-period` seconds over DDS and times every answer, and /diagnostics is recorded (queue,
   drops, keyframes, resident memory). When the stream ends the node idles (refinement up to
   the preset's budget, then the instance layer's settle: every keyframe re-traced on the final
   map and the field's finishing fit, as the offline run's `finish` does) until /diagnostics
   says `map_settled`, for at least 10 s and at most `--settle-seconds`; then `~/save_map`,
   and the saved map is scored exactly like the offline run
   (core/evaluation.evaluate_run). The second live row streams with pose noise (`--pose-noise`,
   a fresh random error per frame on TF), scored against the true test cameras. Optional rows
   `live-unrefined` and `live-pose-noise-unrefined` repeat the live rows with `refine_poses:=false`
   (the ablation of keyframe pose refinement).

Memory is "flat" when the resident memory's linear trend over the second half of the stream
is below `--flat-mb-per-min`. Two trends are given: of every diagnostics sample (`rss_mb`, which
also carries the working set of the step under way: 150-190 MB between its 5th and 95th
percentiles on the live bench) and of the resident
memory right after each of the worker's releases (the same point of every work cycle). While the
map still takes keyframes (see `keyframes_at_half` and `keyframes`) both include its growth:
each stream loop maps a few frames it had not, until nearly every view is a keyframe (the
store is bounded by max_keyframes). A third trend, held memory less the keyframe store at the
same release (`keyframe_store_mb`: images, depth, masks, tracker records), is what grows that is
not the map's keyframes: a leak shows there.
JSON: {"scene", "rows": {name: {...}}, "targets": {...}}.

`--rescore` streams nothing: it scores the rows' saved maps again with the current code (a
change to how a finished map is read: instance extraction, masks, pixel queries) and keeps every
other measurement of each row from `--json`; rescored rows carry `"rescored": true`.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np

from instascene_ros.commands.bench import _fmt

# The "-unrefined" rows are the ablation of keyframe pose refinement (refine_poses:=false).
ROWS = ("offline", "live", "live-unrefined", "live-pose-noise", "live-pose-noise-unrefined")
TARGETS = {"psnr_gap_db": 1.0, "miou_gap": 3.0, "p95_ms": 100.0, "pose_noise_miou_drop": 5.0}


def add_parser(benches) -> None:
    sub = benches.add_parser("live", help="the ROS node on a live stream vs offline run: keep-up, memory, "
                                          "query latency, pose noise",
                             description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    sub.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
    sub.add_argument("--seed", type=int, default=21, help="scene seed (disjoint from the other benches' seeds)")
    sub.add_argument("--res", type=int, default=256, help="image size (the target is 256x256)")
    sub.add_argument("--views", type=int, default=300, help="training views of the trajectory (one loop)")
    sub.add_argument("--rate", type=float, default=10.0, help="stream rate, frames per second")
    sub.add_argument("--minutes", type=float, default=10.0, help="stream length per live row")
    sub.add_argument("--pose-noise", default="5,0.5", help="MM,DEG of the pose-noise row ('' for none)")
    sub.add_argument("--settle-seconds", type=float, default=300.0,
                     help="most seconds the node may idle after the stream (refinement, then the instances' "
                          "settle) before the map is saved and scored; it is saved as soon as the node "
                          "reports map_settled")
    sub.add_argument("--probe-period", type=float, default=0.5, help="seconds between the planner's queries")
    sub.add_argument("--flat-mb-per-min", type=float, default=5.0,
                     help="resident-memory trend over the stream's second half that still counts as flat")
    sub.add_argument("--rows", default="offline,live,live-pose-noise", help=f"which rows to run, of {','.join(ROWS)}")
    sub.add_argument("--work", type=pathlib.Path, default=pathlib.Path("runs/bench_live"), help="scene and run folders")
    sub.add_argument("--node-param", action="append", default=[], metavar="NAME:=VALUE",
                     help="override one of the node's parameters in the live rows (repeatable), e.g. max_keyframes:=64")
    sub.add_argument("--reuse", action="store_true", help="reuse the offline run folder when it holds metrics.json")
    sub.add_argument("--rescore", action="store_true",
                     help="stream nothing: score the saved maps of the chosen rows again with this code (map, "
                          "tracker and field as saved; instances, masks, the id choice and the clouds recomputed) "
                          "and keep every other measurement of each row from --json: for changes to how a "
                          "finished map is read")
    sub.set_defaults(run=run_live)


def _percentile_ms(answers: list, q: float) -> float:
    seconds = [s for _, s, ok in answers if ok]
    return float(np.percentile(seconds, q) * 1000.0) if seconds else float("nan")


def _memory_trend(history: list, start: float, end: float) -> dict:
    """Resident memory over the stream: at its start, at its end, and the linear trend (MB per
    minute) over the second half, where a leak shows and start-up growth does not. Two series:
    every diagnostics sample (`rss_mb`, which swings with the working set of whatever step the
    worker is in) and the resident memory right after each of the worker's memory releases
    (`rss_after_release_mb`: the same point of every work cycle, what the map and the process
    hold). Also the keyframes held when the second half starts (`keyframes` is at the end): the
    map's own growth."""
    inside = [(t, values) for t, values in history if start <= t <= end]
    points = [(t, float(values.get("rss_mb", "nan"))) for t, values in inside]
    points = [(t, mb) for t, mb in points if math.isfinite(mb)]
    if len(points) < 4:
        return {"rss_start_mb": None, "rss_end_mb": None, "rss_trend_mb_per_min": None}
    middle = (start + end) / 2

    def slope(series: list) -> float:
        half = [(t, mb) for t, mb in series if t >= middle]
        return float(np.polyfit([t for t, _ in half], [mb for _, mb in half], 1)[0] * 60.0) if len(half) >= 2 else None

    held, beyond_keyframes, releases = [], [], None
    for t, values in inside:  # one point per release: diagnostics repeat the last one until the next
        count, mb = values.get("memory_releases"), float(values.get("rss_after_release_mb", "nan"))
        if count is not None and count != releases and math.isfinite(mb):
            held.append((t, mb))
            store = float(values.get("keyframe_store_mb", "nan"))  # measured at the same release
            if math.isfinite(store):
                beyond_keyframes.append((t, mb - store))
        releases = count
    second = [values for t, values in inside if t >= middle]
    store_second = [float(values.get("keyframe_store_mb", "nan")) for values in second]
    store_second = [mb for mb in store_second if math.isfinite(mb)]
    return {"rss_start_mb": points[0][1], "rss_end_mb": points[-1][1], "rss_max_mb": max(mb for _, mb in points),
            "rss_trend_mb_per_min": slope(points), "rss_held_trend_mb_per_min": slope(held),
            "rss_held_points": sum(1 for t, _ in held if t >= middle),
            # held memory less the keyframe store: what grows that is not the map's keyframes
            # (nodes older than the keyframe_store_mb diagnostic: None)
            "rss_held_beyond_keyframes_trend_mb_per_min": slope(beyond_keyframes) if beyond_keyframes else None,
            "keyframe_store_second_half_mb": (store_second[-1] - store_second[0]) if store_second else None,
            "keyframes_at_half": float(second[0].get("keyframes", "nan")) if second else None}


def live_row(scene: pathlib.Path, out: pathlib.Path, args, pose_noise: str, refine_poses: bool = True) -> dict:
    """Start the node, stream, probe, settle, save and score. Returns the row."""
    import rclpy

    from instascene_ros.core.evaluation import evaluate_run
    from instascene_ros.core.io.dataset import load_dataset
    from instascene_ros.core.pipeline import Pipeline, PipelineConfig
    from instascene_ros.commands.demo import _wait_for_log
    from instascene_ros.ros.environment import adopt_ros_environment, ros_environment
    from instascene_ros.ros.launcher import load_manifest, node_command, selected_nodes
    from instascene_ros.ros.live_probe import LiveProbe

    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(scene)
    train = [f for f in dataset.frames if f.meta.get("split", "train") == "train"]
    loops = max(1, math.ceil(args.minutes * 60.0 * args.rate / len(train)))
    env = ros_environment(domain_id=int(time.time()) % 100 + 20, log_dir=tempfile.mkdtemp(prefix="instascene-live-"))
    saved_env = adopt_ros_environment(env)
    arguments, nodes = load_manifest()
    arguments["with_segmenter"] = "false"
    spec = next(n for n in selected_nodes(nodes, arguments) if n.name == "instascene_node")
    spec.remappings["mask"] = "/segmenter/mask"  # the dataset's masks stand in for the segmenter's
    node_log = out / "instascene_node.log"
    overrides = ["-p", "diagnostics_rate_hz:=2.0", "-p", f"refine_poses:={str(refine_poses).lower()}"]
    for assignment in args.node_param:
        overrides += ["-p", assignment]
    node = subprocess.Popen(node_command(spec, arguments) + overrides, env=env,
                            stdout=open(node_log, "w"), stderr=subprocess.STDOUT)
    row: dict = {"rate_hz": args.rate, "minutes": args.minutes, "loops": loops, "pose_noise": pose_noise or None,
                 "refine_poses": refine_poses, "node_params": list(args.node_param)}
    rclpy.init()
    probe = LiveProbe()
    publisher = None
    try:
        _wait_for_log(node_log, "ready:", 180, node)
        command = [sys.executable, "-m", "instascene_ros.cli", "publish-dataset", str(scene), "--rate", str(args.rate),
                   "--loops", str(loops)]
        if pose_noise:
            command += ["--pose-noise", pose_noise]
        print(f"[bench live] {out.name}: streaming {len(train)} frames x {loops} loops at {args.rate:g} Hz "
              f"({args.minutes:g} min){', pose noise ' + pose_noise if pose_noise else ''}", flush=True)
        stream_start = time.monotonic()
        publisher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        last_log = [stream_start]

        def streaming() -> bool:
            if time.monotonic() - last_log[0] > 60:
                last_log[0] = time.monotonic()
                print(f"  {(time.monotonic() - stream_start) / 60:4.1f} min: frames in {probe.value('frames_in'):.0f}, "
                      f"keyframes {probe.value('keyframes'):.0f} (made {probe.value('keyframes_made'):.0f}), queue {probe.value('queue_depth'):.0f}, "
                      f"drops {probe.value('drops_total'):.0f}, {probe.value('rss_mb'):.0f} MB, "
                      f"{probe.value('n_instances'):.0f} instances", flush=True)
            return publisher.poll() is None

        u, v = args.res / 2.0, args.res / 2.0
        probe.probe_while(streaming, args.probe_period, u, v)
        stream_end = time.monotonic()
        if publisher.returncode != 0:
            raise RuntimeError(f"publish-dataset failed: {publisher.stderr.read()[-2000:]}")
        # Settle: the node idles with the queue empty (still probed), until it reports its map
        # settled; 10 s at least, so frames still queued at the end are mapped first.
        settle_start = time.monotonic()
        settle_end = settle_start + args.settle_seconds

        def settling() -> bool:
            now = time.monotonic()
            settled = probe.diagnostics.get("map_settled") == "True"
            return now < settle_end and (now < settle_start + min(10.0, args.settle_seconds) or not settled)

        probe.probe_while(settling, args.probe_period, u, v)
        row.update({"settle_s": time.monotonic() - settle_start,
                    "settled": probe.diagnostics.get("map_settled") == "True"})
        saved = probe.save_map(str((out / "map.instascene").resolve()))
        if not saved.success:
            raise RuntimeError(f"save_map failed: {saved.message}")
        last = probe.history[-1][1] if probe.history else {}
        streamed = [values for t, values in probe.history if t <= stream_end]
        at_stream_end = streamed[-1] if streamed else {}
        during = {kind: [a for a in answers if a[0] <= stream_end] for kind, answers in probe.answers.items()}
        row.update({
            "stream_s": stream_end - stream_start,
            "frames_published": len(train) * loops,
            "frames_in": float(last.get("frames_in", "nan")), "frames_mapped": float(last.get("frames_mapped", "nan")),
            "frames_covered": float(last.get("frames_covered", "nan")),
            "keyframes": float(last.get("keyframes", "nan")), "keyframes_made": float(last.get("keyframes_made", "nan")),
            "drops_total": float(last.get("drops_total", "nan")),
            "drops": {k[len("drops/"):]: float(v) for k, v in last.items() if k.startswith("drops/")},
            "queue_size": float(last.get("queue_size", "nan")),
            "queue_max": max((float(values.get("queue_depth", 0)) for _, values in probe.history), default=None),
            "n_gaussians": float(last.get("n_gaussians", "nan")),
            "keyframe_poses_refined": float(last.get("keyframe_poses_refined", "nan")),
            "keyframe_poses_kept": float(last.get("keyframe_poses_kept", "nan")),
            **_memory_trend(probe.history, stream_start, stream_end),
            # the node's stall watchdog over the stream (only with --node-param stall_report_ms:=...)
            **{f"stream_{key}": float(at_stream_end[key]) for key in (
                "stalls", "stall_worst_ms", "stall_total_ms", "stall_cpu_wait_ms", "stall_steal_ms", "gc_worst_ms",
                "memory_trim_worst_ms")
               if key in at_stream_end},
            **{f"{kind}_p95_ms": _percentile_ms(answers, 95) for kind, answers in during.items()},
            **{f"{kind}_p50_ms": _percentile_ms(answers, 50) for kind, answers in during.items()},
            **{f"{kind}_answers": len(answers) for kind, answers in during.items()},
        })
        (out / "diagnostics.json").write_text(json.dumps({"history": [[t - stream_start, v] for t, v in probe.history],
                                                          "answers": probe.answers}, default=str))
    finally:
        if publisher is not None and publisher.poll() is None:
            publisher.terminate()
        probe.destroy_node()
        rclpy.try_shutdown()
        node.send_signal(signal.SIGINT)
        try:
            row["exit_code"] = node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
            row["exit_code"] = "killed"
        os.environ.clear()
        os.environ.update(saved_env)
    pipeline = Pipeline(PipelineConfig.from_preset("cpu"))
    pipeline.load(str(out / "map.instascene"))
    metrics = evaluate_run(pipeline, dataset, out, progress=False)
    # all of it beside the map, as `instascene run` writes it: per-object IoU and the id choice
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    row.update({k: metrics.get(k) for k in ("psnr", "psnr_object", "ssim", "miou", "biou", "pq_scene",
                                            "cloud_precision", "n_instances", "per_object_iou")})
    return row


def run_live(args) -> int:
    from instascene_ros.commands.bench import _run, _scene

    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(wanted) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    malformed = [a for a in args.node_param if ":=" not in a or not a.split(":=", 1)[0].strip()]
    if malformed:
        raise SystemExit(f"--node-param takes NAME:=VALUE, got {malformed}")
    if args.rescore:
        return rescore_live(args, wanted)
    args.work.mkdir(parents=True, exist_ok=True)
    scene = _scene(args.work, args.seed, args.res, args.views)
    result = {"scene": str(scene), "targets": TARGETS, "rows": {}}
    if args.json is not None and args.json.exists():
        result["rows"] = json.loads(args.json.read_text()).get("rows", {})  # rows of an earlier call are kept

    def save() -> None:
        save_results(args.json, result)

    if "offline" in wanted:
        run_dir = row_folder(args.work, "offline", args.seed, args.res, args.views)
        if args.reuse and (run_dir / "metrics.json").exists():
            metrics = json.loads((run_dir / "metrics.json").read_text())
        else:
            print(f"[bench live] offline: instascene run {scene.name}", flush=True)
            metrics = _run(scene, run_dir, [], None)
        result["rows"]["offline"] = {k: metrics.get(k) for k in (
            "psnr", "psnr_object", "ssim", "miou", "biou", "pq_scene", "cloud_precision", "n_instances",
            "keyframes", "wall_s", "n_gaussians", "per_object_iou")}
        save()
    live_rows = {"live": ("", True), "live-unrefined": ("", False), "live-pose-noise": (args.pose_noise, True),
                 "live-pose-noise-unrefined": (args.pose_noise, False)}
    for name, (pose_noise, refine) in live_rows.items():
        if name in wanted and (pose_noise or "noise" not in name):
            folder = row_folder(args.work, name, args.seed, args.res, args.views)
            result["rows"][name] = live_row(scene, folder, args, pose_noise, refine)
            save()
    print_table(result, args)
    return 0


def save_results(path: Optional[pathlib.Path], result: dict) -> None:
    """Write the bench JSON atomically (a temporary file, then a rename): an interrupted bench
    keeps the rows saved before it."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)


def row_folder(work: pathlib.Path, name: str, seed: int, res: int, views: int) -> pathlib.Path:
    """Where a row's run (and its saved map) lives under --work."""
    if name == "offline":
        return work / f"offline-s{seed}-r{res}-v{views}"
    return work / f"{name.replace('-pose-noise', '-noise')}-s{seed}"


RESCORED = ("miou", "biou", "pq_scene", "cloud_precision", "n_instances", "per_object_iou")


def rescore_live(args, wanted: list[str]) -> int:
    """`--rescore`: the chosen rows' saved maps scored again (`score_decomposition`: the instance
    scores; renders and PSNR depend on the map alone and are kept), every stream measurement of
    the rows kept from --json."""
    from instascene_ros.core.evaluation import score_decomposition
    from instascene_ros.core.io.dataset import load_dataset
    from instascene_ros.core.pipeline import Pipeline, PipelineConfig

    if args.json is None or not args.json.exists():
        raise SystemExit("--rescore keeps each row's stream measurements: give the --json of the run that made the maps")
    result = json.loads(args.json.read_text())
    scene = pathlib.Path(result["scene"])
    if not scene.exists():
        scene = args.work / scene.name  # the folder was copied or moved with its runs
    missing = [name for name in wanted
               if not (row_folder(args.work, name, args.seed, args.res, args.views) / "map.instascene").exists()]
    if missing or not scene.exists():
        raise SystemExit(f"--rescore needs the saved maps and the scene under {args.work}: missing "
                         f"{missing or [scene.name]}")
    dataset = load_dataset(scene)
    for name in wanted:
        pipeline = Pipeline(PipelineConfig.from_preset("cpu"))
        pipeline.load(str(row_folder(args.work, name, args.seed, args.res, args.views) / "map.instascene"))
        scores = score_decomposition(pipeline, dataset)
        row = result["rows"].setdefault(name, {})
        before = {key: row.get(key) for key in RESCORED}
        row.update({key: scores.get(key) for key in RESCORED})
        row["rescored"] = True
        print(f"[bench live] {name} rescored: mIoU {_fmt(before['miou'], 1)} -> {_fmt(row['miou'], 1)}, "
              f"cloud precision {_fmt(before['cloud_precision'], 3)} -> {_fmt(row['cloud_precision'], 3)}, "
              f"instances {before['n_instances']} -> {row['n_instances']}", flush=True)
        save_results(args.json, result)
    print_table(result, args)
    return 0


# An object whose IoU moves this much between rows is a lost or found object, not noise: the
# live bench's mIoU gaps are mostly one or two such objects (see the README's live sections).
OBJECT_DIFFERENCE = 0.2


def objects_that_differ(rows: dict, names: list[str]) -> list[str]:
    """One line per object whose per-object IoU spans >= OBJECT_DIFFERENCE across the rows that
    have per-object scores (rows without them, e.g. from an older --json, are left out)."""
    scored = [n for n in names if isinstance(rows[n].get("per_object_iou"), dict)]
    if len(scored) < 2:
        return []
    objects = sorted({k for n in scored for k in rows[n]["per_object_iou"]}, key=int)
    lines = []
    for gt_id in objects:
        values = [rows[n]["per_object_iou"].get(gt_id) for n in scored]
        present = [v for v in values if v is not None]
        if present and max(present) - min(present) >= OBJECT_DIFFERENCE:
            cells = ", ".join(f"{n} {_fmt(v, 2) if v is not None else '-'}" for n, v in zip(scored, values))
            lines.append(f"  object {gt_id}: {cells}")
    return lines


def print_table(result: dict, args) -> None:
    rows = result["rows"]
    offline, live, noisy = rows.get("offline", {}), rows.get("live", {}), rows.get("live-pose-noise", {})
    names = [n for n in ROWS if n in rows]
    width = max(17, *(len(n) + 2 for n in names))
    print(f"\n{'':<34}" + "".join(f"{n:>{width}}" for n in names))
    for key, digits in (("psnr", 2), ("psnr_object", 2), ("miou", 1), ("biou", 1), ("pq_scene", 2),
                        ("cloud_precision", 3), ("n_instances", 0), ("keyframes", 0), ("keyframes_made", 0), ("keyframe_poses_refined", 0),
                        ("keyframe_poses_kept", 0), ("frames_published", 0),
                        ("frames_in", 0), ("frames_covered", 0), ("frames_mapped", 0), ("drops_total", 0), ("queue_max", 0),
                        ("settle_s", 0), ("settled", 0), ("rss_start_mb", 0), ("rss_end_mb", 0), ("rss_trend_mb_per_min", 2),
                        ("rss_held_trend_mb_per_min", 2), ("rss_held_beyond_keyframes_trend_mb_per_min", 2),
                        ("keyframe_store_second_half_mb", 1), ("rss_held_points", 0), ("keyframes_at_half", 0),
                        ("list_instances_p95_ms", 1), ("segment_at_pixel_p95_ms", 1),
                        ("segment_at_pixel_mask_p95_ms", 1), ("stream_stalls", 0), ("stream_stall_worst_ms", 0),
                        ("stream_stall_total_ms", 0), ("stream_stall_cpu_wait_ms", 0), ("stream_stall_steal_ms", 0),
                        ("stream_gc_worst_ms", 1), ("stream_memory_trim_worst_ms", 1), ("exit_code", 0)):
        cells = []
        for n in names:
            value = rows[n].get(key)
            cells.append(f"{_fmt(value, digits) if isinstance(value, (int, float)) else (value if value is not None else '-')!s:>{width}}")
        print(f"{key:<34}" + "".join(cells))

    def gap(a, b):
        return None if a is None or b is None else a - b

    differing = objects_that_differ(rows, names)
    if differing:
        print(f"\nobjects whose IoU differs by >= {OBJECT_DIFFERENCE} between rows (an object at 0 has no "
              "instance, or the evaluation's click on it named another one):")
        for line in differing:
            print(line)

    print(f"\ntargets: live within {TARGETS['psnr_gap_db']} dB PSNR and {TARGETS['miou_gap']} mIoU of offline "
          f"(gap {_fmt(gap(offline.get('psnr'), live.get('psnr')))} dB, {_fmt(gap(offline.get('miou'), live.get('miou')), 1)}"
          f" mIoU); list_instances and segment_at_pixel p95 <= {TARGETS['p95_ms']:.0f} ms while mapping; memory flat "
          f"(trend <= {args.flat_mb_per_min} MB/min, after each release / every sample / after each release "
          f"less the keyframe store: {_fmt(live.get('rss_held_trend_mb_per_min'))} / "
          f"{_fmt(live.get('rss_trend_mb_per_min'))} / {_fmt(live.get('rss_held_beyond_keyframes_trend_mb_per_min'))}); pose noise "
          f"mIoU drop <= {TARGETS['pose_noise_miou_drop']} ({_fmt(gap(live.get('miou'), noisy.get('miou')), 1)})")
