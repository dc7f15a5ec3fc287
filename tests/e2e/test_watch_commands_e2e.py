"""A watched run's pending commands survive a SIGKILLed and restarted server (same port,
same data directory), and none is applied twice: one queued before the kill is applied
after the restart, once; one the trainer applied while the service was down (its
acknowledgement lost) is acknowledged again, never reapplied."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import torch

import adamscope
from adamscope.service.testing import free_port, spawned

NAME = "queued"


def _trainer(url: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, adamscope.Watch]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    return model, opt, adamscope.watch(opt, model=model, url=url, name=NAME, timeout=2.0)


def _step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, run: adamscope.Watch, wait: float = 5
) -> None:
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    run.flush(wait)


def _status(url: str, cid: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/watch/{NAME}/commands/{cid}")
    return dict(r.json()) if r.status_code == 200 else {"status": f"http {r.status_code}"}


def _until_settled(url: str, cid: str, step: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        step()
        c = _status(url, cid)
        if c["status"] in ("applied", "failed"):
            return c
    raise AssertionError(f"command {cid} did not settle: {_status(url, cid)}")


def _lr(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def _queue_and_kill(
    tmp_path: Path, lr: float, deliver: bool
) -> tuple[str, str, Path, int, torch.nn.Module, torch.optim.Optimizer, adamscope.Watch]:
    """A server with a watched run that took a step and has a command to change its lr
    queued (with ``deliver``: brought to the trainer by a report's reply), then SIGKILLed."""
    port, data = free_port(), tmp_path / "data"
    url = f"http://127.0.0.1:{port}"
    model, opt, run = _trainer(url)
    with spawned(data, port=port) as server:
        _step(model, opt, run)
        r = httpx.post(
            f"{url}/v1/watch/{NAME}/commands", json={"op": "options", "options": {"lr": lr}}
        )
        assert r.status_code == 202, r.text
        if deliver:
            run._report(None)
            assert run.flush(5)
        server.proc.kill()
        server.proc.wait(10)
    return str(r.json()["id"]), url, data, port, model, opt, run


def test_a_command_queued_before_a_kill_is_applied_once_after_the_restart(
    tmp_path: Path,
) -> None:
    cid, url, data, port, model, opt, run = _queue_and_kill(tmp_path, 5e-3, deliver=False)
    _step(model, opt, run, 0.5)  # the service is down: nothing arrives
    assert _lr(opt) == [1e-2] and run.counters.applied == 0
    with spawned(data, port=port):
        c = _until_settled(url, cid, lambda: _step(model, opt, run))
        assert c["status"] == "applied" and c["args"] == {"options": {"lr": 5e-3}}
        assert _lr(opt) == [5e-3]
        for _ in range(3):
            _step(model, opt, run)
        assert run.counters.applied == 1 and _status(url, cid)["status"] == "applied"
        assert httpx.get(f"{url}/v1/steppers/{NAME}").json()["groups"][0]["lr"] == 5e-3
    run.close()
    assert run.counters.errors == 0


def test_a_command_applied_while_the_service_was_down_is_not_applied_again(
    tmp_path: Path,
) -> None:
    # The trainer has the command; its acknowledgement will not arrive.
    cid, url, data, port, model, opt, run = _queue_and_kill(tmp_path, 2e-3, deliver=True)
    _step(model, opt, run, 0.5)  # applied at this step boundary; its report is lost
    assert _lr(opt) == [2e-3] and run.counters.applied == 1
    applied_at = run.counters.acked[cid]["step"]
    with spawned(data, port=port):
        c = _until_settled(url, cid, lambda: _step(model, opt, run))
        assert c["status"] == "applied" and c["step"] == applied_at
        for _ in range(3):
            _step(model, opt, run)
        assert run.counters.applied == 1  # acknowledged again, never applied twice
    run.close()
