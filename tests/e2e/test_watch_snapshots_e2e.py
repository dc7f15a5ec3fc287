"""A watched run's snapshot survives a restart of a real server: the trainer's upload is
written to the data directory as a checkpoint file, listed by the restarted service once the
run reports again, and restored from there into the trainer's own optimizer, bit for bit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
import torch
from waiting import until

import adamscope
from adamscope.service.engine import checkpoint as checkpoints
from adamscope.service.testing import free_port, spawned

NAME = "durable-snap"


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 6)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _command(url: str, cid: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/watch/{NAME}/commands/{cid}")
    return dict(r.json()) if r.status_code == 200 else {"status": "unknown"}


def test_a_watched_snapshot_is_listed_and_restored_after_a_restart(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "data"
    url = f"http://127.0.0.1:{port}"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    kept: dict[int, tuple[dict[str, torch.Tensor], dict[Any, Any]]] = {}
    with spawned(data, port=port):
        run = adamscope.watch(opt, model=model, url=url, name=NAME, timeout=2.0)
        _step(model, opt)
        assert run.flush(10)
        r = httpx.post(f"{url}/v1/watch/{NAME}/commands", json={"op": "snapshot", "snapshot": "s1"})
        assert r.status_code == 202, r.text
        cid = r.json()["id"]

        def taken() -> dict[str, Any] | None:
            kept[run.step] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state))
            _step(model, opt)
            run.flush(10)
            c = _command(url, cid)
            return c if c["status"] != "pending" else None

        c = until("the snapshot", taken)
        assert c["status"] == "applied", c
        again = httpx.post(
            f"{url}/v1/watch/{NAME}/commands", json={"op": "snapshot", "snapshot": "s1"}
        )
        assert again.status_code == 409 and again.json()["code"] == "snapshot_exists"
    # The service is stopped: the snapshot is a checkpoint file in its data directory.
    path = data / "steppers" / NAME / "snapshots" / "s1.safetensors"
    with open(path, "rb") as f:
        header = checkpoints.header_from_prefix(f.read)
    assert header["step"] == c["step"] and header["extra"] == {"kind": "watched"}
    for _ in range(3):
        _step(model, opt)  # training goes on while the service is down
    with spawned(data, port=port):

        def listed() -> list[dict[str, Any]] | None:
            _step(model, opt)
            run.flush(10)
            r = httpx.get(f"{url}/v1/watch/{NAME}/snapshots")
            return list(r.json()["snapshots"]) if r.status_code == 200 else None

        snaps = until("the run to report again", listed)
        assert [(s["name"], s["step"]) for s in snaps] == [("s1", c["step"])]
        hosted = httpx.get(f"{url}/v1/steppers/{NAME}/snapshots").json()["snapshots"]
        assert [s["name"] for s in hosted] == ["s1"]
        assert httpx.get(f"{url}/v1/steppers/{NAME}/snapshots/s1").content == path.read_bytes()
        r = httpx.post(f"{url}/v1/watch/{NAME}/commands", json={"op": "restore", "snapshot": "s1"})
        assert r.status_code == 202, r.text
        rid = r.json()["id"]

        def restored() -> dict[str, Any] | None:
            run._report(None)  # a step boundary without a step: the reply brings the load
            run.flush(10)
            opt.step()  # no gradients: PyTorch skips every parameter; the pre-hook applies
            c = _command(url, rid)
            return c if c["status"] != "pending" else None

        assert until("the restore", restored)["status"] == "applied"
        params_then, state_then = kept[c["step"]]
        for n, p in model.named_parameters():
            assert torch.equal(p, params_then[n]), n
            for k, v in state_then[p].items():
                assert torch.equal(opt.state[p][k], v), (n, k)
        run.close()
        assert run.counters.errors == 0
