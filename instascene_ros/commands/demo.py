"""`instascene demo`: the main job on an embedded default, end to end, with pictures.

1. generates the default tabletop scene (cached under data/) and draws what the pipeline is
   given (RGB, depth, ground-truth and noisy 2D masks);
2. starts the segmenter and mapper nodes from the launch manifest, streams the scene over ROS
   like a camera on a robot arm (images, camera_info, depth, /tf), waits for the map;
3. acts as a manipulation planner: lists the instances, asks for every object's mesh and runs the
   completion action once; writes the meshes (world frame, PLY), the node's overlays, a contact
   sheet and report.json into the run folder, scored against the scene's ground truth;
4. stops every node with SIGINT and checks they exited cleanly.
`--no-ros` stops after step 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import time

log = logging.getLogger("instascene.demo")

DEFAULT_SCENE = dict(seed=0, views=60, test_views=12, res=256, mode="hemisphere", mask_noise=1)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="generate the default scene and write a run folder with pictures",
        description="The main job on the embedded default scene: generate (or reuse) a pybullet tabletop, "
                    "then write a run folder with a contact sheet of the inputs and a short report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=pathlib.Path, default=pathlib.Path("data/default_scene"),
                        help="where the default scene is generated (reused when present)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="run folder (default: runs/demo-<time>)")
    parser.add_argument("--views-on-sheet", type=int, default=6, help="views shown on the contact sheet")
    parser.add_argument("--no-ros", action="store_true", help="only generate the scene and draw the inputs")
    parser.add_argument("--every", type=int, default=2, help="stream every n-th training view (CPU budget)")
    parser.add_argument("--rate", type=float, default=1.0, help="camera frames per second")
    parser.add_argument("--masks", choices=["segmenter", "dataset"], default="dataset",
                        help="2D masks: the dataset's simulated noisy class-agnostic segmenter (default), or the segmenter node (geometric backend; it also segments the tray walls)")
    parser.add_argument("--timeout", type=float, default=1500.0, help="give up waiting for the map after this")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="the mapper node's device: cpu (numba kernels) or cuda (gsplat; `make demo` picks it "
                             "in a venv made by `make setup-gpu`)")
    parser.set_defaults(run=run)


def ensure_default_scene(path: pathlib.Path) -> pathlib.Path:
    """The default scene, generated once and reused (deterministic per seed)."""
    if (path / "transforms.json").exists() and (path / "scene.json").exists():
        log.info("reusing the default scene at %s", path)
        return path
    from instascene_ros.core.synth import SceneConfig, generate_scene
    from instascene_ros.core.synth.config import MaskNoiseConfig

    config = SceneConfig(seed=DEFAULT_SCENE["seed"], num_views=DEFAULT_SCENE["views"],
                         num_test_views=DEFAULT_SCENE["test_views"], resolution=DEFAULT_SCENE["res"],
                         mode=DEFAULT_SCENE["mode"], mask_noise=MaskNoiseConfig.from_level(DEFAULT_SCENE["mask_noise"]))
    log.info("generating the default scene into %s (about 20-40 s)", path)
    generate_scene(config, path)
    return path


def input_contact_sheet(dataset, out_path: pathlib.Path, n_views: int) -> pathlib.Path:
    """Rows = views; columns = RGB, depth, ground-truth instances, noisy 2D masks (per-view ids)."""
    import numpy as np

    from instascene_ros.core.viz import colorize_ids, contact_sheet, depth_to_rgb

    train = [i for i, frame in enumerate(dataset.frames) if frame.meta.get("split") == "train"]
    picks = [train[int(k)] for k in np.linspace(0, len(train) - 1, min(n_views, len(train)))]
    gt_masks = dataset.ground_truth_masks()
    rows, titles = [], []
    for index in picks:
        frame = dataset.frames[index]
        rows.append([frame.rgb, depth_to_rgb(frame.depth) if frame.depth is not None else None,
                     colorize_ids(gt_masks[index]) if gt_masks[index] is not None else None,
                     colorize_ids(frame.mask) if frame.mask is not None else None])
        titles.append(frame.name)
    contact_sheet(rows, row_titles=titles, col_titles=["RGB", "depth", "ground truth", "noisy 2D masks (per-view ids)"],
                  out_path=out_path)
    return out_path


def run(args) -> int:
    from instascene_ros.core.io import load_dataset

    if args.device == "cuda" and not args.no_ros:
        from instascene_ros.core.splat.gsplat_backend import cuda_unavailable_reason

        reason = cuda_unavailable_reason()
        if reason is not None:  # the node would refuse to start; say why now, not after a timeout
            print(f"instascene demo: device 'cuda': {reason}")
            return 2
    start = time.time()
    out = args.out or pathlib.Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    scene_path = ensure_default_scene(args.data)
    dataset = load_dataset(scene_path)
    sheet = input_contact_sheet(dataset, out / "inputs.png", args.views_on_sheet)
    manifest = dataset.scene_manifest()
    report = {"scene": str(scene_path), "n_frames": len(dataset.frames),
              "n_objects": len(manifest.get("objects", [])), "contact_sheet": str(sheet),
              "wall_s": round(time.time() - start, 1)}
    if not args.no_ros:
        report.update(ros_demo(args, scene_path, dataset, out))
    report["wall_s"] = round(time.time() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"demo run folder: {out.resolve()}")
    print(f"  inputs:        {sheet.resolve()}")
    if (out / "objects.png").exists():
        print(f"  objects:       {(out / 'objects.png').resolve()}")
        print(f"  meshes:        {(out / 'meshes').resolve()}/<id>.ply")
    print(f"  report:        {(out / 'report.json').resolve()}")
    return 0


def ros_demo(args, scene_path: pathlib.Path, dataset, out: pathlib.Path) -> dict:
    """Steps 2-4: nodes, stream, queries, pictures. Returns the report's ROS part."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile

    import rclpy
    import trimesh

    from instascene_ros.ros.demo_client import DemoClient
    from instascene_ros.ros.environment import adopt_ros_environment, ros_environment
    from instascene_ros.ros.launcher import load_manifest, node_command, selected_nodes

    stream = out / "stream"
    _subsample(scene_path, stream, args.every)
    n_frames = len(json.loads((stream / "transforms.json").read_text())["frames"])
    env = ros_environment(domain_id=int(time.time()) % 100 + 120, log_dir=tempfile.mkdtemp(prefix="instascene-ros-log-"))
    adopt_ros_environment(env)
    arguments, nodes = load_manifest()
    arguments["with_segmenter"] = "true" if args.masks == "segmenter" else "false"
    processes = {}
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for node in selected_nodes(nodes, arguments):
        if node.name == "instascene_node" and args.masks == "dataset":
            # ROS applies the first matching remap rule, so replace the manifest's, do not append
            node.remappings["mask"] = "/segmenter/mask"
        command = node_command(node, arguments)
        if node.name == "instascene_node":
            command += ["-p", "queue_size:=100"]  # the demo streams faster than a CPU maps: keep every frame
            command += ["-p", f"device:={args.device}"]
        log.info("starting %s", node.name)
        processes[node.name] = subprocess.Popen(command, env=env, stdout=open(logs / f"{node.name}.log", "w"),
                                                stderr=subprocess.STDOUT)
    report: dict = {"masks": args.masks, "streamed_frames": n_frames}
    rclpy.init()
    client = DemoClient()
    try:
        log.info("waiting for the nodes to start")
        _wait_for_log(logs / "instascene_node.log", "ready:", 180, processes.get("instascene_node"))
        publish = [sys.executable, "-m", "instascene_ros.cli", "publish-dataset", str(stream), "--rate", str(args.rate)]
        if args.masks == "segmenter":
            publish.append("--no-masks")
        log.info("streaming %d frames at %.1f Hz", n_frames, args.rate)
        subprocess.run(publish, env=env, check=True, capture_output=True)
        log.info("waiting for the map (mapping runs slower than the stream on a CPU)")
        report["mapped_in_time"] = client.wait_until_mapped(n_frames, args.timeout, log=lambda m: log.info(m))
        report["diagnostics"] = dict(client.diagnostics)
        queries = client.query_everything()
        report["action"] = queries.get("action")
        meshes = out / "meshes"
        meshes.mkdir(exist_ok=True)
        objects = []
        for entry in queries["objects"]:
            if entry.get("success"):
                trimesh.Trimesh(entry.pop("vertices_world"), entry.pop("faces")).export(meshes / f"{entry['id']}.ply")
            objects.append(entry)
        report["objects"] = objects
        report["scores"] = _score_meshes(dataset, meshes)
        _objects_sheet(client, dataset, meshes, out / "objects.png")
    finally:
        client.destroy_node()
        rclpy.try_shutdown()
        codes = {}
        for name, process in processes.items():
            process.send_signal(signal.SIGINT)
        for name, process in processes.items():
            try:
                codes[name] = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = "killed"
        report["exit_codes"] = codes
        shutil.rmtree(stream, ignore_errors=True)
    return report


