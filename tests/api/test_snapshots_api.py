"""Durability over HTTP, in process: policies, explicit checkpoints, restarts on the same data
directory, named snapshots (take, list, download, restore, delete), and import.

"On disk" is checked by reading the stepper's checkpoint file in the data directory right
after the request that changed it, so a write that only happened at shutdown would not pass.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from api_support import (
    OCTET,
    SPEC,
    V1,
    assert_problem,
    create,
    get_params,
    get_state,
    grads,
    initial_values,
    registered,
    step,
)
from fastapi.testclient import TestClient

from adamscope.client import codec
from adamscope.client.protocol import META_CHECKPOINT
from adamscope.service.app import create_app
from adamscope.service.settings import Settings

NAME = SPEC["name"]
TIMES = ("created_at", "updated_at", "persisted_at")


def disk(settings: Settings, name: str = NAME) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stepper's checkpoint file: its tensors and its header."""
    path = settings.data_dir / "steppers" / name / "checkpoint.safetensors"
    tensors, meta = codec.decode(path.read_bytes())
    return tensors, json.loads(meta[META_CHECKPOINT])


def observed(
    client: TestClient, name: str = NAME
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Parameters, state and summary (without times) as a client sees them."""
    summary = client.get(f"{V1}/{name}").json()
    for key in TIMES:
        summary.pop(key)
    return get_params(client, name), get_state(client, name), summary


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, tuple | list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_disk_is_current(client: TestClient, settings: Settings, name: str = NAME) -> None:
    tensors, header = disk(settings, name)
    params, state, summary = observed(client, name)
    assert header["step"] == summary["step"] and summary["dirty"] is False
    assert_same({n: tensors[f"param/{n}"] for n in params}, params)
    assert_same({n: {k: tensors[f"state/{n}/{k}"] for k in s} for n, s in state.items()}, state)
    assert {k[len("state/") :] for k in tensors if k.startswith("state/")} == {
        f"{n}/{k}" for n, s in state.items() for k in s
    }


@pytest.fixture
def restart(settings: Settings) -> Iterator[Any]:
    """``restart()`` -> a fresh app (new process state) on the same data directory."""
    stack: list[TestClient] = []

    def start() -> TestClient:
        if stack:
            stack.pop().__exit__(None, None, None)
        c = TestClient(create_app(settings))
        c.__enter__()
        stack.append(c)
        return c

    yield start
    while stack:
        stack.pop().__exit__(None, None, None)


# ---------------------------------------------------------------------- policies


def test_every_step_puts_each_acknowledged_change_on_disk(
    app_client: TestClient, settings: Settings
) -> None:
    values = initial_values()
    summary = create(app_client, SPEC, values)
    assert summary["durability"] == {"mode": "every_step", "n": None, "seconds": None}
    assert summary["persisted_step"] == 0 and summary["dirty"] is False
    assert_disk_is_current(app_client, settings)
    for k in range(2):
        assert step(app_client, NAME, grads(values, k)).status_code == 200
        assert_disk_is_current(app_client, settings)
    changes = [
        lambda: app_client.put(
            f"{V1}/{NAME}/params", content=codec.encode({"b": torch.ones(3)}), headers=OCTET
        ),
        lambda: app_client.put(
            f"{V1}/{NAME}/state",
            content=codec.encode({"w.exp_avg": torch.full((2, 3), 0.5)}),
            headers=OCTET,
        ),
        lambda: app_client.patch(f"{V1}/{NAME}/hyperparameters", json={"lr": 0.5, "group": 1}),
        lambda: app_client.delete(f"{V1}/{NAME}/state", params={"name": "b"}),
    ]
    for change in changes:
        assert change().status_code == 200
        assert_disk_is_current(app_client, settings)
    _, header = disk(settings)
    assert header["groups"][1]["options"]["lr"] == 0.5


def test_every_n_and_manual_write_only_when_due(app_client: TestClient, settings: Settings) -> None:
    values = initial_values()
    create(app_client, {**SPEC, "durability": {"mode": "every_n", "n": 2}}, values)
    create(app_client, {**SPEC, "name": "hand", "durability": {"mode": "manual"}}, values)
    steps_on_disk: dict[str, list[int]] = {NAME: [], "hand": []}
    for k in range(5):
        for name, seen in steps_on_disk.items():
            assert step(app_client, name, grads(values, k)).status_code == 200
            seen.append(disk(settings, name)[1]["step"])
    assert steps_on_disk == {NAME: [0, 2, 2, 4, 4], "hand": [0, 0, 0, 0, 0]}
    summary = app_client.get(f"{V1}/hand").json()
    assert (summary["persisted_step"], summary["dirty"]) == (0, True)

    r = app_client.post(f"{V1}/hand/checkpoint")
    assert r.status_code == 200, r.text
    info = r.json()
    path = settings.data_dir / "steppers" / "hand" / "checkpoint.safetensors"
    assert info["step"] == 5 and info["size"] == path.stat().st_size
    assert_disk_is_current(app_client, settings, "hand")


def test_policy_can_be_changed_and_is_stored(app_client: TestClient, settings: Settings) -> None:
    values = initial_values()
    create(app_client, {**SPEC, "durability": {"mode": "manual"}}, values)
    step(app_client, NAME, grads(values, 0))
    r = app_client.put(f"{V1}/{NAME}/durability", json={"mode": "interval", "seconds": 30})
    assert r.status_code == 200, r.text
    assert r.json()["durability"] == {"mode": "interval", "n": None, "seconds": 30.0}
    _, header = disk(settings)  # changing the policy wrote the checkpoint, recording it
    assert header["durability"] == {"mode": "interval", "n": None, "seconds": 30.0}
    assert header["step"] == 1


@pytest.mark.parametrize(
    "policy",
    [
        {"mode": "every_n"},
        {"mode": "every_n", "n": 0},
        {"mode": "interval"},
        {"mode": "interval", "seconds": -1},
        {"mode": "every_step", "n": 3},
        {"mode": "manual", "seconds": 2},
        {"mode": "sometimes"},
        {"mode": "every_n", "n": 1.5},
    ],
)
def test_invalid_policies_are_rejected_and_change_nothing(
    app_client: TestClient, settings: Settings, policy: dict[str, Any]
) -> None:
    create(app_client, SPEC, initial_values())
    before = observed(app_client)
    file_before = disk(settings)
    assert_problem(
        app_client.put(f"{V1}/{NAME}/durability", json=policy), "request_validation_error"
    )
    r = app_client.post(V1, json={**SPEC, "name": "other", "durability": policy})
    assert_problem(r, "request_validation_error")
    assert registered(app_client) == [NAME]
    assert_same(observed(app_client), before)
    assert_same(disk(settings), file_before)


# ---------------------------------------------------------------------- restarts


def test_restart_restores_every_stepper_exactly(restart: Any, settings: Settings) -> None:
    client = restart()
    values = initial_values()
    create(client, SPEC, values)
    create(
        client,
        {**SPEC, "name": "w2", "optimizer": "adamw", "durability": {"mode": "every_n", "n": 3}},
        values,
    )
    create(client, {**SPEC, "name": "zeros"})  # JSON create, never stepped
    for k in range(4):
        step(client, NAME, grads(values, k))
        step(client, "w2", grads(values, k))
    client.patch(f"{V1}/{NAME}/hyperparameters", json={"lr": 0.2})
    before = {n: observed(client, n) for n in registered(client)}
    w2_at_3 = disk(settings, "w2")

    client = restart()  # graceful: the unwritten 4th step of w2 is flushed
    assert client.get("/healthz").json()["persistence"] == {
        "restored": 3,
        "failed": [],
        "failed_count": 0,
    }
    assert registered(client) == sorted(before)
    for n, seen in before.items():
        now = observed(client, n)
        assert (now[2].pop("persisted_step"), now[2].pop("dirty")) == (
            4 if n != "zeros" else 0,
            False,
        )
        del seen[2]["persisted_step"], seen[2]["dirty"]
        assert_same(now, seen, n)
    assert w2_at_3[1]["step"] == 3 and disk(settings, "w2")[1]["step"] == 4

    # ...and the restored steppers keep stepping like the originals would have.
    step(client, NAME, grads(values, 4))
    assert client.get(f"{V1}/{NAME}").json()["step"] == 5


def test_corrupt_checkpoint_is_skipped_and_reported(restart: Any, settings: Settings) -> None:
    client = restart()
    values = initial_values()
    for name in ("a", "b", "c"):
        create(client, {**SPEC, "name": name}, values)
        step(client, name, grads(values, 0))
    expected = {n: observed(client, n) for n in ("a", "c")}
    broken = settings.data_dir / "steppers" / "b" / "checkpoint.safetensors"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    stale = settings.data_dir / "steppers" / "a" / ".checkpoint.safetensors.abc123.tmp"
    stale.write_bytes(b"garbage from a write cut short")

    client = restart()
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["persistence"]["restored"] == 2
    [failure] = health["persistence"]["failed"]
    assert failure["stepper"] == "b" and "safetensors" in failure["error"]
    assert registered(client) == ["a", "c"]
    for n, seen in expected.items():
        assert_same(observed(client, n), seen, n)
    assert not stale.exists()
    assert_problem(
        client.post(V1, json={**SPEC, "name": "b"}), "stepper_exists", "could not be restored"
    )
    assert client.delete(f"{V1}/b").status_code == 204  # discard the broken files
    assert not broken.parent.exists()
    assert client.post(V1, json={**SPEC, "name": "b"}).status_code == 201


def test_delete_removes_the_directory(app_client: TestClient, settings: Settings) -> None:
    create(app_client, SPEC, initial_values())
    assert app_client.post(f"{V1}/{NAME}/snapshots", json={"name": "s"}).status_code == 201
    directory = settings.data_dir / "steppers" / NAME
    assert (directory / "snapshots" / "s.safetensors").is_file()
    assert app_client.delete(f"{V1}/{NAME}").status_code == 204
    assert not directory.exists()
    create(app_client, SPEC, initial_values())
    assert app_client.get(f"{V1}/{NAME}/snapshots").json()["snapshots"] == []


# ---------------------------------------------------------------------- snapshots


def test_snapshot_restore_rolls_back_exactly(app_client: TestClient, settings: Settings) -> None:
    values = initial_values()
    create(app_client, SPEC, values)
    for k in range(3):
        step(app_client, NAME, grads(values, k))
    r = app_client.post(f"{V1}/{NAME}/snapshots", json={"name": "at-3"})
    assert r.status_code == 201, r.text
    taken = r.json()
    path = settings.data_dir / "steppers" / NAME / "snapshots" / "at-3.safetensors"
    assert taken["name"] == "at-3" and taken["step"] == 3
    assert taken["size"] == path.stat().st_size and taken["error"] is None
    at_3 = observed(app_client)

    for k in range(3, 6):
        step(app_client, NAME, grads(values, k))
    app_client.patch(f"{V1}/{NAME}/hyperparameters", json={"lr": 0.9, "amsgrad": True})
    auto = app_client.post(f"{V1}/{NAME}/snapshots")
    assert auto.status_code == 201 and auto.json()["name"].startswith("step6-")
    at_6 = observed(app_client)

    r = app_client.get(f"{V1}/{NAME}/snapshots")
    assert [s["name"] for s in r.json()["snapshots"]] == ["at-3", auto.json()["name"]]
    assert [s["step"] for s in r.json()["snapshots"]] == [3, 6]

    r = app_client.post(f"{V1}/{NAME}/snapshots/at-3/restore")
    assert r.status_code == 200 and r.json()["step"] == 3
    assert_same(observed(app_client), at_3)
    assert_disk_is_current(app_client, settings)  # every_step: the roll back is on disk

    # Stepping on from the restored state repeats history exactly.
    for k in range(3, 6):
        step(app_client, NAME, grads(values, k))
    app_client.patch(f"{V1}/{NAME}/hyperparameters", json={"lr": 0.9, "amsgrad": True})
    assert_same(observed(app_client), at_6)


def test_download_and_import_reproduce_the_stepper(
    app_client: TestClient, settings: Settings
) -> None:
    values = initial_values()
    create(app_client, SPEC, values)
    for k in range(2):
        step(app_client, NAME, grads(values, k))
    app_client.post(f"{V1}/{NAME}/snapshots", json={"name": "s"})
    original = observed(app_client)

    r = app_client.get(f"{V1}/{NAME}/snapshots/s")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert 'filename="net-s.safetensors"' in r.headers["content-disposition"]
    stored = settings.data_dir / "steppers" / NAME / "snapshots" / "s.safetensors"
    assert r.content == stored.read_bytes()

    r = app_client.post(f"{V1}/import", content=r.content, headers=OCTET, params={"name": "copy"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "copy" and r.json()["persisted_step"] == 2
    params, state, summary = observed(app_client, "copy")
    assert_same((params, state), original[:2])
    assert {**summary, "name": NAME} == original[2]
    assert_disk_is_current(app_client, settings, "copy")


def test_snapshot_errors_are_problems_and_change_nothing(
    app_client: TestClient, settings: Settings
) -> None:
    values = initial_values()
    create(app_client, SPEC, values)
    step(app_client, NAME, grads(values, 0))
    app_client.post(f"{V1}/{NAME}/snapshots", json={"name": "s"})
    snap_file = settings.data_dir / "steppers" / NAME / "snapshots" / "s.safetensors"
    snap_bytes = snap_file.read_bytes()
    step(app_client, NAME, grads(values, 1))
    before = observed(app_client)

    assert_problem(
        app_client.post(f"{V1}/{NAME}/snapshots", json={"name": "s"}), "snapshot_exists", "'s'"
    )
    for method, path in [("post", "nope/restore"), ("get", "nope"), ("delete", "nope")]:
        r = getattr(app_client, method)(f"{V1}/{NAME}/snapshots/{path}")
        assert_problem(r, "snapshot_not_found", "'nope'")
    for bad in (".hidden", "a%20b", "x" * 200):
        assert_problem(app_client.get(f"{V1}/{NAME}/snapshots/{bad}"), "request_validation_error")
    assert_problem(
        app_client.post(f"{V1}/{NAME}/snapshots", json={"name": "../up"}),
        "request_validation_error",
    )
    assert_problem(app_client.post(f"{V1}/missing/snapshots"), "stepper_not_found")
    assert_problem(app_client.get(f"{V1}/missing/snapshots"), "stepper_not_found")

    # Imports: garbage, a plain safetensors file, a name that is taken, a bad device.
    assert_problem(
        app_client.post(f"{V1}/import", content=b"\x07" * 40, headers=OCTET), "invalid_checkpoint"
    )
    plain = codec.encode({"w": torch.zeros(2)})
    assert_problem(
        app_client.post(f"{V1}/import", content=plain, headers=OCTET),
        "invalid_checkpoint",
        "not an adamscope checkpoint",
    )
    assert_problem(
        app_client.post(f"{V1}/import", content=snap_bytes, headers=OCTET), "stepper_exists"
    )
    assert_problem(
        app_client.post(
            f"{V1}/import", content=snap_bytes, headers=OCTET, params={"name": "x", "device": "tpu"}
        ),
        "device_unavailable",
    )
    assert_problem(
        app_client.post(f"{V1}/import", content=snap_bytes, headers={"content-type": "text/plain"}),
        "unsupported_media_type",
    )
    assert_problem(app_client.post(f"{V1}/import", content=b"", headers=OCTET), "malformed_body")

    assert registered(app_client) == [NAME]
    assert_same(observed(app_client), before)
    assert snap_file.read_bytes() == snap_bytes
    assert [s["name"] for s in app_client.get(f"{V1}/{NAME}/snapshots").json()["snapshots"]] == [
        "s"
    ]

    assert app_client.delete(f"{V1}/{NAME}/snapshots/s").status_code == 204
    assert not snap_file.exists()
    assert app_client.get(f"{V1}/{NAME}/snapshots").json()["snapshots"] == []
    assert_same(observed(app_client), before)


def test_a_snapshot_of_another_layout_is_refused_on_restore(
    app_client: TestClient, settings: Settings
) -> None:
    """A snapshot file that does not fit the stepper (placed by hand) is invalid_checkpoint
    and leaves the stepper as it was; unreadable snapshot files are listed with an error."""
    values = initial_values()
    create(app_client, SPEC, values)
    other = {
        **SPEC,
        "name": "other",
        "params": [{"name": "w", "shape": [5], "dtype": "float32"}],
        "groups": None,
    }
    create(app_client, other)
    app_client.post(f"{V1}/other/snapshots", json={"name": "foreign"})
    snaps = settings.data_dir / "steppers"
    (snaps / NAME / "snapshots").mkdir()
    (snaps / "other" / "snapshots" / "foreign.safetensors").rename(
        snaps / NAME / "snapshots" / "foreign.safetensors"
    )
    (snaps / NAME / "snapshots" / "junk.safetensors").write_bytes(b"not a checkpoint")
    before = observed(app_client)
    assert_problem(
        app_client.post(f"{V1}/{NAME}/snapshots/foreign/restore"),
        "invalid_checkpoint",
        "does not fit",
    )
    assert_same(observed(app_client), before)
    listed = {s["name"]: s for s in app_client.get(f"{V1}/{NAME}/snapshots").json()["snapshots"]}
    assert listed["junk"]["step"] is None and listed["junk"]["error"]
    assert listed["foreign"]["step"] == 0


def test_interval_changes_reach_disk_without_further_requests(
    app_client: TestClient, settings: Settings
) -> None:
    """The background flusher writes an idle ``interval`` stepper once its time is up."""
    values = initial_values()
    create(app_client, {**SPEC, "durability": {"mode": "interval", "seconds": 3600}}, values)
    create(
        app_client,
        {**SPEC, "name": "soon", "durability": {"mode": "interval", "seconds": 0.2}},
        values,
    )
    for name in (NAME, "soon"):
        assert step(app_client, name, grads(values, 0)).status_code == 200
    deadline = time.monotonic() + 30
    while disk(settings, "soon")[1]["step"] != 1:
        assert time.monotonic() < deadline, "the flusher never wrote the interval stepper"
        time.sleep(0.05)
    assert_disk_is_current(app_client, settings, "soon")
    assert disk(settings)[1]["step"] == 0  # its hour is not up
