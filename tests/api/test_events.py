"""``GET /v1/events`` through the real app in process: finite streams (``duration=0``,
``max_events``) of retained step events (replay and Last-Event-ID resume), filters, the
tensor cap, access control; and the event hub's fan-out and slow-consumer handling driven
directly on an event loop. Live delivery from a training loop to a real client over a real
server is tests/e2e/test_stream.py.
"""

from __future__ import annotations

import asyncio
import copy
import math
from collections import deque
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import SPEC, assert_problem, create, grads, initial_values, step
from fastapi.testclient import TestClient

from adamscope.client._sse import SSEParser
from adamscope.service.api.events import EventHub, Subscription, event_stream
from adamscope.service.app import create_app
from adamscope.service.inspect.signals import SIGNALS, signals_of
from adamscope.service.settings import Settings

VALUES = initial_values()


def parse(text: str) -> list[dict[str, Any]]:
    """Every event of a finished stream (heartbeat comments included)."""
    parser = SSEParser(heartbeats=True)
    out = []
    for line in text.split("\n"):
        event = parser.feed(line)
        if event is not None:
            out.append(event)
    return out


def stream(
    c: TestClient, headers: dict[str, str] | None = None, **params: Any
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    r = c.get("/v1/events", params={"duration": 0, **params}, headers=headers or {})
    return r, parse(r.text) if r.status_code == 200 else []


def steps_of(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["data"]["stepper"], e["data"]["step"]) for e in events if e["event"] == "step"]


@pytest.fixture
def two(app_client: TestClient) -> tuple[TestClient, dict[str, list[dict[str, Any]]]]:
    """Steppers net (3 steps) and other (2 steps), interleaved; the engine's signals of
    every step."""
    create(app_client, SPEC, VALUES)
    create(app_client, {**SPEC, "name": "other"}, VALUES)
    signals: dict[str, list[dict[str, Any]]] = {"net": [], "other": []}
    registry = app_client.app.state.registry  # type: ignore[attr-defined]
    for k, name in enumerate(["net", "other", "net", "other", "net"]):
        assert step(app_client, name, grads(VALUES, k)).status_code == 200
        signals[name].append(copy.deepcopy(signals_of(registry.get(name))))
    return app_client, signals


def test_a_stream_opens_then_replays_the_latest_step_events(
    two: tuple[TestClient, dict[str, list[dict[str, Any]]]],
) -> None:
    c, signals = two
    r, events = stream(c, replay=2)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.text.startswith("retry: 2000\n")
    opening = events[0]
    assert opening["event"] == "open" and opening["data"]["backlog"] == 4
    epoch = opening["data"]["epoch"]
    # the last two of each stepper, in the order they happened
    assert steps_of(events) == [("other", 1), ("net", 2), ("other", 2), ("net", 3)]
    seqs = [e["data"]["seq"] for e in events[1:]]
    assert seqs == sorted(seqs)
    for e in events[1:]:
        data = e["data"]
        assert e["id"] == f"{epoch}-{data['seq']}"
        expected = signals[data["stepper"]][data["step"] - 1]
        # the signals and each param group's schedule (group<i>.lr, ...)
        assert set(data["aggregate"]) == set(expected["aggregate"]) > set(SIGNALS)
        assert data["aggregate"]["group0.lr"] == expected["groups"][0]["lr"]
        assert set(data["tensors"]) == {"w", "b", "h"}
        for s in SIGNALS:
            a, b = data["aggregate"][s], expected["aggregate"][s]
            assert a == b or (math.isnan(a) and math.isnan(b))
        assert data["time"] == expected["time"] and data["alerts"] == []


def test_filters_and_max_events(two: tuple[TestClient, dict[str, list[dict[str, Any]]]]) -> None:
    c, _ = two
    _, events = stream(c, replay=10, stepper="net", tensor=["w", "h"])
    assert events[0]["data"]["steppers"] == ["net"]
    assert steps_of(events) == [("net", 1), ("net", 2), ("net", 3)]
    assert all(set(e["data"]["tensors"]) == {"w", "h"} for e in events[1:])
    _, events = stream(c, replay=10, max_events=2)
    assert len(steps_of(events)) == 2
    _, events = stream(c)  # no replay: nothing but the opening
    assert [e["event"] for e in events] == ["open"]


def test_resume_after_the_last_event_id(
    two: tuple[TestClient, dict[str, list[dict[str, Any]]]],
) -> None:
    c, _ = two
    _, events = stream(c, replay=10)
    epoch = events[0]["data"]["epoch"]
    assert steps_of(events) == [("net", 1), ("other", 1), ("net", 2), ("other", 2), ("net", 3)]
    third = events[3]["id"]
    _, resumed = stream(c, headers={"last-event-id": third})
    assert resumed[0]["data"]["resumed"] is True
    assert steps_of(resumed) == [("other", 2), ("net", 3)]
    _, resumed = stream(c, headers={"last-event-id": events[-1]["id"]})
    assert steps_of(resumed) == []
    # Another epoch (the service restarted since): everything it still has.
    _, restarted = stream(c, headers={"last-event-id": f"not{epoch}-3"})
    assert len(steps_of(restarted)) == 5


@pytest.mark.parametrize(
    ("params", "headers", "fragment"),
    [
        ({}, {"last-event-id": "garbage"}, "is not an id this stream sent"),
        ({"replay": -1}, {}, "replay"),
        ({"heartbeat": 0}, {}, "heartbeat"),
        ({"max_events": 0}, {}, "max_events"),
    ],
)
def test_bad_stream_requests_are_problems_and_subscribe_nothing(
    app_client: TestClient,
    params: dict[str, Any],
    headers: dict[str, str],
    fragment: str,
) -> None:
    r = app_client.get("/v1/events", params={"duration": 0, **params}, headers=headers)
    assert_problem(r, "request_validation_error", fragment)
    assert app_client.app.state.events.subscribers == set()  # type: ignore[attr-defined]