def _subsample(scene: pathlib.Path, out: pathlib.Path, every: int) -> None:
    """A view of the dataset with every n-th training frame (files are linked, not copied)."""
    transforms = json.loads((scene / "transforms.json").read_text())
    train = [f for f in transforms["frames"] if f.get("split", "train") == "train"][:: max(1, every)]
    out.mkdir(parents=True, exist_ok=True)
    for frame in train:
        for key, value in list(frame.items()):
            if key.endswith("path") and isinstance(value, str):
                frame[key] = str((scene / value).resolve())
    transforms["frames"] = train
    (out / "transforms.json").write_text(json.dumps(transforms))


def _wait_for_log(path: pathlib.Path, text: str, timeout_s: float, process=None) -> None:
    """Wait until `text` appears in the log at `path`; fail at once if `process` (the one writing
    it) has exited: a node that cannot start says why in its log, and waiting out the timeout
    only hides that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{path.stem} exited with code {process.returncode} before '{text}': "
                               f"{path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"no '{text}' in {path} after {timeout_s:.0f} s: {path.read_text(errors='replace')[-2000:]}")


def _score_meshes(dataset, meshes: pathlib.Path) -> dict:
    """Each returned mesh against the ground-truth object it overlaps most (evaluation only)."""
    import numpy as np
    import trimesh

    from instascene_ros.core import metrics

    truth = {gt_id: trimesh.load(path, force="mesh") for gt_id, path in dataset.ground_truth_mesh_paths().items()}
    scores = {}
    for path in sorted(meshes.glob("*.ply")):
        mesh = trimesh.load(path, force="mesh")
        centre = mesh.bounds.mean(axis=0)
        gt_id = min(truth, key=lambda k: np.linalg.norm(truth[k].bounds.mean(axis=0) - centre))
        surface = metrics.surface_metrics(mesh, truth[gt_id], n_samples=20_000)
        scores[path.stem] = {"gt_id": int(gt_id), "watertight": bool(mesh.is_watertight),
                             "f1_2pct": float(surface.f1_relative[0.02]),
                             "centre_error_m": float(np.linalg.norm(centre - truth[gt_id].bounds.mean(axis=0)))}
    return scores


def _objects_sheet(client, dataset, meshes: pathlib.Path, out_path: pathlib.Path) -> None:
    """The node's latest overlays beside renders of the returned meshes seen from the first camera."""
    import numpy as np
    import trimesh

    from instascene_ros.core.viz import colorize_ids, contact_sheet

    frame = next(f for f in dataset.frames if f.meta.get("split") == "train")
    camera = frame.camera
    ids = np.zeros((camera.height, camera.width), np.int32)
    depth = np.full(ids.shape, np.inf)
    origins, directions = camera.pixel_rays()
    for path in sorted(meshes.glob("*.ply")):
        mesh = trimesh.load(path, force="mesh")
        locations, rays, _ = mesh.ray.intersects_location(origins, directions, multiple_hits=False)
        distance = np.linalg.norm(locations - origins[rays], axis=1)
        rows, cols = np.divmod(rays, camera.width)
        closer = distance < depth[rows, cols]
        depth[rows[closer], cols[closer]] = distance[closer]
        ids[rows[closer], cols[closer]] = int(path.stem)
    overlays = client.overlays[-3:] or [frame.rgb]
    contact_sheet([[frame.rgb, colorize_ids(ids), *overlays]],
                  col_titles=["camera", "returned meshes (ray cast)"] + ["node overlay"] * len(overlays),
                  out_path=out_path)
