"""benchmarks/gpu_check.py where there is no GPU: it says so in its report and exits 0
(on a GPU machine it runs every CUDA path; it is run by hand there, not by the suite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="a GPU is here: the check would run "
    "every part (minutes); run benchmarks/gpu_check.py by hand",
)
def test_without_cuda_the_check_says_so_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    report = tmp_path / "reports" / "gpu.md"
    env = {**os.environ, "OUT": str(out)}
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--report", str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = report.read_text()
    assert (out / "gpu.md").read_text() == text
    assert "# adamscope GPU check" in text
    assert "no CUDA: torch.cuda.is_available() is false" in text
    assert "no CUDA device: nothing else was run" in text
    for part in (
        "gpu-marked tests",
        "CPU tiers that differ on a CUDA host",
        "bench_step.py --device cuda",
        "serve --per-gpu",
        "Ray tier on one GPU",
    ):
        assert f"| {part}" in text
    assert text.count("| not run: no CUDA |") == 5  # one row of the table per part
