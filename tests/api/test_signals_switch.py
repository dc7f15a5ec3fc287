"""ADAMSCOPE_SIGNALS=false: steps are recorded without per-step signals (and their cost)."""

import torch
from fastapi.testclient import TestClient

from adamscope.client import codec
from adamscope.service.app import create_app
from adamscope.service.settings import Settings


def _step_and_read(settings: Settings) -> dict:
    with TestClient(create_app(settings)) as c:
        r = c.post(
            "/v1/steppers",
            json={
                "name": "s",
                "params": [{"name": "w", "shape": [4]}],
                "durability": {"mode": "manual"},
            },
        )
        assert r.status_code == 201, r.text
        r = c.post(
            "/v1/steppers/s/step",
            content=codec.encode({"w": torch.ones(4)}),
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code == 200 and r.json()["step"] == 1
        return c.get("/v1/steppers/s/signals").json()


def test_signals_on_by_default_and_off_when_disabled(tmp_path):
    on = _step_and_read(Settings(data_dir=tmp_path / "a", device="cpu"))
    off = _step_and_read(Settings(data_dir=tmp_path / "b", device="cpu", signals=False))
    assert on["step"] == 1 and on["tensors"]["w"]["grad_norm"] == 2.0
    assert off["step"] == 1 and off["tensors"] == {}


def test_the_signals_reply_follows_every_step(tmp_path):
    """GET /signals reuses its rendered reply until the next step replaces the signals."""
    with TestClient(create_app(Settings(data_dir=tmp_path, device="cpu"))) as c:
        assert (
            c.post(
                "/v1/steppers", json={"name": "s", "params": [{"name": "w", "shape": [4]}]}
            ).status_code
            == 201
        )
        seen = []
        for k in range(1, 4):
            r = c.post(
                "/v1/steppers/s/step",
                content=codec.encode({"w": torch.full((4,), float(k))}),
                headers={"content-type": "application/octet-stream"},
            )
            assert r.status_code == 200
            first, again = c.get("/v1/steppers/s/signals"), c.get("/v1/steppers/s/signals")
            assert first.content == again.content
            seen.append(first.json())
        assert [s["step"] for s in seen] == [1, 2, 3]
        assert [s["tensors"]["w"]["grad_norm"] for s in seen] == [2.0, 4.0, 6.0]
