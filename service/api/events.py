"""Live step events: the app's hub that fans them out to Server-Sent Events subscribers.

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
from typing import Any

from ..engine import Registry
from ..inspect.recorder import HistoryObserver, history_of
from .http.sse import sse_frame

__all__ = ["EventHub", "Subscription", "backlog", "event_stream"]

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


def shaped(event: dict[str, Any], sub: Subscription) -> dict[str, Any]:
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


async def event_stream(
    hub: EventHub,
    sub: Subscription,
    backlog: list[dict[str, Any]],
    *,
    resumed: bool,
    heartbeat: float,
    max_events: int | None = None,
    duration: float | None = None,
) -> AsyncIterator[bytes]:
    """The bytes of one subscriber's stream: ``open``, the backlog, then live events from
    its queue (a ``dropped`` event first when some were dropped), a keep-alive comment
    after ``heartbeat`` quiet seconds; until ``max_events`` step events or ``duration``."""
    yield f"retry: {RETRY_MS}\n".encode() + sse_frame(
        "open",
        {
            "epoch": hub.epoch,
            "steppers": sorted(sub.steppers) if sub.steppers else None,
            "resumed": resumed,
            "backlog": len(backlog),
        },
    )
    sent = 0
    deadline = math.inf if duration is None else time.monotonic() + duration
    for event in backlog:
        yield sse_frame("step", shaped(event, sub), f"{hub.epoch}-{event['seq']}")
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
            yield sse_frame("dropped", {"dropped": sub.dropped})
            sub.dropped = 0
        while sub.queue:
            kind, event = sub.queue.popleft()
            if kind != "step":
                yield sse_frame(kind, event)
                continue
            if event["seq"] <= sub.sent.get(event["stepper"], 0):
                continue  # already sent from the history (a resumed stream)
            sub.sent[event["stepper"]] = event["seq"]
            yield sse_frame("step", shaped(event, sub), f"{hub.epoch}-{event['seq']}")
            sent += 1
            if max_events is not None and sent >= max_events:
                return


def backlog(
    registry: Registry,
    hub: EventHub,
    sub: Subscription,
    resume: tuple[str, int] | None,
    replay: int,
) -> list[dict[str, Any]]:
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
