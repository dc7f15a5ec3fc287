"""``adamscope.watch`` under torch.distributed: a real 2-rank job (gloo, CPU; FSDP2
``fully_shard`` and DDP) reporting to a real server. One run; FSDP2's shards merged by
parameter name, exactly; a state read that is the gathered state at the step it names,
bit for bit; an lr change applied at the same step on both ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file
from waiting import until

from adamscope.client import codec
from adamscope.service.testing import Spawned, spawned

pytestmark = pytest.mark.e2e

JOB = Path(__file__).resolve().parent.parent / "watch_dist_job.py"
ROLES = ("grad", "param", "exp_avg", "exp_avg_sq")
NEW_LR = 1.25e-3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spawned]:
    with spawned(tmp_path_factory.mktemp("data")) as s:
        yield s


def _command(url: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """Queue a command; wait until it settled."""
    c = httpx.post(f"{url}/v1/watch/{name}/commands", json=body).json()
    assert isinstance(c["args"]["at"], int), c

    def settled() -> Any:
        s = httpx.get(f"{url}/v1/watch/{name}/commands/{c['id']}", timeout=30).json()
        return s["status"] != "pending" and s

    found: dict[str, Any] = until(f"command {body['op']}", settled, 60.0)
    return found


def _steered(url: str, name: str, out: Path, mode: str) -> dict[str, Any]:
    """Run the job; while it trains, read the whole state and change group 0's lr."""
    job = subprocess.Popen(
        [sys.executable, str(JOB), str(out), mode, url, name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        until(
            "the run's step 5",
            lambda: (
                (r := httpx.get(f"{url}/v1/steppers/{name}", timeout=30)).status_code == 200
                and r.json()["step"] >= 5
            ),
            60.0,
        )
        read = httpx.get(
            f"{url}/v1/watch/{name}/state", params={"with_params": True, "timeout": 30}, timeout=40
        )
        assert read.status_code == 200, read.text
        applied = _command(url, name, {"op": "options", "group": 0, "options": {"lr": NEW_LR}})
        snapshot = _command(url, name, {"op": "snapshot", "snapshot": "s1"})
        restored = _command(url, name, {"op": "restore", "snapshot": "s1"})
        kept = httpx.get(f"{url}/v1/watch/{name}/snapshots").json()["snapshots"]
        (out / "stop").touch()
        said = job.communicate(timeout=60)[0]
        assert job.returncode == 0, said[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    return {
        "read": (int(read.headers["X-Adamscope-Step"]), codec.decode(read.content)[0]),
        "lr": applied,
        "snapshot": snapshot,
        "restored": restored,
        "kept": kept,
        "full": load_file(str(out / "full.safetensors")),
        "ranks": [json.loads((out / f"lr_{r}.json").read_text()) for r in range(2)],
    }


def _reference(full: dict[str, torch.Tensor], step: int, names: list[str]) -> dict[str, Any]:
    """Float64 norms, sums, minima and maxima of the gathered tensors at ``step``."""
    out: dict[str, dict[str, float]] = {}
    for n in names:
        sig: dict[str, float] = {}
        for role in ROLES:
            x = full[f"{step}/{n}/{role}"].double().reshape(-1)
            sig[f"{role}_norm"] = float(torch.linalg.vector_norm(x))
            sig[f"{role}_sum"] = float(x.sum())
            sig[f"{role}_abs"] = float(x.abs().sum())
            sig[f"{role}_min"], sig[f"{role}_max"] = float(x.min()), float(x.max())
        out[n] = sig
    return out


def _close(got: float, want: float, scale: float) -> bool:
    """Within a float32 accumulation's roundings (the single-process tests' rel=1e-6)."""
    return abs(got - want) <= 1e-6 * max(abs(want), scale)


def _check_signals(got: dict[str, Any], want: dict[str, float]) -> None:
    for role in ROLES:
        norm, abs_sum = want[f"{role}_norm"], want[f"{role}_abs"]
        assert _close(got[f"{role}_norm"], norm, norm), (role, got[f"{role}_norm"], norm)
        assert _close(got[f"{role}_sum"], want[f"{role}_sum"], abs_sum), role
        assert got[f"{role}_min"] == want[f"{role}_min"], role  # one element's value
        assert got[f"{role}_max"] == want[f"{role}_max"], role
    assert got["nan_count"] == 0 and got["inf_count"] == 0


def _check_run(url: str, name: str, found: dict[str, Any]) -> dict[str, Any]:
    """What both layouts guarantee; returns the run's last signals."""
    names = [n for n in httpx.get(f"{url}/v1/steppers/{name}").json()["params"]]
    steps = len(found["ranks"][0]["lrs"])
    assert len(found["ranks"][1]["lrs"]) == steps
    assert all(r["errors"] == 0 for r in found["ranks"]), found["ranks"]
    listed = [s["name"] for s in httpx.get(f"{url}/v1/steppers").json()["steppers"]]
    assert listed.count(name) == 1 and not any(n != name and name in n for n in listed)
    summary = httpx.get(f"{url}/v1/steppers/{name}").json()
    assert summary["kind"] == "watched" and summary["step"] == steps
    signals = httpx.get(f"{url}/v1/steppers/{name}/signals").json()
    assert signals["step"] == steps
    full = found["full"]
    params = [p["name"] for p in names]
    want = _reference(full, steps, params)
    for n in params:
        _check_signals(signals["tensors"][n], want[n])
    agg = signals["aggregate"]
    total = (sum(want[n]["grad_norm"] ** 2 for n in params)) ** 0.5
    assert _close(agg["grad_norm"], total, total)
    assert agg["exp_avg_sq_max"] == max(want[n]["exp_avg_sq_max"] for n in params)
    # A state read: the gathered state (and parameters) at the step it names, bit for bit.
    at, tensors = found["read"]
    assert 1 <= at < steps
    assert {k.rsplit("/", 1)[0] for k in tensors} == set(params)
    for key, t in tensors.items():
        assert torch.equal(t, full[f"{at}/{key}"]), key
        assert t.dtype == full[f"{at}/{key}"].dtype
    # The lr change: applied at the step it names on both ranks, the next step its first.
    applied = found["lr"]
    assert applied["status"] == "applied", applied
    s = applied["step"]
    assert s == applied["args"]["at"]
    for rank in found["ranks"]:
        lrs = [row[0] for row in rank["lrs"]]
        assert lrs[s - 1] == 1e-2 and set(lrs[s:]) == {NEW_LR}, (s, lrs)
    # A snapshot (the gathered state and parameters at its step), restored later: at the
    # restore's step boundary every rank holds its part of the snapshot again.
    snap, restored = found["snapshot"], found["restored"]
    assert snap["status"] == "applied" and restored["status"] == "applied", (snap, restored)
    s, r = snap["step"], restored["step"]
    assert r > s and [(k["name"], k["step"]) for k in found["kept"]] == [("s1", s)]
    moved = False
    for key in [k.removeprefix(f"pre{r}/") for k in full if k.startswith(f"pre{r}/")]:
        assert torch.equal(full[f"pre{r}/{key}"], full[f"{s}/{key}"]), key
        moved = moved or not torch.equal(full[f"{r}/{key}"], full[f"{s}/{key}"])
    assert moved  # training had moved on: the restore put the snapshot back
    return signals


def test_fsdp2_ranks_report_one_run_merged_exactly(server: Spawned, tmp_path: Path) -> None:
    found = _steered(server.url, "fsdp", tmp_path, "fsdp")
    signals = _check_run(server.url, "fsdp", found)
    merge = signals["merge"]
    assert merge["ranks"] == [0, 1] and merge["world_size"] == 2 and not merge["partial"]
    assert "grad_norm" in merge["exact"] and "lr_eff_p99" in merge["bounds"]
    # Every step was merged from both ranks: the history's aggregate gradient norm is the
    # gathered gradients' at each step.
    history = httpx.get(f"{server.url}/v1/steppers/fsdp/history").json()["aggregate"]
    full, names = found["full"], {k.split("/")[1] for k in found["full"]}
    for step, value in zip(history["steps"], history["values"]["grad_norm"], strict=True):
        want = (
            sum(
                float(torch.linalg.vector_norm(full[f"{step}/{n}/grad"].double())) ** 2
                for n in names
            )
            ** 0.5
        )
        assert _close(value, want, want), step


def test_ddp_rank0_reports_and_both_ranks_apply_edits(server: Spawned, tmp_path: Path) -> None:
    found = _steered(server.url, "ddp", tmp_path, "ddp")
    signals = _check_run(server.url, "ddp", found)
    assert "merge" not in signals  # rank 0's own signals: the state is the same everywhere
