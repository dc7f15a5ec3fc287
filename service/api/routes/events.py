"""``GET /v1/events``: a live Server-Sent Events stream of step events, and the wiring that
gives every hosted stepper its signals and history.

Each step of a stepper becomes one ``step`` event::

    id: <epoch>-<seq>
    event: step
    data: {"stepper", "step", "seq", "time", "aggregate": {signal: value},
           "tensors": {name: {signal: value}}, "alerts": [...], "loss"?}

``tensors`` holds at most ``events_max_tensors`` tensors (``tensors_omitted`` counts the
rest; ``?tensor=`` picks which). Other events: ``open`` (first, with the stream's
``epoch``), ``loss`` (a client reported a loss), ``dropped`` (this client was too slow and
that many events were dropped; the oldest go first). A comment line is sent every
``heartbeat`` seconds so proxies and clients see the connection alive.

Resuming: a client that reconnects with ``Last-Event-ID`` (browsers' EventSource do) gets
the step events it missed first, from the history (as far as it reaches); after a service
restart (another epoch) it gets every retained event.

How events travel: the HistoryObserver runs in whatever thread stepped, under the stepper's
lock; it only hands ``(observer, seq)`` to :meth:`EventHub.notify`, which schedules the
dispatch on the event loop (``call_soon_threadsafe``). There the event is built once and
put in each interested subscriber's bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from adamscope.client.protocol import INT64_MAX

from ...engine import Registry, Stepper
from ...inspect.history import HistoryConfig, HistoryObserver, attach_history, history_of
from ...inspect.signals import attach_signals
from ...errors import problems
from ..access import authorize_name, principal, require
from .history import render_json

__all__ = ["EventHub", "Subscription", "attach_monitoring", "router", "start_monitoring"]

router = APIRouter(tags=["history"])

EVENT_STREAM = "text/event-stream"
#: Events waiting for one subscriber before the oldest are dropped.
QUEUE_SIZE = 1024
#: How long an EventSource waits before reconnecting (the stream's ``retry:``), in ms.
RETRY_MS = 2000


@dataclass(eq=False)
class Subscription:
    """One connected client: what it wants, and its bounded queue (oldest dropped)."""

    steppers: frozenset[str] | None
    reaches: Callable[[str], bool]
    tensors: list[str] | None
    max_tensors: int
    queue: deque[tuple[str, dict[str, Any]]]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: int = 0
    #: stepper -> highest seq already sent (resumed events are not sent twice)
    sent: dict[str, int] = field(default_factory=dict)

    def wants(self, stepper: str) -> bool:
        return (self.steppers is None or stepper in self.steppers) and self.reaches(stepper)

    def push(self, kind: str, event: dict[str, Any]) -> None:
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append((kind, event))
        self.wake.set()


class EventHub:
    """The service's fan-out of step events to SSE subscribers (one per app)."""

    def __init__(self, queue_size: int = 1024, max_tensors: int = 64) -> None:
        self.epoch = secrets.token_hex(4)
        self.queue_size = queue_size
        self.max_tensors = max_tensors
        self.loop: asyncio.AbstractEventLoop | None = None
        self.subscribers: set[Subscription] = set()
        self.dropped_total = 0
        self._seq = itertools.count(1)

    def next_seq(self) -> int:
        """The next event sequence number (thread-safe: ``next`` on a count is atomic)."""
        return next(self._seq)

    def notify(self, observer: HistoryObserver, seq: int) -> None:
        """From any thread: step ``seq`` of ``observer``'s stepper is recorded."""
        loop = self.loop
        if not self.subscribers or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(self._dispatch_step, observer, seq)

    def _dispatch_step(self, observer: HistoryObserver, seq: int) -> None:
        targets = [s for s in self.subscribers if s.wants(observer.name)]
        if not targets:
            return
        event = observer.event(seq)
        if event is None:
            return
        for sub in targets:
            self._push(sub, "step", event)

    def publish_loss(self, stepper: str, step: int, loss: float, when: float) -> None:
        """On the event loop: a client reported a loss."""
        event = {"stepper": stepper, "step": step, "loss": loss, "time": when}
        for sub in self.subscribers:
            if sub.wants(stepper):
                self._push(sub, "loss", event)

    def _push(self, sub: Subscription, kind: str, event: dict[str, Any]) -> None:
        before = sub.dropped
        sub.push(kind, event)
        self.dropped_total += sub.dropped - before

    def subscribe(self, sub: Subscription) -> None:
        self.subscribers.add(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)


# ---------------------------------------------------------------------- wiring


