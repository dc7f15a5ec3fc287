"""Routes that look inside Adam: statistics, per-step signals, slices, dry runs, diffs.

* ``GET /steppers/{name}/stats``: summary statistics of parameters, state tensors and the
  derived views (bias-corrected moments, effective LR, last update), per tensor and
  aggregated, computed on the stepper's device (:mod:`service.engine.stats`). Replies are
  cached per (stepper version, query): dashboards polling an idle stepper cost nothing.
* ``GET /steppers/{name}/signals``: the last step's signals (:mod:`service.engine.signals`).
* ``GET /steppers/{name}/slice``: a selection (``index``/``rows``) of one tensor as JSON.
* ``POST /steppers/{name}/dry-run``: what a step with these gradients would do, without
  doing it (:mod:`service.engine.dryrun`). It changes nothing, so it needs the ``read``
  scope; its cost is a real step's (plus a copy of the stepped tensors' state), bounded
  like a step's by the body limit and run off the event loop.
* ``GET /diff?a=..&b=..``: name-keyed diff of two steppers or snapshots
  (``stepper`` or ``stepper/snapshot``; naming a snapshot needs the ``admin`` scope, as
  reading snapshots does).

Floats that are NaN or infinite travel as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` (the convention of the history and alert models).
"""

from __future__ import annotations

import json
import math
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from adamscope.client import codec
from adamscope.client.protocol import (
    META_GROUPS,
    SNAPSHOT_NAME_PATTERN,
    STEPPER_NAME_PATTERN,
)

from ...engine import Stepper
from ...engine import checkpoint as checkpoints
from ...inspect.diff import Operand, diff
from ...inspect.dryrun import DryRun, dry_run
from ...engine.errors import InvalidState
from ...engine.options import OPTION_NAMES
from ...inspect.stats import (
    DEFAULT_QUANTILES,
    EXACT_LIMIT,
    MAX_BINS,
    VIEW_KEYS,
    Described,
    Source,
    StatsSpec,
    aggregate,
    describe,
    describe_stepper,
    view_of,
)
from ...errors import ApiError, problems
from ..access import AccessDenied, authorize_name, principal, require
from ..durability import persistence
from ..options import group_updates_from_json
from ..http.query import parse_query, query_doc
from .steppers import NAME_PROBLEMS, registry
from ..http.stream import TensorStreamResponse, ingest_tensors, off_loop, settled
from ..http.body import OCTET, binary_body_doc, meta_json

__all__ = ["META_DRY_RUN", "json_safe", "router"]

router = APIRouter(tags=["inspection"])

#: Metadata key of a dry run's safetensors reply: the JSON report.
META_DRY_RUN = "adamscope.dry_run"
#: Distinct stats queries whose replies are kept per stepper.
CACHE_PER_STEPPER = 16
DEFAULT_KEYS = ("param", "exp_avg", "exp_avg_sq", "lr_eff")

# ---------------------------------------------------------------------- JSON


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as the strings NaN / Infinity / -Infinity."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def render(value: Any) -> bytes:
    return json.dumps(json_safe(value), separators=(",", ":"), allow_nan=False).encode()


def json_response(value: Any) -> Response:
    return Response(render(value), media_type="application/json")


# ---------------------------------------------------------------------- the stats cache

_cache: weakref.WeakKeyDictionary[Stepper, OrderedDict[Hashable, tuple[int, bytes]]] = (
    weakref.WeakKeyDictionary()
)


def _cached(stepper: Stepper, key: Hashable) -> bytes | None:
    slot = _cache.get(stepper, OrderedDict()).get(key)
    if slot is not None and slot[0] == stepper.version:
        return slot[1]
    return None


def _remember(stepper: Stepper, key: Hashable, version: int, body: bytes) -> None:
    slots = _cache.setdefault(stepper, OrderedDict())
    slots[key] = (version, body)
    slots.move_to_end(key)
    while len(slots) > CACHE_PER_STEPPER:
        slots.popitem(last=False)


