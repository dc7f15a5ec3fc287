"""``GET /metrics``: the service in Prometheus' text exposition format (version 0.0.4).

Needs the ``read`` scope (a scrape config sends a read token as its bearer token); a token
restricted to a name prefix sees only its steppers' series. Label cardinality is bounded:
per-stepper series carry only ``stepper`` (and ``signal``, from the fixed set of aggregate
signals), for at most ``metrics_max_steppers`` steppers (the first by name; the number left
out is ``adamscope_metrics_steppers_omitted``); request series carry method, route
*template* and status.

Series:

- ``adamscope_steppers``: steppers hosted (that the token reaches);
- ``adamscope_stepper_step``, ``adamscope_stepper_parameters``: each stepper's step and size;
- ``adamscope_stepper_steps_total``: steps applied since the service started;
- ``adamscope_step_duration_seconds``: histogram of the engine's step time (PyTorch's
  update plus the signals computed with it);
- ``adamscope_signal{stepper,signal}``: the latest aggregate value of every signal;
- ``adamscope_loss``: the latest loss a client reported;
- ``adamscope_alerts_total`` and ``adamscope_alerts_active``;
- ``adamscope_http_requests_total{method,route,status}`` and
  ``adamscope_http_request_duration_seconds{method,route}`` (a pure ASGI middleware sees
  every request, refused ones included);
- ``adamscope_event_subscribers``, ``adamscope_events_dropped_total`` (the SSE stream).
"""

from __future__ import annotations

import math
import re
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ... import __version__
from ...inspect.history import LATENCY_BUCKETS, history_of
from ..access import endpoints, require, visible
from ..http.stream import settled

__all__ = ["CONTENT_TYPE", "RequestMetrics", "RequestStats", "router"]

router = APIRouter(tags=["service"])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED = "<unmatched>"
#: Request paths whose route template is remembered (then the memory starts over).
SEEN_PATHS = 4096

#: Request duration buckets (seconds).
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


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
            path = path[len(root):]
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

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.stats.record(scope["method"], self.stats.route_of(scope), status,
                              time.perf_counter() - started)


def install_metrics(app: FastAPI) -> None:
    """Count requests (call after every other middleware is added: this one is outermost)."""
    stats = app.state.request_stats = RequestStats()
    app.add_middleware(RequestMetrics, stats=stats)


# ---------------------------------------------------------------------- exposition


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Families:
    """Collects samples per metric family, written with their HELP and TYPE lines."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_text: str, value: float, **labels: str) -> None:
        family = self._families.setdefault(name, (kind, help_text, []))
        family[2].append(f"{name}{_labels(**labels)} {_number(value)}")

    def histogram(self, name: str, help_text: str, bounds: Iterable[float],
                  cumulative: list[float], total: float, **labels: str) -> None:
        family = self._families.setdefault(name, ("histogram", help_text, []))
        lines = family[2]
        for bound, count in zip([*bounds, math.inf], cumulative, strict=True):
            le = "+Inf" if math.isinf(bound) else repr(float(bound))
            lines.append(f"{name}_bucket{_labels(**labels, le=le)} {_number(count)}")
        lines.append(f"{name}_sum{_labels(**labels)} {_number(total)}")
        lines.append(f"{name}_count{_labels(**labels)} {_number(cumulative[-1])}")

    def declare(self, name: str, kind: str, help_text: str) -> None:
        self._families.setdefault(name, (kind, help_text, []))

    def lines(self) -> Iterator[str]:
        for name, (kind, help_text, samples) in self._families.items():
            yield f"# HELP {name} {help_text}"
            yield f"# TYPE {name} {kind}"
            yield from samples


def render(request: Request) -> str:
    app = request.app
    settings = app.state.settings
    f = _Families()
    f.add("adamscope_build_info", "gauge", "Version of the service (value 1).", 1,
          version=__version__)
    steppers = [s for s in app.state.registry.list() if visible(request, s.name)]
    shown = steppers[: settings.metrics_max_steppers]
    f.add("adamscope_steppers", "gauge", "Steppers hosted.", len(steppers))
    f.add("adamscope_metrics_steppers_omitted", "gauge",
          "Steppers without per-stepper series here (metrics_max_steppers).",
          len(steppers) - len(shown))
    for name, kind, text in (
        ("adamscope_stepper_step", "gauge", "The stepper's step."),
        ("adamscope_stepper_parameters", "gauge", "Elements of the stepper's parameters."),
        ("adamscope_stepper_steps_total", "counter", "Steps applied since the service started."),
        ("adamscope_step_duration_seconds", "histogram",
         "Engine time of a step: PyTorch's update plus the signals computed with it."),
        ("adamscope_signal", "gauge", "Latest aggregate value of a per-step signal."),
        ("adamscope_loss", "gauge", "Latest training loss a client reported."),
        ("adamscope_alerts_total", "counter", "Alert events raised since the service started."),
        ("adamscope_alerts_active", "gauge", "Alert rules (per tensor) holding now."),
    ):
        f.declare(name, kind, text)
    for s in shown:
        f.add("adamscope_stepper_step", "gauge", "", s.step_count, stepper=s.name)
        f.add("adamscope_stepper_parameters", "gauge", "", s.numel, stepper=s.name)
        obs = history_of(s)
        if obs is None:
            continue
        m = obs.metrics()
        f.add("adamscope_stepper_steps_total", "counter", "", m["steps_total"], stepper=s.name)
        f.histogram("adamscope_step_duration_seconds", "", LATENCY_BUCKETS,
                    m["latency_cumulative"], m["latency_sum"], stepper=s.name)
        latest = obs.history.latest()
        for signal, value in sorted((latest or {}).get("aggregate", {}).items()):
            f.add("adamscope_signal", "gauge", "", value, stepper=s.name, signal=signal)
        loss = obs.history.latest_loss()
        if loss is not None:
            f.add("adamscope_loss", "gauge", "", loss[1], stepper=s.name)
        f.add("adamscope_alerts_total", "counter", "", m["alerts_total"], stepper=s.name)
        f.add("adamscope_alerts_active", "gauge", "", m["alerts_active"], stepper=s.name)
    stats = app.state.request_stats
    f.declare("adamscope_http_requests_total", "counter", "HTTP requests by route and status.")
    for (method, route, status), n in sorted(stats.counts.items()):
        f.add("adamscope_http_requests_total", "counter", "", n, method=method, route=route,
              status=status)
    f.declare("adamscope_http_request_duration_seconds", "histogram",
              "HTTP request time, until the last byte of the reply was handed on.")
    for (method, route), cells in sorted(stats.durations.items()):
        cumulative: list[float] = []
        running = 0.0
        for c in cells[:-1]:
            running += c
            cumulative.append(running)
        f.histogram("adamscope_http_request_duration_seconds", "", REQUEST_BUCKETS,
                    cumulative, cells[-1], method=method, route=route)
    hub = app.state.events
    f.add("adamscope_event_subscribers", "gauge", "Clients connected to /v1/events.",
          len(hub.subscribers))
    f.add("adamscope_events_dropped_total", "counter",
          "Events dropped for /v1/events clients that read too slowly.", hub.dropped_total)
    return "\n".join(f.lines()) + "\n"


@router.get(
    "/metrics",
    summary="Service metrics in Prometheus text format",
    dependencies=[Depends(require("read"))],
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                     "description": "Prometheus text exposition format 0.0.4"}},
)
async def metrics(request: Request) -> Response:
    for stepper in request.app.state.registry.list():
        await settled(stepper)  # its last step counted
    return Response(render(request), media_type=CONTENT_TYPE)
