"""A full device over HTTP: 507 ``device_out_of_memory`` with nothing changed (or
``partial`` when PyTorch's update had begun), never a 500; a deleted stepper's buffers
go; page-locked body buffers are allocated off the event loop.

No GPU runs here: PyTorch's out-of-memory error is injected where the allocation happens
(its own lazy state initialization inside the real step, the parameters' placement)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from api_support import (
    OCTET,
    SPEC,
    V1,
    assert_problem,
    create,
    create_body,
    grads,
    initial_values,
    registered,
    snapshot,
    step,
)
from fastapi.testclient import TestClient
from starlette.requests import Request

from adamscope.client import codec
from adamscope.client.errors import (
    DeviceOutOfMemoryError,
    InsufficientStorageError,
    error_from_problem,
)
from adamscope.service.api.http import ingest as ingest_module
from adamscope.service.engine import stepper as stepper_module
from adamscope.service.settings import Settings

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def fail_from(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, call: int) -> None:
    original = getattr(owner, name)
    calls = [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] >= call:
            raise torch.OutOfMemoryError(OOM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def test_a_step_the_device_cannot_hold_is_507_and_changes_nothing(
    app_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = initial_values()
    create(app_client, SPEC, values)
    before = snapshot(app_client, "net")
    fail_from(monkeypatch, torch, "zeros_like", call=2)  # group 0's first state, half made
    r = step(app_client, "net", grads(values, 0))
    body = assert_problem(r, "device_out_of_memory", "nothing was changed", OOM)
    assert r.status_code == 507 and body["partial"] is False
    error = error_from_problem(body)
    assert isinstance(error, DeviceOutOfMemoryError)
    assert isinstance(error, InsufficientStorageError)
    assert snapshot(app_client, "net") == before
    monkeypatch.undo()
    assert step(app_client, "net", grads(values, 0)).status_code == 200


def test_a_later_group_running_out_says_partial(
    app_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Groups step one after the other: when the second group's state cannot be made, the
    first has stepped, and the answer says so instead of claiming nothing changed."""
    values = initial_values()
    create(app_client, SPEC, values)
    fail_from(monkeypatch, torch, "zeros_like", call=5)  # w and b made theirs: h's fails
    body = assert_problem(
        step(app_client, "net", grads(values, 0)), "device_out_of_memory", "may be partly updated"
    )
    assert body["partial"] is True


def test_parameters_the_device_cannot_hold_create_nothing(
    app_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_from(monkeypatch, stepper_module, "_placed", call=3)
    for r in (
        app_client.post(V1, json={**SPEC, "name": "a"}),
        app_client.post(
            V1, content=create_body({**SPEC, "name": "b"}, initial_values()), headers=OCTET
        ),
    ):
        assert_problem(r, "device_out_of_memory", "placing the parameters of")
    assert registered(app_client) == []


def test_a_deleted_steppers_buffers_go(app_client: TestClient) -> None:
    values = initial_values()
    create(app_client, SPEC, values)
    stepper = app_client.app.state.registry.get("net")  # type: ignore[attr-defined]
    for k in range(2):
        assert step(app_client, "net", grads(values, k)).status_code == 200
    serving = app_client.app.state.serving  # type: ignore[attr-defined]
    assert serving.of(stepper).layout is not None and stepper.buffers.device_grads == {}
    stepper.grad_buffer("w")
    assert app_client.delete(f"{V1}/net").status_code == 204
    assert stepper not in serving._steppers
    assert stepper.buffers.staging == {}


def _request(body: bytes) -> Request:
    """A real Starlette request for ``body`` (the app holds the settings the reader asks)."""
    app = SimpleNamespace(state=SimpleNamespace(settings=Settings(device="cpu")))
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "app": app,
        "query_string": b"",
        "headers": [
            (b"content-type", OCTET["content-type"].encode()),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    return Request(scope, receive)


def test_page_locked_body_buffers_are_allocated_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cudaHostAlloc takes milliseconds for a large buffer: a GPU stepper's body buffer
    (``pin=True``) is made in a worker thread, never on the loop (here without pinning:
    no GPU; the thread is what is checked)."""
    where: list[tuple[bool, threading.Thread]] = []
    original = ingest_module.layout_buffer

    def recording(entries: Any, length: int, pin: bool) -> Any:
        where.append((pin, threading.current_thread()))
        return original(entries, length, False)

    monkeypatch.setattr(ingest_module, "layout_buffer", recording)
    tensors = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    body = codec.encode(tensors)

    async def ingest(pin: bool) -> tuple[Any, threading.Thread]:
        got = await ingest_module.ingest_layout(_request(body), None, None, lambda e: None, pin=pin)
        return got, threading.current_thread()

    for pin in (True, False):
        got, loop_thread = asyncio.run(ingest(pin))
        assert isinstance(got, ingest_module.WireLayout)
        assert all(torch.equal(got.tensors[n], t) for n, t in tensors.items())
        assert where[-1][0] is pin
        assert (where[-1][1] is not loop_thread) is pin  # pinned: off the loop; else inline
