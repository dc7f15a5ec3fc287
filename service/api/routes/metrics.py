"""``GET /metrics``: the service in Prometheus' text exposition format (version 0.0.4).

Needs the ``read`` scope (a scrape config sends a read token as its bearer token); a token
restricted to a name prefix sees only its steppers' series. Label cardinality is bounded:
per-stepper series carry only ``stepper`` (and ``signal``, from the fixed set of aggregate
signals, or ``group`` and ``option`` for the param groups' schedule), for at most
``metrics_max_steppers`` steppers (the first by name; the number left out is
``adamscope_metrics_steppers_omitted``); request series carry method, route
*template* and status.

Series:

- ``adamscope_steppers``: steppers hosted (that the token reaches);
- ``adamscope_stepper_step``, ``adamscope_stepper_parameters``: each stepper's step and size;
- ``adamscope_stepper_steps_total``: steps applied since the service started;
- ``adamscope_step_duration_seconds``: histogram of the engine's step time (PyTorch's
  update plus the signals computed with it);
- ``adamscope_signal{stepper,signal}``: the latest aggregate value of every signal;
- ``adamscope_group_option{stepper,group,option}``: each param group's schedule at the
  latest step (``lr``, ``beta1``, ``beta2``, ``bc1``, ``bc2``, ``step_size``);
- ``adamscope_loss``: the latest loss a client reported;
- ``adamscope_alerts_total`` and ``adamscope_alerts_active``;
- ``adamscope_http_requests_total{method,route,status}`` and
  ``adamscope_http_request_duration_seconds{method,route}`` (a pure ASGI middleware sees
  every request, refused ones included);
- ``adamscope_event_subscribers``, ``adamscope_events_dropped_total`` (the SSE stream).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ... import __version__
from ...engine import Stepper
from ...inspect.history import LATENCY_BUCKETS
from ...inspect.recorder import history_of
from ...inspect.schedule import split_group_key
from ..access import require, visible
from ..deps import hub, registry, serving, settings
from ..http.requests import REQUEST_BUCKETS, RequestStats

__all__ = ["CONTENT_TYPE", "router"]

router = APIRouter(tags=["service"])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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

    def histogram(
        self,
        name: str,
        help_text: str,
        bounds: Iterable[float],
        cumulative: list[float],
        total: float,
        **labels: str,
    ) -> None:
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


_STEPPER_FAMILIES = (
    ("adamscope_stepper_step", "gauge", "The stepper's step."),
    ("adamscope_stepper_parameters", "gauge", "Elements of the stepper's parameters."),
    ("adamscope_stepper_steps_total", "counter", "Steps applied since the service started."),
    (
        "adamscope_step_duration_seconds",
        "histogram",
        "Engine time of a step: PyTorch's update plus the signals computed with it.",
    ),
    ("adamscope_signal", "gauge", "Latest aggregate value of a per-step signal."),
    (
        "adamscope_group_option",
        "gauge",
        "A param group's lr, betas, bias corrections (bc1, bc2) and step size at the latest step.",
    ),
    ("adamscope_loss", "gauge", "Latest training loss a client reported."),
    ("adamscope_alerts_total", "counter", "Alert events raised since the service started."),
    ("adamscope_alerts_active", "gauge", "Alert rules (per tensor) holding now."),
)


def _stepper_series(f: _Families, s: Stepper) -> None:
    f.add("adamscope_stepper_step", "gauge", "", s.step_count, stepper=s.name)
    f.add("adamscope_stepper_parameters", "gauge", "", s.numel, stepper=s.name)
    obs = history_of(s)
    if obs is None:
        return
    m = obs.metrics()
    f.add("adamscope_stepper_steps_total", "counter", "", m["steps_total"], stepper=s.name)
    f.histogram(
        "adamscope_step_duration_seconds",
        "",
        LATENCY_BUCKETS,
        m["latency_cumulative"],
        m["latency_sum"],
        stepper=s.name,
    )
    latest = obs.history.latest()
    for signal, value in sorted((latest or {}).get("aggregate", {}).items()):
        group = split_group_key(signal)
        if group is None:
            f.add("adamscope_signal", "gauge", "", value, stepper=s.name, signal=signal)
        elif not math.isnan(value):
            f.add(
                "adamscope_group_option",
                "gauge",
                "",
                value,
                stepper=s.name,
                group=group[0],
                option=group[1],
            )
    loss = obs.history.latest_loss()
    if loss is not None:
        f.add("adamscope_loss", "gauge", "", loss[1], stepper=s.name)
    f.add("adamscope_alerts_total", "counter", "", m["alerts_total"], stepper=s.name)
    f.add("adamscope_alerts_active", "gauge", "", m["alerts_active"], stepper=s.name)


def _request_series(f: _Families, stats: RequestStats) -> None:
    f.declare("adamscope_http_requests_total", "counter", "HTTP requests by route and status.")
    for (method, route, status), n in sorted(stats.counts.items()):
        f.add(
            "adamscope_http_requests_total",
            "counter",
            "",
            n,
            method=method,
            route=route,
            status=status,
        )
    f.declare(
        "adamscope_http_request_duration_seconds",
        "histogram",
        "HTTP request time, until the last byte of the reply was handed on.",
    )
    for (method, route), cells in sorted(stats.durations.items()):
        cumulative: list[float] = []
        running = 0.0
        for c in cells[:-1]:
            running += c
            cumulative.append(running)
        f.histogram(
            "adamscope_http_request_duration_seconds",
            "",
            REQUEST_BUCKETS,
            cumulative,
            cells[-1],
            method=method,
            route=route,
        )


def render(request: Request) -> str:
    f = _Families()
    f.add(
        "adamscope_build_info", "gauge", "Version of the service (value 1).", 1, version=__version__
    )
    steppers = [s for s in registry(request).list() if visible(request, s.name)]
    shown = steppers[: settings(request).metrics_max_steppers]
    f.add("adamscope_steppers", "gauge", "Steppers hosted.", len(steppers))
    f.add(
        "adamscope_metrics_steppers_omitted",
        "gauge",
        "Steppers without per-stepper series here (metrics_max_steppers).",
        len(steppers) - len(shown),
    )
    for name, kind, text in _STEPPER_FAMILIES:
        f.declare(name, kind, text)
    for s in shown:
        _stepper_series(f, s)
    _request_series(f, request.app.state.request_stats)
    events = hub(request)
    f.add(
        "adamscope_event_subscribers",
        "gauge",
        "Clients connected to /v1/events.",
        len(events.subscribers),
    )
    f.add(
        "adamscope_events_dropped_total",
        "counter",
        "Events dropped for /v1/events clients that read too slowly.",
        events.dropped_total,
    )
    return "\n".join(f.lines()) + "\n"


@router.get(
    "/metrics",
    summary="Service metrics in Prometheus text format",
    dependencies=[Depends(require("read"))],
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format 0.0.4",
        }
    },
)
async def metrics(request: Request) -> Response:
    serve = serving(request)
    for stepper in registry(request).list():
        await serve.settled(stepper)  # its last step counted
    return Response(render(request), media_type=CONTENT_TYPE)
