"""Routes over a stepper's past: its signal history (JSON or CSV), its alert rules and
events, and the training loss a client reports for a step.

Floats that are NaN or infinite leave as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` in JSON (protobuf's convention; JSON numbers cannot spell them) and as
``nan``/``inf`` in CSV.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from adamscope.client.protocol import (
    INT64_MAX,
    AlertRules,
    AlertsReport,
    HistoryReport,
    LossRecorded,
    LossReport,
)

from ...engine import Stepper
from ...engine.errors import UnknownParameter
from ...errors import problems
from ...inspect.alerts import set_rules
from ...inspect.recorder import HistoryObserver, attach_history, history_of
from ...inspect.signals import SIGNALS
from ..access import require
from ..deps import NAME_PROBLEMS, hub, registry, serving
from ..durability import persist_after
from ..http.reply import json_response

__all__ = ["known_signals", "observer", "router"]

router = APIRouter(tags=["history"])

CSV = "text/csv"

#: Rows (aggregate rows x signals) above which a history reply is built off the event loop.
INLINE_CELLS = 50_000


def observer(stepper: Stepper) -> HistoryObserver:
    """The stepper's history (every hosted stepper has one; see the app factory's registry hook)."""
    found = history_of(stepper)
    if found is None:  # a stepper registered without the monitoring hook
        found = attach_history(stepper)
    return found


def known_signals(stepper: Stepper) -> set[str]:
    """Signals the service computes, plus any this stepper's history already holds."""
    return set(SIGNALS) | set(observer(stepper).history.signal_names())