def attach_monitoring(app: FastAPI, stepper: Stepper) -> HistoryObserver:
    """Give a stepper its signals and its history, reporting to the app's event hub.
    Both are computed once the step's reply has left (``defer_after_step``): a step's
    latency is PyTorch's update, and the signals overlap the client's next forward pass."""
    hub: EventHub = app.state.events
    attach_signals(stepper).enabled = app.state.settings.signals
    stepper.defer_after_step = True
    return attach_history(stepper, app.state.history_config, sink=hub.notify,
                          sequence=hub.next_seq)


def install_events(app: FastAPI) -> None:
    """Create the app's event hub and history configuration (in ``create_app``)."""
    settings = app.state.settings
    app.state.history_config = HistoryConfig(steps=settings.history_steps,
                                             tensor_values=settings.history_tensor_values)
    app.state.events = EventHub(QUEUE_SIZE, settings.events_max_tensors)


def start_monitoring(app: FastAPI, registry: Registry) -> None:
    """In the lifespan, before steppers are restored: every stepper the registry admits
    (created, imported or restored) gets signals and history; events go to this loop."""
    app.state.events.loop = asyncio.get_running_loop()
    registry.hooks.append(lambda stepper: attach_monitoring(app, stepper))


# ---------------------------------------------------------------------- the stream


