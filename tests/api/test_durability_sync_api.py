"""Under the ``every_step`` policy, every change is on disk *before* its reply starts: the
new checkpoint's bytes fsynced, renamed into place, its directory fsynced, and only then
the response's first message sent (tests/disk_log.py records the calls; the real ones
run). A reply sent before the sync, or a sync dropped, is a change acknowledged and then
lost on power failure; the SIGKILL tests cannot tell.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from api_support import OCTET, SPEC, V1, create, create_body, initial_values, step
from disk_log import DiskLog, recording
from fastapi.testclient import TestClient
from httpx import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adamscope.client import codec
from adamscope.service.app import create_app
from adamscope.service.engine import checkpoint as ckpt
from adamscope.service.settings import Settings

NAME = SPEC["name"]


class ReplyMarker:
    """ASGI wrapper noting "reply" in the current log when a response starts."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log: DiskLog | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start" and self.log is not None:
                self.log.note("reply")
            await send(message)

        await self.app(scope, receive, marked if scope["type"] == "http" else send)


@pytest.fixture
def marker(settings: Settings) -> ReplyMarker:
    return ReplyMarker(create_app(settings))


@pytest.fixture
def client(marker: ReplyMarker) -> Iterator[TestClient]:
    with TestClient(marker) as c:
        create(c, SPEC, initial_values())
        r = c.post(f"{V1}/{NAME}/snapshots", json={"name": "base"})
        assert r.status_code == 201, r.text
        yield c


def checkpoint_path(settings: Settings, name: str = NAME) -> Path:
    return Path(settings.data_dir) / "steppers" / name / "checkpoint.safetensors"


def on_disk_step(path: Path) -> int:
    with open(path, "rb") as f:
        return int(ckpt.header_from_prefix(f.read)["step"])


def synced(
    marker: ReplyMarker, monkeypatch: pytest.MonkeyPatch, send: Callable[[], Response], status: int
) -> DiskLog:
    with recording(monkeypatch) as log:
        marker.log = log
        try:
            r = send()
        finally:
            marker.log = None
    assert r.status_code == status, r.text
    return log


def grads() -> dict[str, torch.Tensor]:
    return {n: torch.ones_like(v) for n, v in initial_values().items()}


def test_a_step_is_synced_before_its_reply(
    client: TestClient,
    marker: ReplyMarker,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = checkpoint_path(settings)
    for k, query in enumerate([{}, {"return_params": "true"}, {"expected_step": 2}], 1):
        log = synced(marker, monkeypatch, lambda q=query: step(client, NAME, grads(), **q), 200)
        log.synced_before(path, log.index("reply"))
        assert on_disk_step(path) == k


MUTATIONS: dict[str, tuple[Callable[[TestClient], Response], int]] = {
    "put-params": (
        lambda c: c.put(
            f"{V1}/{NAME}/params", content=codec.encode({"b": torch.zeros(3)}), headers=OCTET
        ),
        200,
    ),
    "put-state": (
        lambda c: c.put(
            f"{V1}/{NAME}/state",
            content=codec.encode({"b.exp_avg": torch.full((3,), 0.5)}),
            headers=OCTET,
        ),
        200,
    ),
    "hyperparameters": (lambda c: c.patch(f"{V1}/{NAME}/hyperparameters", json={"lr": 0.5}), 200),
    "reset-state": (lambda c: c.delete(f"{V1}/{NAME}/state"), 200),
    "restore": (lambda c: c.post(f"{V1}/{NAME}/snapshots/base/restore"), 200),
    "commit": (lambda c: c.post(f"{V1}/{NAME}/commit"), 200),
    "checkpoint": (lambda c: c.post(f"{V1}/{NAME}/checkpoint"), 200),
}


@pytest.mark.parametrize("kind", list(MUTATIONS))
def test_every_other_change_is_synced_before_its_reply(
    client: TestClient,
    marker: ReplyMarker,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    assert step(client, NAME, grads()).status_code == 200
    if kind == "commit":  # a pending contribution for commit to apply
        r = step(client, NAME, grads(), contributors=2, worker=0)
        assert r.status_code == 202, r.text
    send, status = MUTATIONS[kind]
    log = synced(marker, monkeypatch, lambda: send(client), status)
    log.synced_before(checkpoint_path(settings), log.index("reply"))


def test_create_and_import_are_synced_before_their_reply(
    client: TestClient,
    marker: ReplyMarker,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = create_body({**SPEC, "name": "made"}, initial_values())
    log = synced(marker, monkeypatch, lambda: client.post(V1, content=body, headers=OCTET), 201)
    log.synced_before(checkpoint_path(settings, "made"), log.index("reply"))
    data: Any = client.get(f"{V1}/{NAME}/snapshots/base").content
    log = synced(
        marker,
        monkeypatch,
        lambda: client.post(
            f"{V1}/import", params={"name": "imported"}, content=data, headers=OCTET
        ),
        201,
    )
    log.synced_before(checkpoint_path(settings, "imported"), log.index("reply"))
