"""`instascene bench ...`: the measurements behind the README's results, printed beside baselines.

- `bench splat`: forward+backward time and peak RSS of the numba kernel vs the chunked
  pure-torch implementation (and gsplat on a CUDA machine), 3 colour + 16 feature channels +
  depth, each case in a fresh process.
- `bench map`: `instascene run` on generated scenes (RGB-D and RGB-only, 3DGS and 2DGS), held-out
  PSNR / object PSNR / SSIM / depth error (and the 2DGS median depth's) / keyframe latency against
  the targets.
- `bench segment`: decomposition on noisy masks over report seeds (mIoU, boundary IoU,
  PQ^scene, cloud precision), mean and standard deviation, with InstaScene's ablation retrained
  on each saved map (bench_segment.py).
- `bench complete`: in-situ completion on arc scenes against ground-truth meshes, beside the
  convex-hull and TSDF-cap baselines and the oracle generator (bench_complete.py).
- `bench live`: the ROS node on a 10 Hz stream in its own process beside offline `instascene
  run` on the same data: keep-up, queue, memory trend, query latency over DDS while mapping,
  and pose noise (bench_live.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import subprocess
import sys
import time
import typing

SPLAT_CASES = [(5_000, 128, 128), (20_000, 256, 256), (100_000, 320, 240)]
FEATURE_CHANNELS = 16


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks behind the README's results",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benches = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)

    splat = benches.add_parser("splat", help="splatting kernel speed and memory vs plain torch")
    splat.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
    splat.add_argument("--threads", type=int, default=1, help="numba / torch threads")
    splat.add_argument("--repeats", type=int, default=3, help="best of this many runs per case")
    splat.add_argument("--quick", action="store_true", help="only the smallest case")
    splat.add_argument("--backends", default=None,
                       help="comma-separated subset of numba, torch-reference, gsplat (default: numba and "
                            "torch-reference, plus gsplat where CUDA is available)")
    splat.add_argument("--primitives", default="3dgs", help="3dgs and/or 2dgs, comma-separated")
    splat.set_defaults(run=run_splat)

    sub = benches.add_parser(
        "map", help="reconstruction quality and speed on generated scenes",
        description="Maps generated scenes with `instascene run --no-masks` (RGB-D and/or RGB only, 3DGS and/or "
                    "2DGS) and scores the held-out ring of off-trajectory cameras. 'seen PSNR' is the PSNR on "
                    "the held-out pixels whose surface some training view saw (true depth, unoccluded), 'seen' "
                    "their share: the rest needs extrapolation no map of the training views can give.")
    sub.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
    sub.add_argument("--seeds", default="0", help="comma-separated scene seeds")
    sub.add_argument("--res", type=int, default=256, help="image size")
    sub.add_argument("--views", type=int, default=60, help="training views")
    sub.add_argument("--work", type=pathlib.Path, default=pathlib.Path("runs/bench"), help="scenes and run folders")
    sub.add_argument("--finish-seconds", type=float, default=None, help="cap of the final refinement per run")
    sub.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: numba kernels; cuda: gsplat")
    sub.add_argument("--preset", default="cpu", choices=["cpu", "paper"],
                     help="mapper budgets (paper: the published 30k-iteration schedule, for a GPU)")
    sub.add_argument("--inputs", default="rgbd,rgb", help="which inputs to map: rgbd, rgb or both")
    sub.add_argument("--primitives", default="3dgs,2dgs",
                     help="3D Gaussians and/or 2D surfels (depth error of the expected depth for both, and of "
                          "the 2DGS median depth)")
    sub.set_defaults(run=run_map)

    from instascene_ros.commands import bench_segment

    bench_segment.add_parser(benches)
    from instascene_ros.commands import bench_complete, bench_live

    bench_complete.add_parser(benches)
    bench_live.add_parser(benches)


# ------------------------------------------------------------------------------------------ splat
def run_splat(args) -> int:
    from instascene_ros.core.splat.bench import benchmark_case

    cases = SPLAT_CASES[:1] if args.quick else SPLAT_CASES
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    backends = args.backends.split(",") if args.backends else ["numba", "torch-reference"] + (["gsplat"] if cuda else [])
    primitives = args.primitives.split(",")
    for name in backends:
        if name not in ("numba", "torch-reference", "gsplat"):
            raise SystemExit(f"bench splat: unknown backend '{name}' (numba, torch-reference, gsplat)")
    for name in primitives:
        if name not in ("3dgs", "2dgs"):
            raise SystemExit(f"bench splat: unknown primitive '{name}' (3dgs, 2dgs)")
    if "gsplat" in backends and not cuda:
        raise SystemExit("bench splat: the gsplat backend needs a CUDA device and none is available")
    results = []
    # peak MB: the process's RSS; for gsplat also the CUDA allocator's peak during the timed runs
    print(f"{'N':>7} {'size':>8} {'prim':>5} {'backend':>16} {'fwd+bwd s':>10} {'peak MB':>8} {'cuda MB':>8} "
          f"{'vs numba':>9}")
    for n, width, height in cases:
        for primitive in primitives:
            numba_s = None
            for backend in backends:
                record = benchmark_case(n, width, height, FEATURE_CHANNELS, backend, repeats=args.repeats,
                                        num_threads=args.threads, primitive=primitive)
                entry = {"backend": backend, "primitive": primitive, "n_gaussians": n, "width": width,
                         "height": height, "channels": 3 + FEATURE_CHANNELS + 1, "fwd_bwd_s": record["fwd_bwd_s"],
                         "fwd_bwd_cpu_s": record.get("fwd_bwd_cpu_s"), "peak_rss_mb": record["peak_rss_mb"],
                         "peak_cuda_mb": record.get("peak_cuda_mb"), "threads": args.threads}
                results.append(entry)
                numba_s = entry["fwd_bwd_s"] if backend == "numba" else numba_s
                ratio = entry["fwd_bwd_s"] / numba_s if numba_s else float("nan")
                cuda_mb = f"{entry['peak_cuda_mb']:>8.0f}" if entry["peak_cuda_mb"] is not None else f"{'-':>8}"
                print(f"{n:>7} {width}x{height:<4} {primitive:>5} {backend:>16} {entry['fwd_bwd_s']:>10.4f} "
                      f"{entry['peak_rss_mb']:>8.0f} {cuda_mb} {ratio:>8.2f}x", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cases": results}, indent=2))
    return 0


# ------------------------------------------------------------------------------------------ scenes
def _scene(work: pathlib.Path, seed: int, res: int, views: int, mode: str = "hemisphere", noise: int = 1) -> pathlib.Path:
    path = work / f"scene-s{seed}-r{res}-v{views}-{mode}-n{noise}"
    if not (path / "transforms.json").exists():
        subprocess.run([sys.executable, "-m", "instascene_ros.cli", "make-scene", str(path), "--seed", str(seed),
                        "--res", str(res), "--views", str(views), "--mode", mode, "--mask-noise", str(noise),
                        "--overwrite", "--no-progress"], check=True)
    return path


def _run(scene: pathlib.Path, out: pathlib.Path, extra: list[str], finish_seconds) -> dict:
    command = [sys.executable, "-m", "instascene_ros.cli", "run", str(scene), "--out", str(out), "--no-progress", *extra]
    if finish_seconds is not None:
        command += ["--finish-seconds", str(finish_seconds)]
    start = time.time()
    subprocess.run(command, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["bench_wall_s"] = time.time() - start
    return metrics


def config_overrides(config_class, flag: str, assignments: list[str]) -> dict:
    """{field: value} from NAME=VALUE strings for the dataclass `config_class`, each value parsed
    as the field's own type (`none` for an Optional field); an unknown or nested field, or a
    value of the wrong type, is an error that names `flag`."""
    hints = typing.get_type_hints(config_class)
    defaults = config_class()
    plain = sorted(f.name for f in dataclasses.fields(defaults)
                   if not dataclasses.is_dataclass(getattr(defaults, f.name)))  # nested configs are not set here
    overrides = {}
    for assignment in assignments:
        name, equals, text = assignment.partition("=")
        name, text = name.strip(), text.strip()
        if not equals or name not in plain:
            raise SystemExit(f"{flag} {assignment!r}: expected NAME=VALUE with NAME one of {', '.join(plain)}")
        kinds = [kind for kind in typing.get_args(hints[name]) if kind is not type(None)] or [hints[name]]
        optional = type(None) in typing.get_args(hints[name])
        try:
            if optional and text.lower() == "none":
                value = None
            elif kinds[0] is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError("expected true or false")
                value = text.lower() == "true"
            else:
                value = kinds[0](text)
        except (TypeError, ValueError) as error:
            raise SystemExit(f"{flag} {assignment!r}: {error}") from None
        overrides[name] = value
    return overrides


def instance_overrides(assignments: list[str]) -> dict:
    """`config_overrides` for InstanceConfig, the extraction's (`--instance-option` of the
    complete and segment benches)."""
    from instascene_ros.core.instances import InstanceConfig

    return config_overrides(InstanceConfig, "--instance-option", assignments)


def _fmt(value, digits=2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def run_map(args) -> int:
    """Every (seed, input, primitive) combination mapped by `instascene run --no-masks`, one row each."""
    seeds = [int(s) for s in args.seeds.split(",")]
    inputs = {"rgbd": ["--no-masks"], "rgb": ["--no-masks", "--no-depth"]}
    if args.device == "cuda":
        from instascene_ros.core.splat.gsplat_backend import cuda_unavailable_reason

        reason = cuda_unavailable_reason()
        if reason is not None:
            raise SystemExit(f"bench map: device 'cuda': {reason}")
    primitives = args.primitives.split(",")
    for name in [*args.inputs.split(","), *primitives]:
        if name not in (*inputs, "3dgs", "2dgs"):
            raise SystemExit(f"bench map: unknown input or primitive '{name}' (inputs: rgbd, rgb; primitives: 3dgs, 2dgs)")
    rows = []
    for seed in seeds:
        scene = _scene(args.work, seed, args.res, args.views)
        for label in args.inputs.split(","):
            for primitive in primitives:
                # 3DGS keeps the run folder name it always had, so earlier runs stay comparable.
                out = args.work / (f"map-{label}-s{seed}" if primitive == "3dgs" else f"map-{label}-{primitive}-s{seed}")
                if args.device != "cpu" or args.preset != "cpu":  # CPU runs keep their folder names
                    out = out.with_name(f"{out.name}-{args.preset}-{args.device}")
                metrics = _run(scene, out, [*inputs[label], "--primitive", primitive, "--device", args.device,
                                            "--preset", args.preset], args.finish_seconds)
                rows.append({"seed": seed, "input": label, "primitive": primitive, "device": args.device,
                             "preset": args.preset, **{k: metrics.get(k) for k in (
                    "psnr", "psnr_object", "psnr_observed", "observed_fraction", "ssim", "depth_error_mm",
                    "depth_error_median_depth_mm", "n_gaussians", "wall_s", "keyframe_s_median", "keyframe_s_max")}})
    targets = {"rgbd": ("PSNR >= 27 dB in <= 360 s, depth < 3 mm", 27.0, 360.0),
               "rgb": ("PSNR >= 23 dB in <= 720 s", 23.0, 720.0)}
    print(f"{'seed':>4} {'input':>5} {'prim':>5} {'PSNR':>6} {'obj PSNR':>8} {'seen PSNR':>9} {'seen':>5} "
          f"{'SSIM':>5} {'depth mm':>8} "
          f"{'median-depth mm':>15} {'N':>7} {'wall s':>7} {'kf med s':>8} {'kf max s':>8}  target")
    for row in rows:
        print(f"{row['seed']:>4} {row['input']:>5} {row['primitive']:>5} {_fmt(row['psnr']):>6} "
              f"{_fmt(row['psnr_object']):>8} {_fmt(row['psnr_observed']):>9} {_fmt(row['observed_fraction']):>5} "
              f"{_fmt(row['ssim']):>5} {_fmt(row['depth_error_mm']):>8} "
              f"{_fmt(row['depth_error_median_depth_mm']):>15} {row['n_gaussians']:>7} {_fmt(row['wall_s'], 0):>7} "
              f"{_fmt(row['keyframe_s_median']):>8} {_fmt(row['keyframe_s_max']):>8}  {targets[row['input']][0]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": rows}, indent=2))
    return 0