def _sse(kind: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\n".encode() + b"data: " + render_json(data) + b"\n\n"


def _shaped(event: dict[str, Any], sub: Subscription) -> dict[str, Any]:
    """The event with the tensors this subscriber wants, at most ``max_tensors`` of them."""
    tensors: dict[str, Any] = event.get("tensors", {})
    names = [n for n in (sub.tensors if sub.tensors is not None else tensors) if n in tensors]
    if len(names) <= sub.max_tensors and sub.tensors is None:
        return event
    kept = names[: sub.max_tensors]
    omitted = len(names) - len(kept) + event.get("tensors_omitted", 0)
    out = {**event, "tensors": {n: tensors[n] for n in kept}}
    if omitted:
        out["tensors_omitted"] = omitted
    else:
        out.pop("tensors_omitted", None)
    return out


class EventStreamResponse(Response):
    """``text/event-stream`` from an async iterator, which stops as soon as the client
    disconnects (a listener on ``receive`` cancels it); ``cleanup`` always runs."""

    media_type = EVENT_STREAM

    def __init__(self, body: AsyncIterator[bytes], cleanup: Callable[[], None],
                 status_code: int = 200) -> None:
        super().__init__(None, status_code, headers={"cache-control": "no-cache",
                                                     "x-accel-buffering": "no"})
        # Response(None) declares "content-length: 0", which a real server enforces: a
        # stream has no length.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._body = body
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self._body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            streaming = asyncio.ensure_future(stream())
            listening = asyncio.ensure_future(disconnected())
            try:
                done, _ = await asyncio.wait({streaming, listening},
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (streaming, listening):
                    task.cancel()
                for task in (streaming, listening):
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await task
            if streaming in done and not streaming.cancelled():
                streaming.result()  # a failure while streaming is not swallowed
        finally:
            self._cleanup()
            with contextlib.suppress(Exception):
                await self._body.aclose()  # type: ignore[attr-defined]


def _parse_last_id(value: str | None) -> tuple[str, int] | None:
    if value is None or not value.strip():
        return None
    epoch, sep, seq = value.strip().rpartition("-")
    if not sep or not seq.isdigit():
        raise RequestValidationError([{
            "loc": ["header", "Last-Event-ID"], "type": "value_error",
            "msg": f"{value!r} is not an id this stream sent ('<epoch>-<seq>')"}])
    return epoch, int(seq)


@router.get(
    "/events",
    summary="Live step events of every stepper (Server-Sent Events)",
    dependencies=[Depends(require("read"))],
    response_class=EventStreamResponse,
    responses={
        200: {"content": {EVENT_STREAM: {"schema": {"type": "string"}}},
              "description": "text/event-stream: events open, step, loss and dropped; "
                             "a comment every heartbeat"},
        **problems("request_validation_error"),
    },
)
async def events(
    request: Request,
    stepper: Annotated[list[str] | None, Query(
        description="only these steppers (default: every stepper the token reaches)")] = None,
    tensor: Annotated[list[str] | None, Query(
        description="only these tensors' signals in step events")] = None,
    replay: Annotated[int, Query(
        ge=0, le=100_000, description="first send the last N retained step events of each "
                                      "stepper")] = 0,
    heartbeat: Annotated[float | None, Query(
        ge=0.01, le=3600, description="seconds between keep-alive comments")] = None,
    max_events: Annotated[int | None, Query(
        ge=1, le=INT64_MAX, description="close the stream after this many step events")] = None,
    duration: Annotated[float | None, Query(
        ge=0, le=86_400, description="close the stream after this many seconds")] = None,
    last_event_id: Annotated[str | None, Header(
        alias="Last-Event-ID", max_length=100,
        description="resume after this event (sent by EventSource on reconnect)")] = None,
) -> Response:
    hub: EventHub = request.app.state.events
    settings = request.app.state.settings
    for name in stepper or []:
        authorize_name(request, name)
    resume = _parse_last_id(last_event_id)
    who = principal(request)
    sub = Subscription(
        steppers=frozenset(stepper) if stepper else None, reaches=who.reaches,
        tensors=list(tensor) if tensor else None, max_tensors=hub.max_tensors,
        queue=deque(maxlen=hub.queue_size))
    hub.subscribe(sub)  # before the history is read: nothing falls between the two
    try:
        backlog: list[dict[str, Any]] = []
        if resume is not None or replay:  # up to history_steps events per stepper: off loop
            backlog = await run_in_threadpool(_backlog, request.app.state.registry, hub, sub,
                                              resume, replay)
    except BaseException:
        hub.unsubscribe(sub)
        raise
    every = heartbeat if heartbeat is not None else settings.events_heartbeat

    stream = event_stream(hub, sub, backlog, resumed=resume is not None, heartbeat=every,
                          max_events=max_events, duration=duration)
    return EventStreamResponse(stream, lambda: hub.unsubscribe(sub))


async def event_stream(
    hub: EventHub, sub: Subscription, backlog: list[dict[str, Any]], *, resumed: bool,
    heartbeat: float, max_events: int | None = None, duration: float | None = None,
) -> AsyncIterator[bytes]:
    """The bytes of one subscriber's stream: ``open``, the backlog, then live events from
    its queue (a ``dropped`` event first when some were dropped), a keep-alive comment
    after ``heartbeat`` quiet seconds; until ``max_events`` step events or ``duration``."""
    yield f"retry: {RETRY_MS}\n".encode() + _sse("open", {
        "epoch": hub.epoch, "steppers": sorted(sub.steppers) if sub.steppers else None,
        "resumed": resumed, "backlog": len(backlog)})
    sent = 0
    deadline = math.inf if duration is None else time.monotonic() + duration
    for event in backlog:
        yield _sse("step", _shaped(event, sub), f"{hub.epoch}-{event['seq']}")
        sent += 1
        if max_events is not None and sent >= max_events:
            return
    while time.monotonic() < deadline:
        if not sub.queue:
            sub.wake.clear()
            wait = min(heartbeat, deadline - time.monotonic())
            try:
                await asyncio.wait_for(sub.wake.wait(), max(wait, 0))
            except TimeoutError:
                if time.monotonic() < deadline:
                    yield b": keep-alive\n\n"
                continue
        if sub.dropped:
            yield _sse("dropped", {"dropped": sub.dropped})
            sub.dropped = 0
        while sub.queue:
            kind, event = sub.queue.popleft()
            if kind != "step":
                yield _sse(kind, event)
                continue
            if event["seq"] <= sub.sent.get(event["stepper"], 0):
                continue  # already sent from the history (a resumed stream)
            sub.sent[event["stepper"]] = event["seq"]
            yield _sse("step", _shaped(event, sub), f"{hub.epoch}-{event['seq']}")
            sent += 1
            if max_events is not None and sent >= max_events:
                return


def _backlog(registry: Registry, hub: EventHub, sub: Subscription,
             resume: tuple[str, int] | None, replay: int) -> list[dict[str, Any]]:
    """Retained step events to send before live ones: those after the resumed id, or the
    last ``replay`` of each stepper; oldest first, each stepper's marked as sent."""
    if resume is None and not replay:
        return []
    after = None
    if resume is not None:
        after = resume[1] if resume[0] == hub.epoch else 0
    out: list[dict[str, Any]] = []
    for s in registry.list():
        if not sub.wants(s.name):
            continue
        s.settle()  # (a worker thread) its last step is in the history
        obs = history_of(s)
        if obs is None:
            continue
        found = obs.events(after_seq=after, last=replay or None)
        if found:
            sub.sent[s.name] = found[-1]["seq"]
        out.extend(found)
    out.sort(key=lambda e: e["seq"])
    return out
