"""scripts/gpu_check.sh stops at once, with a message saying why, on a machine without a GPU."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
BASH = shutil.which("bash")


def _run(path: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=path, PY=sys.executable, OUT=str(tmp_path / "out"))
    return subprocess.run([BASH, str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_no_driver_is_a_clear_failure(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "timeout", "tee", "mkdir"):  # what the script needs, without nvidia-smi
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = _run(str(bin_dir), tmp_path)
    assert result.returncode == 2
    assert "gpu_check: FAILED: no nvidia-smi on PATH" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_a_driver_but_no_cuda_device_in_torch_is_a_clear_failure(tmp_path):
    shims = tmp_path / "shims"
    shims.mkdir()
    fake = shims / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    result = _run(f"{shims}:{os.environ['PATH']}", tmp_path)
    assert result.returncode == 2
    assert "gpu_check: FAILED: torch sees no CUDA device" in result.stderr