def test_a_finished_stream_unsubscribes(
    two: tuple[TestClient, dict[str, list[dict[str, Any]]]],
) -> None:
    c, _ = two
    hub = c.app.state.events  # type: ignore[attr-defined]
    stream(c, replay=1)
    stream(c, replay=5, max_events=1)
    assert hub.subscribers == set()


def test_step_events_carry_at_most_the_configured_tensors(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", device="cpu", events_max_tensors=2)
    with TestClient(create_app(settings)) as c:
        create(c, SPEC, VALUES)
        assert step(c, "net", grads(VALUES, 0)).status_code == 200
        _, events = stream(c, replay=1)
        data = events[1]["data"]
        assert list(data["tensors"]) == ["w", "b"] and data["tensors_omitted"] == 1
        _, events = stream(c, replay=1, tensor="h")
        assert list(events[1]["data"]["tensors"]) == ["h"]
        assert "tensors_omitted" not in events[1]["data"]


READ_A = "team-a-read-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


def test_a_prefixed_token_streams_only_its_steppers(tmp_path: Path) -> None:
    tokens = [
        {"token": READ_A, "scope": "read", "prefix": "team-a-"},
        {"token": ADMIN, "scope": "admin"},
    ]
    settings = Settings(data_dir=tmp_path / "d", device="cpu", tokens=tokens)
    with TestClient(create_app(settings)) as c:
        c.headers["authorization"] = f"Bearer {ADMIN}"
        for name in ("team-a-x", "team-b-y"):
            create(c, {**SPEC, "name": name}, VALUES)
            assert step(c, name, grads(VALUES, 0)).status_code == 200
        _, events = stream(c, replay=5)
        assert sorted(steps_of(events)) == [("team-a-x", 1), ("team-b-y", 1)]
        reader = {"authorization": f"Bearer {READ_A}"}
        _, events = stream(c, headers=reader, replay=5)
        assert steps_of(events) == [("team-a-x", 1)]
        r, _ = stream(c, headers=reader, stepper="team-b-y")
        assert_problem(r, "forbidden", "'team-b-y' does not")
        del c.headers["authorization"]
        r, _ = stream(c, replay=5)
        assert_problem(r, "unauthorized")


# ---------------------------------------------------------------------- the hub itself


class FakeObserver:
    """Stands in for a HistoryObserver: a name, and events by sequence number."""

    def __init__(self, name: str) -> None:
        self.name = name

    def event(self, seq: int) -> dict[str, Any]:
        return {
            "stepper": self.name,
            "step": seq,
            "seq": seq,
            "time": 0.0,
            "aggregate": {},
            "tensors": {},
            "alerts": [],
        }


def subscription(hub: EventHub, steppers: frozenset[str] | None = None) -> Subscription:
    return Subscription(
        steppers=steppers,
        reaches=lambda name: True,
        tensors=None,
        max_tensors=hub.max_tensors,
        queue=deque(maxlen=hub.queue_size),
    )


async def collect(stream_: Any, limit: int = 100) -> list[dict[str, Any]]:
    parser = SSEParser(heartbeats=True)
    out: list[dict[str, Any]] = []
    async for chunk in stream_:
        for line in chunk.decode().split("\n"):
            event = parser.feed(line)
            if event is not None:
                out.append(event)
        if len(out) >= limit:
            break
    return out


def test_a_slow_subscriber_loses_the_oldest_events_and_is_told() -> None:
    async def scenario() -> list[dict[str, Any]]:
        hub = EventHub(queue_size=3)
        hub.loop = asyncio.get_running_loop()
        slow = subscription(hub)
        other = subscription(hub, frozenset({"elsewhere"}))
        hub.subscribe(slow)
        hub.subscribe(other)
        obs = FakeObserver("net")
        for seq in range(1, 6):
            hub.notify(obs, seq)  # type: ignore[arg-type]  # as from a worker thread
        for _ in range(3):
            await asyncio.sleep(0)  # the dispatches notify scheduled on the loop run
        assert slow.dropped == 2 and len(slow.queue) == 3
        hub.publish_loss("net", 5, 0.5, 0.0)
        assert slow.dropped == 3 and hub.dropped_total == 3
        assert len(other.queue) == 0  # filtered out: not even queued
        gen = event_stream(hub, slow, [], resumed=False, heartbeat=60)
        events = await collect(gen, limit=5)
        await gen.aclose()
        hub.unsubscribe(slow)
        return events

    events = asyncio.run(scenario())
    assert [e["event"] for e in events] == ["open", "dropped", "step", "step", "loss"]
    assert events[1]["data"] == {"dropped": 3}
    assert [e["data"]["seq"] for e in events if e["event"] == "step"] == [4, 5]
    assert events[4]["data"] == {"stepper": "net", "step": 5, "loss": 0.5, "time": 0.0}


def test_keep_alive_comments_while_nothing_happens() -> None:
    async def scenario() -> list[dict[str, Any]]:
        hub = EventHub()
        sub = subscription(hub)
        gen = event_stream(hub, sub, [], resumed=False, heartbeat=0.01)
        events = await collect(gen, limit=3)
        await gen.aclose()
        return events

    events = asyncio.run(scenario())
    assert [e["event"] for e in events] == ["open", "heartbeat", "heartbeat"]
