"""The GPU path where it cannot work: refused at once, with the reason, before any work or download."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="an NVIDIA driver is present")
def test_gpu_setup_without_a_gpu_is_refused_before_downloading_anything(tmp_path):
    venv = tmp_path / "venv-gpu"
    done = subprocess.run(["bash", "tools/setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "INSTASCENE_GPU": "1", "VENV": str(venv)})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no NVIDIA GPU is visible" in done.stderr and "make setup" in done.stderr
    assert not venv.exists()  # nothing created, nothing downloaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_run_demo_and_bench_map_on_cuda_without_a_gpu_stop_before_any_frame(tmp_path):
    run = subprocess.run([sys.executable, "-m", "instascene_ros.cli", "run", str(tmp_path / "no-dataset"),
                          "--out", str(tmp_path / "run"), "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "device 'cuda'" in run.stdout and "sees no CUDA device" in run.stdout, run.stdout
    assert not (tmp_path / "run").exists()  # refused before the run folder is written
    demo = subprocess.run([sys.executable, "-m", "instascene_ros.cli", "demo", "--device", "cuda",
                           "--out", str(tmp_path / "demo")], capture_output=True, text=True, timeout=120)
    assert demo.returncode == 2 and "instascene demo: device 'cuda'" in demo.stdout, demo.stdout + demo.stderr[-2000:]
    assert not (tmp_path / "demo").exists()  # refused before any scene, node or run folder
    bench = subprocess.run([sys.executable, "-m", "instascene_ros.cli", "bench", "map", "--device", "cuda",
                            "--work", str(tmp_path / "bench")], capture_output=True, text=True, timeout=120)
    assert bench.returncode != 0 and "bench map: device 'cuda'" in bench.stderr, bench.stderr[-2000:]
    assert "Traceback" not in bench.stderr and not (tmp_path / "bench").exists()  # no scene generated
