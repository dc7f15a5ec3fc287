"""A watched run's snapshots in the data directory, through the real app in process: the
trainer's upload is checked against the run's layout before it is written, and the hosted
snapshot routes list, download and delete them but refuse to take or restore one (that is
the trainer's work: a command)."""

from __future__ import annotations

from pathlib import Path

import httpx
import torch
from api_support import assert_problem
from fastapi.testclient import TestClient
from test_watch_metadata_api import report

from adamscope.client import codec
from adamscope.service.engine import checkpoint as checkpoints

W = "/v1/watch"
S = "/v1/steppers"


def _queued(c: TestClient, snap: str) -> str:
    r = c.post(f"{W}/run/commands", json={"op": "snapshot", "snapshot": snap})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _upload(
    c: TestClient, cid: str, tensors: dict[str, torch.Tensor], step: int = 4
) -> httpx.Response:
    body = codec.encode(tensors, {"step": str(step)})
    return c.post(f"{W}/run/commands/{cid}/upload", content=body)


def test_an_upload_is_written_as_a_checkpoint_file_of_the_run(
    app_client: TestClient, tmp_path: Path
) -> None:
    c = app_client
    assert c.post(f"{W}/run/report", json=report([[3], [2, 2]], step=4)).status_code == 200
    cid = _queued(c, "s1")
    p0, p1 = torch.arange(3.0), torch.ones(2, 2)
    state = {"p0/exp_avg": p0 * 2, "p0/exp_avg_sq": p0 * 3, "p0/step": torch.tensor(4.0)}
    r = _upload(c, cid, {"p0/param": p0, "p1/param": p1, **state})
    assert r.status_code == 200, r.text
    path = tmp_path / "data" / "steppers" / "run" / "snapshots" / "s1.safetensors"
    ckpt = checkpoints.decode(path.read_bytes())
    assert ckpt.step == 4 and ckpt.header["snapshot"] == "s1"
    assert [(n, t.tolist()) for n, t in ckpt.params] == [("p0", p0.tolist()), ("p1", p1.tolist())]
    assert torch.equal(ckpt.state["p0"]["exp_avg_sq"], p0 * 3) and "p1" not in ckpt.state
    listed = c.get(f"{W}/run/snapshots").json()["snapshots"]
    assert [(s["name"], s["step"], s["bytes"]) for s in listed] == [("s1", 4, path.stat().st_size)]
    assert c.get(f"{S}/run/snapshots/s1").content == path.read_bytes()
    assert_problem(
        c.post(f"{W}/run/commands", json={"op": "snapshot", "snapshot": "s1"}), "snapshot_exists"
    )
    restore = c.post(f"{W}/run/commands", json={"op": "restore", "snapshot": "s1"})
    assert restore.status_code == 202
    sent = c.get(f"{W}/run/commands/{restore.json()['id']}/body").content
    tensors, _ = codec.decode(sent)
    assert sorted(tensors) == ["p0/exp_avg", "p0/exp_avg_sq", "p0/param", "p0/step", "p1/param"]
    assert torch.equal(tensors["p0/exp_avg"], p0 * 2)
    assert c.delete(f"{S}/run/snapshots/s1").status_code == 204
    assert not path.exists()
    assert_problem(
        c.post(f"{W}/run/commands", json={"op": "restore", "snapshot": "s1"}), "snapshot_not_found"
    )


def test_an_upload_that_does_not_fit_the_run_is_refused_and_fails_its_command(
    app_client: TestClient, tmp_path: Path
) -> None:
    c = app_client
    assert c.post(f"{W}/run/report", json=report([[3]])).status_code == 200
    for snap, tensors in (
        ("shape", {"p0/param": torch.zeros(4)}),
        ("dtype", {"p0/param": torch.zeros(3, dtype=torch.float64)}),
        ("missing", {"p0/exp_avg": torch.zeros(3)}),
        ("unknown", {"p0/param": torch.zeros(3), "q/param": torch.zeros(3)}),
        ("key", {"p0/param": torch.zeros(3), "p0/momentum": torch.zeros(3)}),
    ):
        cid = _queued(c, snap)
        assert_problem(_upload(c, cid, tensors), "invalid_checkpoint")
        assert c.get(f"{W}/run/commands/{cid}").json()["status"] == "failed"
    assert c.get(f"{W}/run/snapshots").json()["snapshots"] == []
    assert not (tmp_path / "data" / "steppers" / "run" / "snapshots").exists() or not any(
        (tmp_path / "data" / "steppers" / "run" / "snapshots").iterdir()
    )
    bad = c.post(f"{W}/run/commands", json={"op": "snapshot", "snapshot": "../escape"})
    assert_problem(bad, "invalid_spec")


def test_the_hosted_snapshot_routes_refuse_what_only_the_trainer_can_do(
    app_client: TestClient,
) -> None:
    c = app_client
    assert c.post(f"{W}/run/report", json=report([[3]])).status_code == 200
    assert c.get(f"{S}/run/snapshots").json()["snapshots"] == []
    for r in (
        c.post(f"{S}/run/snapshots", json={"name": "x"}),
        c.post(f"{S}/run/snapshots/x/restore"),
        c.post(f"{S}/run/checkpoint"),
        c.put(f"{S}/run/durability", json={"mode": "manual"}),
    ):
        assert_problem(r, "stepper_watched", "commands")
    assert_problem(c.get(f"{S}/run/snapshots/x"), "snapshot_not_found")
