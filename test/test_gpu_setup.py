"""`make setup-gpu` (tools/setup.sh with INSTASCENE_GPU=1) where it cannot work: refused at once."""
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="an NVIDIA driver is present")
def test_gpu_setup_without_a_gpu_is_refused_before_downloading_anything(tmp_path):
    venv = tmp_path / "venv-gpu"
    done = subprocess.run(["bash", "tools/setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "INSTASCENE_GPU": "1", "VENV": str(venv)})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no NVIDIA GPU is visible" in done.stderr and "make setup" in done.stderr
    assert not venv.exists()  # nothing created, nothing downloaded
