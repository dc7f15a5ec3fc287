"""Every HTTP request counted, by method, route template and status, and timed.

A pure ASGI middleware (outermost, so requests refused before routing count too) records
into :class:`RequestStats`, which ``GET /metrics`` exposes.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_left

from fastapi import FastAPI
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..access import endpoints

__all__ = ["REQUEST_BUCKETS", "UNMATCHED", "RequestMetrics", "RequestStats", "install_metrics"]

UNMATCHED = "<unmatched>"
#: Request paths whose route template is remembered (then the memory starts over).
SEEN_PATHS = 4096

#: Request duration buckets (seconds).
REQUEST_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class RequestStats:
    """Request counts by (method, route, status) and durations by (method, route); updated
    on the event loop only, so no lock."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.durations: dict[tuple[str, str], list[float]] = {}  # buckets..., +Inf, sum
        self._routes: list[tuple[re.Pattern[str], str]] | None = None
        self._seen: dict[str, str] = {}  # path -> template

    def route_of(self, scope: Scope) -> str:
        """The template of the route that serves (or would serve) the request's path.

        Matched against the app's own route inventory rather than ``scope["route"]``
        (which lacks the router prefix for FastAPI's lazily included routers, and is not
        set for requests refused before routing); recent paths are remembered."""
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        hit = self._seen.get(path)
        if hit is not None:
            return hit
        if self._routes is None:
            app: FastAPI = scope["app"]
            paths = sorted({e.path for e in endpoints(app)})
            self._routes = [(compile_path(p)[0], p) for p in paths]
        template = next((t for regex, t in self._routes if regex.match(path)), UNMATCHED)
        if len(self._seen) >= SEEN_PATHS:
            self._seen.clear()
        self._seen[path] = template
        return template

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        self.counts[key] = self.counts.get(key, 0) + 1
        cells = self.durations.get((method, route))
        if cells is None:
            cells = self.durations[(method, route)] = [0.0] * (len(REQUEST_BUCKETS) + 2)
        cells[bisect_left(REQUEST_BUCKETS, seconds)] += 1
        cells[-1] += seconds


class RequestMetrics:
    """Pure ASGI middleware counting every HTTP request (outermost, so 401s count too)."""

    def __init__(self, app: ASGIApp, stats: RequestStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        finished: float | None = None

        async def sending(message: Message) -> None:
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = time.perf_counter()  # not the work a reply does after its bytes

        try:
            await self.app(scope, receive, sending)
        finally:
            # Until the reply's last byte was handed on: a step's deferred signals and history
            # run after that, inside the app's call, and are not the request's time.
            seconds = (finished if finished is not None else time.perf_counter()) - started
            self.stats.record(scope["method"], self.stats.route_of(scope), status, seconds)


def install_metrics(app: FastAPI) -> None:
    """Count requests (call after every other middleware is added: this one is outermost)."""
    stats = app.state.request_stats = RequestStats()
    app.add_middleware(RequestMetrics, stats=stats)