# ---------------------------------------------------------------------- query parsing


def _invalid(detail: str) -> ApiError:
    return ApiError("request_validation_error", detail)


def _floats(raw: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise _invalid(f"{what} must be comma-separated numbers, got {raw!r}") from None
    return values


def _range(raw: str | None, what: str) -> tuple[float, float] | None:
    if raw is None:
        return None
    values = _floats(raw, what)
    if len(values) != 2:
        raise _invalid(f"{what} must be two numbers 'lo,hi', got {raw!r}")
    return values[0], values[1]


class SpecQuery(BaseModel):
    """What the statistics describe, as the query of /stats and /dry-run carries it
    (validated in one pass, see service/api/query.py)."""

    model_config = ConfigDict(populate_by_name=True)

    quantiles: str | None = Field(
        None, description="comma-separated quantiles in [0, 1] (default 0.01,0.5,0.99; "
                          "empty: none)")
    bins: int = Field(32, ge=0, le=MAX_BINS, description="histogram bins (0: none)")
    hist_range: str | None = Field(None, alias="range",
                                   description="histogram range 'lo,hi' (default: min,max)")
    log: bool = Field(False, description="also a histogram of log10|x| (zeros and negatives "
                                         "counted beside it)")
    log_range: str | None = Field(None, description="log histogram range 'lo,hi' in log10 "
                                                    "units (default: data)")

    def spec(self) -> StatsSpec:
        qs = (DEFAULT_QUANTILES if self.quantiles is None
              else _floats(self.quantiles, "quantiles"))
        try:
            return StatsSpec(qs, self.bins, _range(self.hist_range, "range"), self.log,
                             _range(self.log_range, "log_range"))
        except ValueError as e:
            raise _invalid(str(e)) from None


# ---------------------------------------------------------------------- stats, signals


class StatsQuery(SpecQuery):
    """The statistics' query (dashboards poll it)."""

    names: list[str] | None = Field(None, alias="name",
                                    description="parameters; all if none")
    keys: list[str] | None = Field(None, alias="key", description=(
        "tensors to describe: " + ", ".join(VIEW_KEYS) + f" (default {', '.join(DEFAULT_KEYS)})"))
    aggregate: bool = Field(True, description="also aggregate per key")


@router.get(
    "/steppers/{name}/stats",
    summary="Statistics of parameters, Adam state and derived views (per tensor, aggregate)",
    dependencies=[Depends(require("read"))],
    responses=problems(*NAME_PROBLEMS, "unknown_parameter"),
    openapi_extra={"parameters": query_doc(StatsQuery)},
)
async def stats(name: str, request: Request) -> Response:
    q = parse_query(request, StatsQuery)
    spec, names, keys, aggregate_ = q.spec(), q.names, q.keys, q.aggregate
    stepper = registry(request).get(name)
    wanted = tuple(dict.fromkeys(keys or DEFAULT_KEYS))
    unknown = [k for k in wanted if k not in VIEW_KEYS]
    if unknown:
        raise _invalid(f"unknown key(s) {unknown}; expected some of {', '.join(VIEW_KEYS)}")
    query = ("stats", tuple(names) if names is not None else None, wanted, spec.key(),
             aggregate_)
    body = _cached(stepper, query)
    if body is None:
        report = await off_loop(stepper, lambda: describe_stepper(stepper, names, wanted, spec,
                                                                  aggregate_))
        body = render({"stepper": name, "keys": list(wanted), **report})
        _remember(stepper, query, report["version"], body)
    return Response(body, media_type="application/json")


@router.get(
    "/steppers/{name}/signals",
    summary="The last step's signals (effective LR, shock, gamma, ...), per tensor and aggregate",
    dependencies=[Depends(require("read"))],
    responses=problems(*NAME_PROBLEMS),
)
async def signals(name: str, request: Request) -> Response:
    stepper = await settled(registry(request).get(name))
    current = stepper.signals
    # Every step (and every failure) replaces the signals dict, never changes it in place:
    # the same dict object is the same reply.
    hit = _signals_cache.get(stepper)
    if hit is None or hit[0] is not current:
        hit = (current, render({"stepper": name, **(current or {})}))
        _signals_cache[stepper] = hit
    return Response(hit[1], media_type="application/json")


#: The rendered reply of each stepper's last signals, with the dict it was rendered from.
_signals_cache: weakref.WeakKeyDictionary[Stepper, tuple[dict[str, Any], bytes]] = (
    weakref.WeakKeyDictionary())


# ---------------------------------------------------------------------- slice

# At most 19 digits: every index fits int64 (checked in _index_int), and int() is never
# asked to read thousands of digits.
_INDEX_ITEM = re.compile(r" *(-?[0-9]{1,19})? *(: *(-?[0-9]{1,19})? *(: *([0-9]{1,19})? *)?)?")
_INT64_MAX = 2**63 - 1


def _index_int(text: str) -> int:
    value = int(text)
    if not -_INT64_MAX <= value <= _INT64_MAX:
        raise _invalid(f"index {value} is outside the int64 range")
    return value


def parse_index(raw: str) -> tuple[int | slice, ...]:
    """``"3"``, ``"0:4"``, ``"2,1:10:2"``, ``":,0"``: ints and slices, numpy style (a step
    must be positive)."""
    items: list[int | slice] = []
    for part in raw.split(","):
        m = _INDEX_ITEM.fullmatch(part)
        if m is None or not part.strip():
            raise _invalid(f"index item {part[:40]!r} is not an int or a slice a:b[:c]")
        start, colon, stop, _, step = m.groups()
        if colon is None:
            items.append(_index_int(start))
            continue
        if step is not None and int(step) == 0:
            raise _invalid("a slice step must be positive")
        items.append(slice(_index_int(start) if start else None,
                           _index_int(stop) if stop else None,
                           _index_int(step) if step else None))
    return tuple(items)


@router.get(
    "/steppers/{name}/slice",
    summary="A slice or index selection of one tensor (or derived view) as JSON",
    dependencies=[Depends(require("read"))],
    responses=problems(*NAME_PROBLEMS, "unknown_parameter", "invalid_state", "json_too_large"),
)
async def slice_tensor(
    name: str, request: Request,
    param: Annotated[str, Query(alias="name", description="the parameter")],
    key: Annotated[str, Query(description="one of " + ", ".join(VIEW_KEYS))] = "param",
    index: Annotated[str | None, Query(
        description="numpy-style selection: ints and slices, comma-separated ('3', "
                    "'0:4', '2,1:10:2')")] = None,
    rows: Annotated[str | None, Query(description="a:b[:c] over the first dimension")] = None,
) -> Response:
    stepper = registry(request).get(name)
    if key not in VIEW_KEYS:
        raise _invalid(f"unknown key {key!r}; expected one of {', '.join(VIEW_KEYS)}")
    if index is not None and rows is not None:
        raise _invalid("give index or rows, not both")
    selection = parse_index(index) if index is not None else (
        parse_index(rows) if rows is not None else ())
    if rows is not None and (len(selection) != 1 or not isinstance(selection[0], slice)):
        raise _invalid(f"rows must be one slice a:b[:c], got {rows!r}")
    limit: int = request.app.state.settings.max_json_elements

    def select() -> tuple[int, torch.Tensor]:
        with stepper.lock:
            shape, _ = stepper.param_meta(param)  # unknown_parameter
            if len(selection) > len(shape):
                raise _invalid(f"{len(selection)} index items for a tensor of {len(shape)} "
                               f"dimension(s) {shape}")
            p = stepper.params[stepper.index[param]]
            view = view_of(p, stepper.optimizer.state.get(p, {}),
                           stepper.optimizer.param_groups[stepper.group_of[param]], key)
            if isinstance(view, str):
                raise InvalidState(f"{key} of {param!r}: {view}", parameter=param)
            try:
                probe = torch.empty(shape, device="meta")[selection]
            except (IndexError, RuntimeError) as e:  # RuntimeError: a size past int64
                raise _invalid(f"index {index or rows!r} on shape {shape}: {e}") from None
            if probe.numel() > limit:
                raise ApiError("json_too_large", f"{probe.numel()} elements exceed the JSON "
                               f"limit of {limit}; select fewer", limit=limit)
            return stepper.step_count, view.select(selection).detach().to("cpu", copy=True)

    step, t = await off_loop(stepper, select)
    return Response(json.dumps({"stepper": name, "step": step, "name": param, "key": key,
                                "index": index if index is not None else rows,
                                **codec.tensor_to_json(t)}, separators=(",", ":")).encode(),
                    media_type="application/json")


# ---------------------------------------------------------------------- dry run


def _difference(after: torch.Tensor, before: torch.Tensor) -> Source:
    """``after - before`` elementwise, in float32 (float64 for float64 tensors)."""
    wide = torch.float64 if after.dtype in (torch.float64, torch.complex128) else torch.float32
    return Source.derived([after, before], lambda a, b: a.to(wide) - b.to(wide), wide)


def _report(run: DryRun, spec: StatsSpec) -> dict[str, Any]:
    tensors: dict[str, dict[str, Any]] = {}
    parts: dict[str, list[Described]] = {"update": [], "grad": []}
    kept = 0  # finite values kept for exact aggregates, at most EXACT_LIMIT per key
    for n in run.stepped:
        numel = run.grads[n].numel() * (2 if run.grads[n].is_complex() else 1)
        keep = kept + numel <= EXACT_LIMIT
        kept += numel if keep else 0
        described = {"update": describe(_difference(run.after[n], run.before[n]), spec,
                                        keep_values=keep),
                     "grad": describe(Source.of(run.grads[n]), spec, keep_values=keep)}
        tensors[n] = {k: d.stats for k, d in described.items()}
        for k, d in described.items():
            parts[k].append(d)
    return {
        "step": run.step, "stepped": run.stepped, "skipped": run.skipped,
        "tensors": tensors,
        "aggregate": {k: aggregate(v, spec) for k, v in parts.items() if v},
        "signals": run.signals,
    }


class DryRunQuery(SpecQuery):
    return_update: bool = Field(False, description="answer with the would-be tensors as "
                                                   "safetensors")


@router.post(
    "/steppers/{name}/dry-run",
    summary="What a step with these gradients would do, without doing it",
    dependencies=[Depends(require("read"))],
    responses={
        200: {"content": {"application/json": {}, OCTET: {}},
              "description": "JSON report (per tensor: statistics of the update and the "
                             "gradient; aggregate; the step's signals), or with "
                             "return_update=true safetensors '<param>.update', "
                             "'<param>.param' (the would-be value) and '<param>.<state key>' "
                             f"(the would-be state), the report in __metadata__"
                             f"['{META_DRY_RUN}']"},
        **problems(*NAME_PROBLEMS, "malformed_body", "payload_too_large",
                   "unsupported_media_type", "request_timeout", "unknown_parameter",
                   "shape_mismatch", "dtype_mismatch", "invalid_hyperparameter", "invalid_state",
                   "device_out_of_memory"),
    },
    openapi_extra={**binary_body_doc(
        "safetensors of gradients by parameter name, as for a step (optional "
        f"__metadata__['{META_GROUPS}'] option changes included)"),
        "parameters": query_doc(DryRunQuery)},
)
async def dry_run_route(name: str, request: Request) -> Response:
    q = parse_query(request, DryRunQuery)
    spec, return_update = q.spec(), q.return_update
    stepper = registry(request).get(name)

    def destination(entry: codec.Entry) -> torch.Tensor:
        stepper.check_gradient(entry.name, entry.shape, entry.dtype)
        return torch.empty(entry.shape, dtype=entry.dtype)

    grads, metadata = await ingest_tensors(request, stepper, destination)
    groups = group_updates_from_json(meta_json(metadata, META_GROUPS))

    def run() -> tuple[DryRun, dict[str, Any]]:
        result = dry_run(stepper, grads, groups)
        return result, _report(result, spec)

    result, report = await off_loop(stepper, run)
    body = {"stepper": name, **report}
    if not return_update:
        return json_response(body)
    tensors: dict[str, torch.Tensor] = {}
    for n in result.stepped:
        tensors[f"{n}.update"] = (result.after[n] - result.before[n]).cpu()
        tensors[f"{n}.param"] = result.after[n].cpu()
        for k, v in result.state[n].items():
            tensors[f"{n}.{k}"] = v.detach().cpu()
    return TensorStreamResponse(tensors, name, result.step,
                                {META_DRY_RUN: render(body).decode()})


# ---------------------------------------------------------------------- diff

_STEPPER = re.compile(STEPPER_NAME_PATTERN)
_SNAP = re.compile(SNAPSHOT_NAME_PATTERN)


def _operand_name(raw: str, what: str) -> tuple[str, str | None]:
    stepper, _, snap = raw.partition("/")
    if not _STEPPER.fullmatch(stepper) or (snap and not _SNAP.fullmatch(snap)):
        raise _invalid(f"{what} must be 'stepper' or 'stepper/snapshot', got {raw!r}")
    return stepper, snap or None


def _stepper_operand(stepper: Stepper) -> Operand:
    with stepper.lock:
        step, state = stepper.get_state(with_params=True)
        groups = [{k: g[k] for k in OPTION_NAMES} for g in stepper.optimizer.param_groups]
    tensors = {n: {"param": s.pop("param"), **s} for n, s in state.items()}
    return Operand({"stepper": stepper.name, "snapshot": None, "step": step}, tensors,
                   [_jsonable(g) for g in groups])


def _snapshot_operand(request: Request, stepper: Stepper, snap: str) -> Operand:
    f, _ = persistence(request).open_snapshot(stepper, snap)
    with f:
        ckpt = checkpoints.decode(f.read())
    tensors = {n: {"param": t, **ckpt.state.get(n, {})} for n, t in ckpt.params}
    groups = [_jsonable(dict(g["options"])) for g in ckpt.header["groups"]]
    return Operand({"stepper": stepper.name, "snapshot": snap, "step": ckpt.step}, tensors,
                   groups)


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        if torch.is_tensor(v):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = [float(x) if torch.is_tensor(x) else x for x in v]
        out[k] = v
    return out


@router.get(
    "/diff",
    summary="Name-keyed diff of two steppers or snapshots ('stepper' or 'stepper/snapshot')",
    dependencies=[Depends(require("read"))],
    responses=problems("stepper_not_found", "snapshot_not_found", "request_validation_error",
                       "invalid_checkpoint"),
)
async def diff_route(
    request: Request,
    a: Annotated[str, Query(description="'stepper' or 'stepper/snapshot'")],
    b: Annotated[str, Query(description="'stepper' or 'stepper/snapshot'")],
) -> Response:
    sides = [_operand_name(a, "a"), _operand_name(b, "b")]
    for stepper_name, snap in sides:
        authorize_name(request, stepper_name)
        if snap is not None and not principal(request).allows("admin"):
            raise AccessDenied("forbidden", f"reading snapshot {snap!r} needs the admin scope",
                               required_scope="admin")
    steppers = [registry(request).get(n) for n, _ in sides]

    def operand(stepper: Stepper, snap: str | None) -> Callable[[], Operand]:
        if snap is None:
            return lambda: _stepper_operand(stepper)
        return lambda: _snapshot_operand(request, stepper, snap)

    ops = [await run_in_threadpool(operand(s, snap)) for s, (_, snap) in
           zip(steppers, sides, strict=True)]
    report = await run_in_threadpool(diff, ops[0], ops[1])
    return json_response(report)
