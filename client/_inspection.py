"""The requests that look inside a stepper: history, alerts, losses, statistics, signals,
slices, dry runs and diffs; and their replies' non-finite numbers turned back into floats."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import torch

from . import codec
from ._base import (
    Call,
    DryRunReply,
    is_tensor_body,
    json_of,
    names_query,
    path,
    tensor_parts,
    tensors_of,
)
from ._calls import jsonable_options
from .constants import API_PREFIX, META_DRY_RUN, META_GROUPS, OCTET
from .protocol import AlertRule, AlertsReport, HistoryReport, LossRecorded

__all__ = ["inspection_floats"]


def history(
    name: str,
    signals: Sequence[str] | str | None,
    tensors: Sequence[str] | str | None,
    since: int | None,
    limit: int | None,
    fmt: str,
    first: int | None = None,
    last: int | None = None,
    max_points: int | None = None,
) -> Call[HistoryReport | str]:
    """``fmt="json"``: a HistoryReport; ``"csv"``: the CSV text. ``first``/``last``/
    ``max_points``: a whole-run query (``from``, ``to``, ``max_points``)."""
    if fmt not in ("json", "csv"):
        raise ValueError(f"fmt must be 'json' or 'csv', got {fmt!r}")
    if isinstance(signals, str):
        signals = [signals]
    if isinstance(tensors, str):
        tensors = [tensors]
    params = names_query(signals, "signal") + names_query(tensors, "tensor") + [("format", fmt)]
    if since is not None:
        params.append(("since", str(since)))
    if limit is not None:
        params.append(("limit", str(limit)))
    for key, value in (("from", first), ("to", last), ("max_points", max_points)):
        if value is not None:
            params.append((key, str(value)))
    if fmt == "csv":
        return Call(
            "GET", path(name, "history"), lambda r: r.text, params=params, accept="text/csv"
        )
    return Call(
        "GET",
        path(name, "history"),
        lambda r: HistoryReport.model_validate(json_of(r)),
        params=params,
    )


def alerts(name: str, limit: int | None) -> Call[AlertsReport]:
    return Call(
        "GET",
        path(name, "alerts"),
        lambda r: AlertsReport.model_validate(json_of(r)),
        params=[("limit", str(limit))] if limit is not None else [],
    )


def set_alerts(
    name: str, rules: Sequence[AlertRule | Mapping[str, Any]] | None
) -> Call[AlertsReport]:
    body = (
        None
        if rules is None
        else [
            r.model_dump(mode="json", exclude_none=True) if isinstance(r, AlertRule) else dict(r)
            for r in rules
        ]
    )
    return Call(
        "PUT",
        path(name, "alerts"),
        lambda r: AlertsReport.model_validate(json_of(r)),
        json_body={"rules": body},
    )


def report_loss(name: str, step: int | None, loss: float) -> Call[LossRecorded]:
    body: dict[str, Any] = {"loss": codec.json_float(float(loss))}
    if step is not None:
        body["step"] = step
    # Recording the same (step, loss) again changes nothing: safe to retry with a step.
    return Call(
        "POST",
        path(name, "loss"),
        lambda r: LossRecorded.model_validate(json_of(r)),
        json_body=body,
        idempotent=step is not None,
    )


#: Fields of the inspection replies that hold text, never a number (a stepper or
#: parameter may be named "NaN"): left alone when NaN/Inf strings become floats again.
_TEXT_FIELDS = frozenset(
    {"stepper", "name", "key", "index", "snapshot", "dtype", "error", "reason", "option", "in"}
)


def inspection_floats(value: Any, field_name: str | None = None) -> Any:
    """An inspection reply with the strings NaN / Infinity / -Infinity, which stand for
    non-finite numbers in JSON, turned back into floats where numbers belong."""
    if isinstance(value, dict):
        return {k: inspection_floats(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [inspection_floats(v, None) if isinstance(v, dict) else v for v in value]
    if isinstance(value, str) and field_name not in _TEXT_FIELDS and value in codec.SPECIAL_FLOATS:
        return codec.SPECIAL_FLOATS[value]
    return value


def _stats_query(
    quantiles: Sequence[float] | None,
    bins: int,
    hist_range: tuple[float, float] | None,
    log: bool,
    log_range: tuple[float, float] | None,
) -> list[tuple[str, str]]:
    params = [("bins", str(bins))]
    if quantiles is not None:
        params.append(("quantiles", ",".join(repr(float(q)) for q in quantiles)))
    if hist_range is not None:
        params.append(("range", ",".join(repr(float(x)) for x in hist_range)))
    if log:
        params.append(("log", "true"))
    if log_range is not None:
        params.append(("log_range", ",".join(repr(float(x)) for x in log_range)))
    return params


def stats(
    name: str,
    names: Sequence[str] | None,
    keys: Sequence[str] | None,
    quantiles: Sequence[float] | None,
    bins: int,
    hist_range: tuple[float, float] | None,
    log: bool,
    log_range: tuple[float, float] | None,
    aggregate: bool,
) -> Call[dict[str, Any]]:
    params = (
        names_query(names)
        + names_query(keys, "key")
        + _stats_query(quantiles, bins, hist_range, log, log_range)
    )
    if not aggregate:
        params.append(("aggregate", "false"))
    return Call("GET", path(name, "stats"), lambda r: inspection_floats(json_of(r)), params=params)


def signals(name: str) -> Call[dict[str, Any]]:
    return Call("GET", path(name, "signals"), lambda r: inspection_floats(json_of(r)))


def slice_tensor(
    name: str, param: str, key: str, index: str | int | None, rows: str | None
) -> Call[torch.Tensor]:
    params = [("name", param), ("key", key)]
    if index is not None:
        params.append(("index", str(index)))
    if rows is not None:
        params.append(("rows", rows))

    def parse(r: httpx.Response) -> torch.Tensor:
        data = json_of(r)
        return codec.tensor_from_json(
            data["data"], codec.dtype_from_name(data["dtype"]), data["shape"]
        )

    return Call("GET", path(name, "slice"), parse, params=params)


def dry_run(
    name: str,
    grads: Mapping[str, torch.Tensor],
    param_groups: Sequence[Mapping[str, Any]] | None,
    return_update: bool,
    quantiles: Sequence[float] | None,
    bins: int,
    log: bool,
) -> Call[DryRunReply]:
    metadata = {}
    if param_groups is not None:
        metadata[META_GROUPS] = json.dumps([jsonable_options(g) for g in param_groups])
    parts = tensor_parts(dict(grads), metadata)
    params = _stats_query(quantiles, bins, None, log, None)
    if return_update:
        params.append(("return_update", "true"))

    def parse(r: httpx.Response) -> DryRunReply:
        if not is_tensor_body(r):
            return DryRunReply(inspection_floats(json_of(r)))
        flat, meta = tensors_of(r)
        nested: dict[str, dict[str, torch.Tensor]] = {}
        for k, t in flat.items():
            pname, _, which = k.rpartition(".")
            nested.setdefault(pname, {})[which] = t
        return DryRunReply(inspection_floats(json.loads(meta[META_DRY_RUN])), nested)

    # It changes nothing, so a retry is always safe.
    return Call(
        "POST",
        path(name, "dry-run"),
        parse,
        params=params,
        parts=parts,
        accept=OCTET if return_update else "application/json",
        idempotent=True,
    )


def diff(a: str, b: str) -> Call[dict[str, Any]]:
    return Call(
        "GET",
        f"{API_PREFIX}/diff",
        lambda r: inspection_floats(json_of(r)),
        params=[("a", a), ("b", b)],
    )
