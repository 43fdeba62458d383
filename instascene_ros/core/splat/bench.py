"""Timing and memory of one forward + backward render (wired into `instascene bench splat`).

`benchmark_case` renders a synthetic scene shaped like a trained one (Gaussians filling the
view frustum at 2-6 m, screen-space sizes of a few pixels, mixed opacities) with colour +
F feature channels + depth, backpropagates a loss touching every output, and reports the
best wall time of a few repeats and the peak RSS. By default each case runs in a fresh
subprocess, so the peak RSS is that case's alone (interpreter + torch included).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..camera import Camera, intrinsics_from_fov
from .types import Gaussians, RasterConfig

SCENE_SEED = 0
FIELD_OF_VIEW_DEG = 60.0
DEPTH_RANGE_M = (2.0, 6.0)
MEDIAN_SIGMA_PX = 2.0  # median screen-space standard deviation of a Gaussian


def synthetic_scene(n: int, width: int, height: int, n_features: int, sh_degree: int = 0,
                    seed: int = SCENE_SEED) -> tuple[Gaussians, Camera]:
    """N random Gaussians in front of a camera at the origin looking down +z."""
    K = intrinsics_from_fov(width, height, FIELD_OF_VIEW_DEG)
    camera = Camera(K=K, width=width, height=height, T_world_cam=np.eye(4))
    gen = torch.Generator().manual_seed(seed)
    z = torch.empty(n).uniform_(*DEPTH_RANGE_M, generator=gen)
    half_w, half_h = 0.5 * width / K[0, 0], 0.5 * height / K[1, 1]
    x = (torch.rand(n, generator=gen) * 2 - 1) * half_w * z * 1.05
    y = (torch.rand(n, generator=gen) * 2 - 1) * half_h * z * 1.05
    sigma_px = MEDIAN_SIGMA_PX * torch.exp(0.5 * torch.randn(n, generator=gen))
    log_scales = torch.log(sigma_px * z / K[0, 0])[:, None] + 0.3 * torch.randn(n, 3, generator=gen)
    features = torch.randn(n, n_features, generator=gen) if n_features else None
    gaussians = Gaussians(
        means=torch.stack([x, y, z], dim=-1),
        quats=torch.randn(n, 4, generator=gen),
        log_scales=log_scales,
        opacity_logits=torch.randn(n, generator=gen) * 1.5,
        sh=torch.randn(n, (sh_degree + 1) ** 2, 3, generator=gen) * 0.3,
        features=features,
    )
    return gaussians, camera


def _peak_rss_mb() -> float:
    scale = 1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _run_case(n: int, width: int, height: int, n_features: int, backend: str, repeats: int,
              num_threads: int, primitive: str = "3dgs") -> dict:
    from .render import render

    torch.set_num_threads(max(1, num_threads))
    config = RasterConfig(num_threads=num_threads)
    # gsplat renders CUDA tensors; its kernels run asynchronously, so every timed span ends in a
    # synchronize (otherwise the clock would stop when the launches are queued, not done)
    on_cuda = backend == "gsplat"
    device = torch.device("cuda" if on_cuda else "cpu")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    scene, camera = synthetic_scene(n, width, height, n_features)
    gaussians = scene.map(lambda t: t.to(device))
    params = [gaussians.means, gaussians.quats, gaussians.log_scales, gaussians.opacity_logits, gaussians.sh]
    if gaussians.features is not None:
        params.append(gaussians.features)
    for p in params:
        p.requires_grad_(True)

    def step() -> tuple[float, float, float]:
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        out = render(gaussians, [camera], backend=backend, config=config, primitive=primitive)
        sync()
        forward = time.perf_counter() - start
        loss = out.color.sum() + out.depth.sum() + out.alpha.sum()
        for extra in (out.features, out.normals, out.median_depth):
            if extra is not None:
                loss = loss + extra.sum()
        loss.backward()
        sync()
        for p in params:
            p.grad = None
        return time.perf_counter() - start, forward, time.process_time() - start_cpu

    # warm-up: JIT compilation (or the numba cache load) and allocator growth are not the kernel
    warm_scene, warm_camera = synthetic_scene(64, 32, 32, n_features)
    render(warm_scene.map(lambda t: t.to(device)), [warm_camera], backend=backend, config=config, primitive=primitive)
    step()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(repeats)]
    best = min(times)
    record = {"n": n, "width": width, "height": height, "n_features": n_features, "backend": backend,
              "primitive": primitive, "num_threads": num_threads, "fwd_bwd_s": best[0], "forward_s": best[1],
              "fwd_bwd_cpu_s": min(t[2] for t in times), "peak_rss_mb": _peak_rss_mb()}
    if on_cuda:
        record["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def benchmark_case(n: int, width: int, height: int, n_features: int, backend: str = "numba", *,
                   repeats: int = 3, num_threads: int = 1, primitive: str = "3dgs", isolate: bool = True,
                   timeout_s: Optional[float] = 900.0) -> dict:
    """Best-of-`repeats` forward + backward seconds and peak RSS (MB) for one synthetic scene.

    fwd_bwd_s is wall time; fwd_bwd_cpu_s the process CPU time of the same call (on a shared
    machine wall time also counts waiting for a core: CPU time is the cost of the call).
    backend: "numba" or "torch-reference" (the chunked pure-torch implementation), or
    "gsplat" on a CUDA machine. Returns a dict with fwd_bwd_s, forward_s, peak_rss_mb and the
    case's parameters. isolate=True runs the case in a fresh interpreter (honest peak RSS).
    """
    kwargs = dict(n=n, width=width, height=height, n_features=n_features, backend=backend, repeats=repeats,
                  num_threads=num_threads, primitive=primitive)
    if not isolate:
        return _run_case(**kwargs)
    command = [sys.executable, "-m", f"{__package__}.bench", "--case", json.dumps(kwargs)]
    # the package's root on the child's path, whether or not the package is installed
    root = str(Path(__file__).resolve().parents[3])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark case {kwargs} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def compare(n: int, width: int, height: int, n_features: int, repeats: int = 3, num_threads: int = 1) -> dict:
    """numba vs the chunked pure-torch implementation on the same case, with the speed ratio."""
    numba_result = benchmark_case(n, width, height, n_features, "numba", repeats=repeats, num_threads=num_threads)
    torch_result = benchmark_case(n, width, height, n_features, "torch-reference", repeats=repeats,
                                  num_threads=num_threads)
    return {"numba": numba_result, "torch": torch_result,
            "torch_over_numba": torch_result["fwd_bwd_s"] / numba_result["fwd_bwd_s"],
            "torch_over_numba_cpu": torch_result["fwd_bwd_cpu_s"] / numba_result["fwd_bwd_cpu_s"]}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="forward+backward splatting benchmark")
    parser.add_argument("--case", help="JSON keyword arguments of one case (run in this process)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(_run_case(**json.loads(args.case))), flush=True)
        return
    for case in [(20_000, 256, 256, 16), (100_000, 320, 240, 16)]:
        print(json.dumps(compare(*case, num_threads=args.threads)), flush=True)


if __name__ == "__main__":
    main()
