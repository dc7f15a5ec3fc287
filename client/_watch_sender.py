"""The watched run's sender: the one thread that talks to the service.

The training thread never does network I/O: it puts reports (and uploads) on a bounded
queue and returns. This thread posts them; when the queue is full the oldest report is
dropped and counted. A service that is slow, down, restarting or rejecting the run costs
the training job nothing but dropped reports: the sender backs off, counts, and tries
again. Commands the service sends back (in each report's reply) go to an inbox the training
thread empties at its next step boundary.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from . import codec
from .constants import API_PREFIX

__all__ = ["Counters", "Sender", "Upload"]

log = logging.getLogger("adamscope.watch")

#: Back-off after a failure: doubles from MIN to MAX seconds.
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0
#: Acknowledgements resent with every report (the latest): a reply lost to a reconnect
#: does not lose one, while the service keeps a command pending until acknowledged.
ACKS = 64


@dataclass
class Counters:
    """What happened to the run's reports (read them any time: plain ints)."""

    queued: int = 0
    sent: int = 0
    #: Dropped: pushed out of the full queue, or lost to a failed request.
    dropped: int = 0
    #: Requests that failed to reach the service (connection refused, timeout, 5xx).
    failures: int = 0
    #: Requests the service refused (4xx: no permission, a hosted stepper of that name).
    rejected: int = 0
    #: Commands applied between two steps; state uploads sent.
    applied: int = 0
    uploads: int = 0
    #: Errors inside the watch itself (signals, a command), logged, never raised.
    errors: int = 0
    last_error: str | None = None
    #: Ids of the commands this trainer applied (kept across reconnects: never twice).
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Upload:
    """Tensors answering a command (a state read, a snapshot), as safetensors."""

    command: str
    step: int
    tensors: dict[str, Any]
    #: More safetensors metadata (a distributed rank's: its rank, its shards' places).
    meta: dict[str, str] = field(default_factory=dict)


class Sender(threading.Thread):
    """Posts queued reports and uploads (see the module docstring)."""

    def __init__(
        self,
        http: httpx.Client,
        name: str,
        counters: Counters,
        on_commands: Callable[[list[dict[str, Any]]], None],
        maxsize: int = 64,
    ) -> None:
        super().__init__(name=f"adamscope-watch-{name}", daemon=True)
        self.http, self.run_name, self.counters = http, name, counters
        self.on_commands = on_commands
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._uploads: collections.deque[Upload] = collections.deque()
        self._maxsize = maxsize
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._backoff = 0.0
        self._path = f"{API_PREFIX}/watch/{name}"

    # ------------------------------------------------------------ training thread side

    def put(self, report: dict[str, Any]) -> None:
        """Queue a report; never blocks (the oldest is dropped when full)."""
        with self._cond:
            if len(self._queue) >= self._maxsize:
                self._queue.popleft()
                self.counters.dropped += 1
            self._queue.append(report)
            self.counters.queued += 1
            self._cond.notify()

    def put_upload(self, upload: Upload) -> None:
        with self._cond:
            self._uploads.append(upload)
            self._cond.notify()

    def close(self, timeout: float) -> None:
        """Send what is queued (for up to ``timeout`` seconds), then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self.join(timeout)

    def drain(self, timeout: float) -> bool:
        """Wait until the queue is empty and nothing is in flight (tests, close)."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._uploads or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    # ------------------------------------------------------------ this thread

    def run(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._uploads or self._closing):
                    self._cond.wait(1.0)
                if self._closing and not (self._queue or self._uploads):
                    return
                upload = self._uploads.popleft() if self._uploads else None
                report = None if upload else self._queue.popleft()
                self._busy = True
            try:
                ok = self._send_upload(upload) if upload else self._send_report(report)
            except Exception as e:  # noqa: BLE001 - the sender never dies
                ok = False
                self.counters.errors += 1
                self.counters.last_error = f"{type(e).__name__}: {e}"
                log.exception("watch sender")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            if not ok:
                self._pause()
            else:
                self._backoff = 0.0

    def _pause(self) -> None:
        self._backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self._backoff * 2))
        with self._cond:
            if not self._closing:
                self._cond.wait(self._backoff)

    def _failed(self, e: Exception | None, response: httpx.Response | None, what: str) -> None:
        if response is not None and response.status_code < 500:
            self.counters.rejected += 1
            self.counters.last_error = f"{what}: {response.status_code} {response.text[:300]}"
        else:
            self.counters.failures += 1
            self.counters.last_error = (
                f"{what}: {type(e).__name__}: {e}"
                if e is not None
                else f"{what}: {response.status_code if response is not None else '?'}"
            )

    def _send_report(self, report: dict[str, Any] | None) -> bool:
        assert report is not None
        report["acks"] = list(self.counters.acked.values())[-ACKS:]
        body = json.dumps(report).encode()  # NaN travels as Python's json writes it
        try:
            r = self.http.post(
                f"{self._path}/report",
                content=body,
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as e:
            self.counters.dropped += 1
            self._failed(e, None, "report")
            return False
        if r.status_code != 200:
            self.counters.dropped += 1
            self._failed(None, r, "report")
            return False
        self.counters.sent += 1
        commands = r.json().get("commands", [])
        if commands:
            self.on_commands(self._with_bodies(commands))
        return True

    def _with_bodies(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Commands that carry tensors (a state load) with their tensors fetched."""
        out = []
        for c in commands:
            if c.get("body") and c["id"] not in self.counters.acked:
                r = self.http.get(f"{self._path}/commands/{c['id']}/body")
                r.raise_for_status()
                c = {**c, "tensors": codec.decode(r.content)[0]}
            out.append(c)
        return out

    def _send_upload(self, upload: Upload | None) -> bool:
        assert upload is not None
        body = codec.encode(upload.tensors, {**upload.meta, "step": str(upload.step)})
        try:
            r = self.http.post(
                f"{self._path}/commands/{upload.command}/upload",
                content=body,
                headers={"Content-Type": "application/octet-stream"},
            )
        except httpx.HTTPError as e:
            self._failed(e, None, "upload")
            with self._cond:
                self._uploads.appendleft(upload)  # a state read waits for it: try again
            return False
        if r.status_code != 200:
            self._failed(None, r, "upload")
            return r.status_code < 500
        self.counters.uploads += 1
        return True
