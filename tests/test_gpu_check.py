"""``scripts/gpu_check.sh`` on a machine without CUDA: it says so, checks itself, exits 0.

The check runs ``bash -n`` on the script and ``--help`` of every benchmark it calls (the slow
part: each imports torch), so a broken option parser or a syntax error shows here, not on the
GPU machine. Skipped where a CUDA GPU is present (the script would then run the real check).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the script runs")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_path_without_cuda(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    # no nvidia-smi on PATH: the script must not even try the GPU steps or install wheels
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not (Path(p) / "nvidia-smi").exists()
    )
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no CUDA GPU found" in done.stdout
    assert "self-check passed" in done.stdout
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "no CUDA GPU found" in summary and "self-check passed" in summary
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.txt"]
