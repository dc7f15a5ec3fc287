"""Real jobs that write real checkpoints (the FSDP2 job), and bit-exact comparisons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a model hub


def run_fsdp_job(out: Path, *args: str) -> float:
    """Run ``fsdp_job.py`` (2 ranks, gloo); return its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(HERE / "fsdp_job.py"), str(out), *args],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        pytest.fail(f"FSDP job failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def load_full(
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], list[Any]]:
    """A job's gathered dump: values by name, state by name and key, param groups."""
    flat = load_file(str(path))
    values = {k.removeprefix("model/"): v for k, v in flat.items() if k.startswith("model/")}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        if key.startswith("state/"):
            _, name, leaf = key.split("/")
            state.setdefault(name, {})[leaf] = tensor
    groups = json.loads(path.with_suffix(".groups.json").read_text())
    return values, state, groups


def assert_state_equal(
    actual: dict[str, dict[str, torch.Tensor]], expected: dict[str, dict[str, torch.Tensor]]
) -> int:
    """Every state tensor equal bit for bit, dtype included; returns how many were compared."""
    assert actual.keys() == expected.keys()
    compared = 0
    for name, tensors in expected.items():
        assert actual[name].keys() == tensors.keys(), name
        for key, tensor in tensors.items():
            got = actual[name][key]
            assert got.dtype == tensor.dtype, (name, key)
            assert torch.equal(got, tensor), (name, key)
            compared += 1
    return compared
