"""Route guards found by mutation testing (benchmarks/mutation.py): each test failed for a
mutant of the tensor routes' helpers (then service/api/tensors.py, steppers.py, stream.py,
wire.py; now api/routes/, api/serving.py and api/http/) that the other API tests let through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from api_support import OCTET, SPEC, V1, assert_problem, create, initial_values, snapshot, step
from fastapi.testclient import TestClient
from starlette.types import Message

from adamscope.client import codec
from adamscope.service.api import serving
from adamscope.service.api.http.reply import TAIL_COPY_BYTES, TensorStreamResponse
from adamscope.service.app import create_app
from adamscope.service.settings import Settings

NAME = SPEC["name"]


@pytest.fixture
def served(app_client: TestClient) -> TestClient:
    create(app_client, SPEC, initial_values())
    assert (
        step(
            app_client, NAME, {n: torch.ones_like(v) for n, v in initial_values().items()}
        ).status_code
        == 200
    )
    return app_client


# ---------------------------------------------------------------------- state keys


def test_state_keys_of_dotted_parameter_names(app_client: TestClient) -> None:
    """'<parameter>.<key>' splits at the last dot: 'enc.layer.0.w.exp_avg'."""
    spec = {
        "name": "dotted",
        "optimizer": "adam",
        "params": [{"name": "enc.layer.0.w", "shape": [3]}],
    }
    create(app_client, spec)
    r = app_client.put(
        f"{V1}/dotted/state",
        content=codec.encode({"enc.layer.0.w.exp_avg": torch.full((3,), 0.5)}),
        headers=OCTET,
    )
    assert r.status_code == 422, r.text  # accepted by the split, refused by the engine:
    assert_problem(r, "invalid_state", "state of 'enc.layer.0.w' would lack step, exp_avg_sq")


@pytest.mark.parametrize("key", [".exp_avg", "exp_avg"])
def test_a_state_key_without_a_parameter_is_refused(served: TestClient, key: str) -> None:
    before = snapshot(served, NAME)
    r = served.put(f"{V1}/{NAME}/state", content=codec.encode({key: torch.ones(3)}), headers=OCTET)
    assert_problem(
        r,
        "invalid_state",
        f"state tensor {key!r} must be named "
        "'<parameter>.<key>' with key one of step, exp_avg, exp_avg_sq, "
        "max_exp_avg_sq",
    )
    assert snapshot(served, NAME) == before


# ---------------------------------------------------------------------- JSON tensors


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"data": [1, 2, 3], "shape": [1, 3]}, "tensor data has shape [3], expected [1, 3]"),
        ({"shape": [3]}, "a JSON tensor object needs 'data'"),
        ({"data": [1, 2, 3], "shape": "3"}, "a JSON tensor's shape must be a list, got '3'"),
    ],
)
def test_json_tensors_are_checked_against_what_they_declare(
    served: TestClient, value: dict[str, Any], fragment: str
) -> None:
    before = snapshot(served, NAME)
    for r in (
        served.put(f"{V1}/{NAME}/params", json={"params": {"b": value}}),
        served.put(f"{V1}/{NAME}/state", json={"state": {"b": {"exp_avg": value}}}),
    ):
        assert assert_problem(r, "malformed_body")["detail"] == fragment
    assert snapshot(served, NAME) == before


def test_a_json_tensor_may_declare_its_dtype_and_shape(served: TestClient) -> None:
    r = served.put(
        f"{V1}/{NAME}/params",
        json={"params": {"b": {"data": [1.5, 2.5, 3.5], "shape": [3], "dtype": "float32"}}},
    )
    assert r.status_code == 200, r.text
    assert served.get(f"{V1}/{NAME}/params", params={"format": "json"}).json()["params"]["b"][
        "data"
    ] == [1.5, 2.5, 3.5]


# ---------------------------------------------------------------------- limits at the edge


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path / "d", device="cpu", max_json_elements=6, max_body_bytes=4096
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_json_replies_up_to_the_element_limit(tight: TestClient) -> None:
    create(
        tight,
        {
            "name": "six",
            "optimizer": "adam",
            "params": [{"name": "a", "shape": [2, 3]}, {"name": "b", "shape": [1]}],
        },
    )
    ok = tight.get(f"{V1}/six/params", params={"name": "a", "format": "json"})
    assert ok.status_code == 200 and ok.json()["params"]["a"]["shape"] == [2, 3]
    body = assert_problem(
        tight.get(f"{V1}/six/params", params={"format": "json"}),
        "json_too_large",
        "7 elements exceed the JSON limit of 6; request format=safetensors instead",
    )
    assert body["limit"] == 6


def test_a_json_create_up_to_the_body_limit(tight: TestClient) -> None:
    """1024 float32 zeros are exactly 4096 bytes: allowed; one more element is not."""
    for n, status in ((1024, 201), (1025, 413)):
        r = tight.post(
            V1, json={"name": f"z{n}", "optimizer": "adam", "params": [{"name": "w", "shape": [n]}]}
        )
        assert r.status_code == status, r.text


# ---------------------------------------------------------------------- accumulate mode


def test_a_pending_contribution_answers_202_not_applied(served: TestClient) -> None:
    r = step(served, NAME, {"b": torch.ones(3)}, contributors=3, worker=1)
    assert r.status_code == 202
    assert r.json() == {
        "stepper": NAME,
        "step": 1,
        "stepped": [],
        "skipped": [],
        "replayed": False,
        "applied": False,
        "pending": [1],
    }


# ---------------------------------------------------------------------- streamed replies


def _response(sizes: list[int]) -> TensorStreamResponse:
    tensors = {f"t{i}": torch.arange(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    return TensorStreamResponse(tensors, "s", 3)


@pytest.mark.parametrize(
    "sizes",
    [
        [10],
        [TAIL_COPY_BYTES + 100],
        [700_000, 700_000],
        [3 * TAIL_COPY_BYTES, 5, TAIL_COPY_BYTES // 2],
    ],
)
def test_a_streamed_reply_sends_its_last_bytes_as_a_copy(sizes: list[int]) -> None:
    """Everything but the last TAIL_COPY_BYTES goes out as views of tensor memory; the tail
    is one copied ``bytes`` object (so the transport holds no view when the gate opens)."""
    r = _response(sizes)
    whole = b"".join(bytes(p) for p in r._parts)
    parts = r._parts_with_copied_tail()
    assert b"".join(bytes(p) for p in parts) == whole
    *views, tail = parts
    assert isinstance(tail, bytes) and len(tail) == min(len(whole), TAIL_COPY_BYTES)
    assert all(isinstance(v, memoryview) for v in views)
    assert sum(v.nbytes for v in views) == len(whole) - len(tail)


def test_a_streamed_reply_ends_its_body_then_releases() -> None:
    r = _response([10, 20])
    sent: list[Message] = []
    released: list[int] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def release() -> None:
        released.append(len(sent))

    r._release = release

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    asyncio.run(r({"type": "http"}, receive, send))
    start, *bodies, end = sent
    assert start["type"] == "http.response.start" and start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-length"] == str(sum(len(b["body"]) for b in bodies)).encode()
    assert headers[b"x-adamscope-step"] == b"3"
    assert all(
        b == {"type": "http.response.body", "body": b["body"], "more_body": True} for b in bodies
    )
    assert end == {"type": "http.response.body", "body": b"", "more_body": False}
    assert released == [len(sent)]
    tensors, meta = codec.decode(b"".join(b["body"] for b in bodies))
    assert meta == {"adamscope.stepper": "s", "adamscope.step": "3"}
    assert [t.numel() for t in tensors.values()] == [10, 20]


def test_the_applied_event_is_shared_until_the_step_is_applied(served: TestClient) -> None:
    stepper = served.app.state.registry.get(NAME)  # type: ignore[attr-defined]
    state: serving.ServingState = served.app.state.serving  # type: ignore[attr-defined]
    waits = [state.next_step(stepper)]
    first = state.of(stepper).applied
    waits.append(state.next_step(stepper))
    assert first is not None and state.of(stepper).applied is first
    state.step_applied(stepper)
    assert first.is_set()
    waits.append(state.next_step(stepper))
    assert state.of(stepper).applied is not first
    for w in waits:  # never awaited here
        w.close()  # type: ignore[attr-defined]


def test_a_json_body_must_be_an_object(served: TestClient) -> None:
    r = served.put(
        f"{V1}/{NAME}/params", content=b"[1, 2]", headers={"content-type": "application/json"}
    )
    assert assert_problem(r, "malformed_body")["detail"] == "JSON body must be an object"


# ---------------------------------------------------------------------- the flusher


def _dirty(client: TestClient, name: str) -> bool:
    return bool(client.get(f"{V1}/{name}").json()["dirty"])


def _wait_clean(client: TestClient, name: str, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _dirty(client, name):
            return True
        time.sleep(0.05)
    return False


def test_the_background_flusher_writes_interval_steppers_and_outlives_a_failure(
    app_client: TestClient,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An 'interval' stepper changed outside any request (so no request writes it) is
    written by the background flusher; a flush that raises is logged and the flusher
    goes on."""
    spec = {**SPEC, "name": "idle", "durability": {"mode": "interval", "seconds": 0.01}}
    create(app_client, spec, initial_values())
    persistence = app_client.app.state.persistence  # type: ignore[attr-defined]
    real = persistence.flush_due
    failed = []

    def flaky() -> int:
        if not failed:
            failed.append(True)
            raise OSError("disk on fire")
        return int(real())

    monkeypatch.setattr(persistence, "flush_due", flaky)
    with caplog.at_level(logging.ERROR, logger="adamscope.persistence"):
        app_client.app.state.registry.get("idle").step(  # type: ignore[attr-defined]
            {"b": torch.ones(3)}
        )
        assert _wait_clean(app_client, "idle"), "the flusher never wrote the stepper"
    assert failed and [
        rec.getMessage() for rec in caplog.records if rec.name == "adamscope.persistence"
    ] == ["background flush failed"]