def _invalid(loc: list[Any], msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": msg, "type": "value_error"}])


def _check_signals(stepper: Stepper, signals: list[str] | None, loc: list[Any]) -> None:
    if not signals:
        return
    known = known_signals(stepper)
    for i, s in enumerate(signals):
        if s not in known:
            raise _invalid([*loc, i], f"unknown signal {s!r}; known: {', '.join(sorted(known))}")


Signals = Annotated[list[str] | None, Query(alias="signal", description="signals; all if none")]
Tensors = Annotated[
    list[str] | None,
    Query(
        alias="tensor",
        description="parameter tensors whose own series to include ('*': all); "
        "none: only the stepper's aggregate",
    ),
]


@router.get(
    "/steppers/{name}/history",
    response_model=HistoryReport,
    summary="The stepper's per-step signals as time series (JSON or CSV): the recent raw "
    "window, or the whole run downsampled (from/to/max_points)",
    dependencies=[Depends(require("read"))],
    responses={
        200: {
            "content": {CSV: {"schema": {"type": "string"}}},
            "description": "HistoryReport JSON, or with format=csv (or Accept: text/csv) "
            "CSV: step,time,tensor,loss,<signals>; tensor empty for the "
            "aggregate",
        },
        **problems(*NAME_PROBLEMS, "unknown_parameter"),
    },
)
async def get_history(
    name: str,
    request: Request,
    signal: Signals = None,
    tensor: Tensors = None,
    since: Annotated[
        int | None, Query(ge=0, le=INT64_MAX, description="only steps after this one")
    ] = None,
    limit: Annotated[
        int | None, Query(ge=1, le=INT64_MAX, description="only the last N steps")
    ] = None,
    format: Annotated[
        Literal["json", "csv"] | None,
        Query(description="json (default) or csv; csv is also chosen by Accept: text/csv"),
    ] = None,
    first: Annotated[
        int | None,
        Query(
            alias="from",
            ge=0,
            le=INT64_MAX,
            description="whole-run query: from this step (default: the first). Any of "
            "from/to/max_points asks for the whole run, old steps from the downsampled "
            "tiers: each point covers first_steps[i]..steps[i] (counts[i] steps recorded) "
            "with the mean (values), min and max of each signal; CSV adds first_step, "
            "count, min(<signal>) and max(<signal>) columns",
        ),
    ] = None,
    last: Annotated[
        int | None,
        Query(alias="to", ge=0, le=INT64_MAX, description="whole-run query: up to this step"),
    ] = None,
    max_points: Annotated[
        int | None,
        Query(
            ge=1,
            le=100_000,
            description="whole-run query: most points per series (default 1000); more "
            "points are merged on a grid of equal step spans",
        ),
    ] = None,
) -> Response:
    stepper = await serving(request).settled(registry(request).get(name))
    _check_signals(stepper, signal, ["query", "signal"])
    whole_run = first is not None or last is not None or max_points is not None
    if whole_run and (since is not None or limit is not None):
        raise _invalid(["query", "since"], "since/limit and from/to/max_points do not mix")
    for t in tensor or []:
        if t != "*" and t not in stepper.index:
            raise UnknownParameter(f"stepper {name!r} has no parameter {t!r}", parameter=t)
    history = observer(stepper).history
    as_csv = format == "csv" or (
        format is None and request.headers.get("accept", "").startswith(CSV)
    )

    def build() -> Response:
        if whole_run:
            found = history.span(signal, tensor, first, last, max_points, as_csv=as_csv)
            if as_csv:
                return Response(found, media_type=CSV)
            return json_response(found)
        if as_csv:
            return Response(history.csv(signal, tensor, since, limit), media_type=CSV)
        return json_response(history.query(signal, tensor, since, limit))

    cells = history.aggregate.size * max(1, len(history.columns))
    if tensor:
        cells += (
            history.tensor_capacity
            * len(history.columns)
            * (len(stepper.names) if "*" in tensor else len(tensor))
        )
    if cells <= INLINE_CELLS and not whole_run:  # a whole-run query reads the database
        return build()
    return await run_in_threadpool(build)


def _report(stepper: Stepper, limit: int) -> dict[str, Any]:
    obs = observer(stepper)
    # No stepper lock: a step may hold it for long, and the journal entry is replaced
    # whole, never changed in place.
    rules, defaults = obs.rules()
    with obs.history.lock:
        events = list(obs.alerts.events)[-limit:] if limit else []
        return {
            "stepper": stepper.name,
            "rules": [r.model_dump(mode="json") for r in rules],
            "defaults": defaults,
            "count": obs.alerts.count,
            "active": obs.alerts.active_list(),
            "events": events,
        }


Limit = Annotated[int, Query(ge=0, le=10_000, description="latest events to list")]


@router.get(
    "/steppers/{name}/alerts",
    response_model=AlertsReport,
    summary="The stepper's alert rules, which hold now, and the latest alert events",
    dependencies=[Depends(require("read"))],
    responses=problems(*NAME_PROBLEMS),
)
async def get_alerts(name: str, request: Request, limit: Limit = 100) -> Response:
    stepper = await serving(request).settled(registry(request).get(name))
    return json_response(_report(stepper, limit))


@router.put(
    "/steppers/{name}/alerts",
    response_model=AlertsReport,
    summary="Replace the stepper's alert rules (null: the defaults)",
    dependencies=[Depends(require("write"))],
    responses=problems(*NAME_PROBLEMS, "unknown_parameter", "malformed_body", "persistence_failed"),
)
async def put_alerts(name: str, body: AlertRules, request: Request) -> Response:
    stepper = registry(request).get(name)
    for i, rule in enumerate(body.rules or []):
        if rule.signal is not None:
            _check_signals(stepper, [rule.signal], ["body", "rules", i, "signal"])
        if rule.tensor not in (None, "*") and rule.tensor not in stepper.index:
            raise UnknownParameter(
                f"rule {i} names tensor {rule.tensor!r}, which stepper {name!r} does not have",
                parameter=rule.tensor,
            )
    await serving(request).off_loop(stepper, lambda: set_rules(stepper, body.rules))
    await persist_after(request, stepper)
    return json_response(_report(stepper, 100))


@router.post(
    "/steppers/{name}/loss",
    response_model=LossRecorded,
    summary="Record the training loss of a step in the stepper's history",
    dependencies=[Depends(require("write"))],
    responses=problems(*NAME_PROBLEMS, "malformed_body"),
)
async def post_loss(name: str, body: LossReport, request: Request) -> Response:
    stepper = await serving(request).settled(registry(request).get(name))
    step = stepper.step_count if body.step is None else body.step
    now = time.time()
    observer(stepper).history.record_loss(step, body.loss, now)
    hub(request).publish_loss(stepper.name, step, body.loss, now)
    return json_response({"stepper": name, "step": step, "loss": body.loss, "time": now})
