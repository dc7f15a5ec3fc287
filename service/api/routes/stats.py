"""Routes that describe a stepper's tensors: statistics and the last step's signals.

* ``GET /steppers/{name}/stats``: summary statistics of parameters, state tensors and the
  derived views (bias-corrected moments, effective LR, last update), per tensor and
  aggregated, computed on the stepper's device (:mod:`adamscope.service.inspect.views`).
  Replies are cached per (stepper version, query): dashboards polling an idle stepper cost
  nothing.
* ``GET /steppers/{name}/signals``: the last step's signals
  (:mod:`adamscope.service.inspect.signals`).

Floats that are NaN or infinite travel as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` (the convention of the history and alert models).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ...errors import ApiError, problems
from ...inspect.signals import signals_of
from ...inspect.stats import DEFAULT_QUANTILES, MAX_BINS, StatsSpec
from ...inspect.views import VIEW_KEYS, describe_optimizer
from ..access import require
from ..deps import NAME_PROBLEMS, NAMES_QUERY, registry, serving
from ..http.query import parse_query, query_doc
from ..http.reply import render_json

#: What a watched run cannot answer (its tensors are the trainer's).
WATCHED_READS = "statistics and slices of its tensors"

__all__ = ["SpecQuery", "invalid", "router"]

router = APIRouter(tags=["inspection"])

DEFAULT_KEYS = ("param", "exp_avg", "exp_avg_sq", "lr_eff")


def invalid(detail: str) -> ApiError:
    return ApiError("request_validation_error", detail)


def _floats(raw: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise invalid(f"{what} must be comma-separated numbers, got {raw!r}") from None
    return values


def _range(raw: str | None, what: str) -> tuple[float, float] | None:
    if raw is None:
        return None
    values = _floats(raw, what)
    if len(values) != 2:
        raise invalid(f"{what} must be two numbers 'lo,hi', got {raw!r}")
    return values[0], values[1]


class SpecQuery(BaseModel):
    """What the statistics describe, as the query of /stats and /dry-run carries it
    (validated in one pass, see service/api/query.py)."""

    model_config = ConfigDict(populate_by_name=True)

    quantiles: str | None = Field(
        None, description="comma-separated quantiles in [0, 1] (default 0.01,0.5,0.99; empty: none)"
    )
    bins: int = Field(32, ge=0, le=MAX_BINS, description="histogram bins (0: none)")
    hist_range: str | None = Field(
        None, alias="range", description="histogram range 'lo,hi' (default: min,max)"
    )
    log: bool = Field(
        False, description="also a histogram of log10|x| (zeros and negatives counted beside it)"
    )
    log_range: str | None = Field(
        None, description="log histogram range 'lo,hi' in log10 units (default: data)"
    )

    def spec(self) -> StatsSpec:
        qs = DEFAULT_QUANTILES if self.quantiles is None else _floats(self.quantiles, "quantiles")
        try:
            return StatsSpec(
                qs,
                self.bins,
                _range(self.hist_range, "range"),
                self.log,
                _range(self.log_range, "log_range"),
            )
        except ValueError as e:
            raise invalid(str(e)) from None


class StatsQuery(SpecQuery):
    """The statistics' query (dashboards poll it)."""

    names: list[str] | None = Field(None, alias=NAMES_QUERY, description="parameters; all if none")
    keys: list[str] | None = Field(
        None,
        alias="key",
        description=(
            "tensors to describe: " + ", ".join(VIEW_KEYS) + f" (default {', '.join(DEFAULT_KEYS)})"
        ),
    )
    aggregate: bool = Field(True, description="also aggregate per key")


@router.get(
    "/steppers/{name}/stats",
    summary="Statistics of parameters, Adam state and derived views (per tensor, aggregate)",
    dependencies=[Depends(require("read"))],
    responses=problems(*NAME_PROBLEMS, "unknown_parameter", "stepper_watched"),
    openapi_extra={"parameters": query_doc(StatsQuery)},
)
async def stats(name: str, request: Request) -> Response:
    q = parse_query(request, StatsQuery)
    spec, names, keys, aggregate_ = q.spec(), q.names, q.keys, q.aggregate
    stepper = registry(request).get(name)
    stepper.check_hosted_tensors(WATCHED_READS)
    wanted = tuple(dict.fromkeys(keys or DEFAULT_KEYS))
    unknown = [k for k in wanted if k not in VIEW_KEYS]
    if unknown:
        raise invalid(f"unknown key(s) {unknown}; expected some of {', '.join(VIEW_KEYS)}")
    query = ("stats", tuple(names) if names is not None else None, wanted, spec.key(), aggregate_)
    serve = serving(request)
    replies = serve.of(stepper).replies
    body = replies.get(query, stepper.version)
    if body is None:
        report = await serve.off_loop(
            stepper, lambda: describe_optimizer(stepper, names, wanted, spec, aggregate_)
        )
        body = render_json({"stepper": name, "keys": list(wanted), **report})
        replies.put(query, report["version"], body)
    return Response(body, media_type="application/json")


@router.get(
    "/steppers/{name}/signals",
    summary="The last step's signals (effective LR, shock, gamma, ...), per tensor and aggregate",
    dependencies=[Depends(require("read"))],
    responses=problems(*NAME_PROBLEMS),
)
async def signals(name: str, request: Request) -> Response:
    serve = serving(request)
    stepper = await serve.settled(registry(request).get(name))
    current = signals_of(stepper)
    # Every step (and every failure) replaces the signals dict, never changes it in place:
    # the same dict object is the same reply.
    body = serve.of(stepper).replies.body(
        "signals", current, lambda: render_json({"stepper": name, **current})
    )
    return Response(body, media_type="application/json")
