"""Frozen steppers (issue 16): an imported checkpoint kept as evidence refuses steps with a
409 ``stepper_frozen`` problem and stays byte-identical; reads and edits work; the kind is
changed with ``PATCH /v1/steppers/{name}`` and survives a restart of the service."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from adamscope.client import codec
from adamscope.service.app import create_app
from adamscope.service.settings import Settings

SPEC = {
    "name": "ev",
    "optimizer": "adamw",
    "kind": "frozen",
    "step": 7,
    "params": [{"name": "w", "shape": [3]}],
    "hyperparameters": {"lr": 0.1},
}


def _grads() -> bytes:
    return codec.encode({"w": torch.ones(3)})


def test_frozen_refuses_steps_and_changes_nothing(app_client: TestClient) -> None:
    r = app_client.post("/v1/steppers", json=SPEC)
    assert r.status_code == 201, r.text
    assert (r.json()["kind"], r.json()["step"]) == ("frozen", 7)
    before = app_client.get(
        "/v1/steppers/ev/state?with_params=true", headers={"accept": "application/octet-stream"}
    ).content
    r = app_client.post(
        "/v1/steppers/ev/step",
        content=_grads(),
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 409
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "stepper_frozen" and "PATCH /v1/steppers/ev" in r.json()["detail"]
    after = app_client.get(
        "/v1/steppers/ev/state?with_params=true", headers={"accept": "application/octet-stream"}
    ).content
    assert after == before
    assert app_client.get("/v1/steppers/ev").json()["step"] == 7
    # Edits are allowed on evidence (trying a fix).
    r = app_client.patch("/v1/steppers/ev/hyperparameters", json={"lr": 0.01})
    assert r.status_code == 200 and r.json()["groups"][0]["lr"] == 0.01


def test_patch_unfreezes_and_rejects_unknown_kinds(app_client: TestClient) -> None:
    app_client.post("/v1/steppers", json=SPEC)
    r = app_client.patch("/v1/steppers/ev", json={"kind": "watched"})
    assert r.status_code == 422 and r.json()["code"] == "request_validation_error"
    r = app_client.patch("/v1/steppers/ev", json={"kind": "hosted"})
    assert r.status_code == 200 and r.json()["kind"] == "hosted"
    r = app_client.post(
        "/v1/steppers/ev/step",
        content=_grads(),
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 200 and r.json()["step"] == 8


def test_a_negative_start_step_is_refused(app_client: TestClient) -> None:
    r = app_client.post("/v1/steppers", json={**SPEC, "step": -1})
    assert r.status_code == 422 and r.json()["code"] == "request_validation_error"
    assert app_client.get("/v1/steppers/ev").status_code == 404


def test_kind_and_step_survive_a_restart(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", device="cpu")
    with TestClient(create_app(settings)) as c:
        assert c.post("/v1/steppers", json=SPEC).status_code == 201
        assert c.post("/v1/steppers", json={**SPEC, "name": "ev2"}).status_code == 201
        assert c.patch("/v1/steppers/ev2", json={"kind": "hosted"}).status_code == 200
    with TestClient(create_app(settings)) as c:
        got = {s["name"]: (s["kind"], s["step"]) for s in c.get("/v1/steppers").json()["steppers"]}
        assert got == {"ev": ("frozen", 7), "ev2": ("hosted", 7)}
        r = c.post(
            "/v1/steppers/ev/step",
            content=_grads(),
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code == 409, json.dumps(r.json())
