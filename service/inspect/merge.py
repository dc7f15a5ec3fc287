"""Signals and statistics of several parts (a sharded stepper's shards) combined into the
whole's, from each part's own: by the rule each signal declares
(:data:`~.kernels.COMBINE`), and for statistics through the mergeable
:class:`~.summary.Summary` that also aggregates tensors in one process."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .kernels import COMBINE
from .summary import Summary

__all__ = ["combine", "combine_signals", "merge_signal_details", "merge_stats_aggregate"]


def _finite(value: Any) -> float | None:
    """A reported value as a float (JSON carries non-finite ones as strings), or None when
    it is missing or NaN (not reported)."""
    if value is None:
        return None
    x = float(value)
    return None if math.isnan(x) else x


def combine(signal: str, values: Sequence[Any], weights: Sequence[int]) -> float | None:
    """One signal of the whole from its parts' values (``weights``: each part's elements);
    None when no part reported it."""
    pairs = [
        (x, w)
        for x, w in ((_finite(v), w) for v, w in zip(values, weights, strict=True))
        if x is not None
    ]
    if not pairs:
        return None
    rule = COMBINE.get(signal, "mean")
    if rule == "norm":
        return math.sqrt(sum(v * v for v, _ in pairs))
    if rule == "sum":
        return sum(v for v, _ in pairs)
    if rule == "min":
        return min(v for v, _ in pairs)
    if rule == "max":
        return max(v for v, _ in pairs)
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _update_ratio(parts: Sequence[Mapping[str, Any]]) -> float | None:
    """|update| / |p before| of the whole from each part's update norm and ratio."""
    upd = p0 = 0.0
    for part in parts:
        u, r = _finite(part.get("update_norm")), _finite(part.get("update_ratio"))
        if u is None or not r:
            continue
        upd += u * u
        p0 += (u / r) ** 2
    return (upd**0.5) / (p0**0.5) if p0 else None


def combine_signals(
    parts: Sequence[Mapping[str, Any]], weights: Sequence[int]
) -> dict[str, float | None]:
    """Every signal the first part reports, combined over the parts."""
    out: dict[str, float | None] = {}
    for signal in parts[0] if parts else ():
        if COMBINE.get(signal) == "ratio":
            out[signal] = _update_ratio(parts)
        else:
            out[signal] = combine(signal, [p.get(signal) for p in parts], weights)
    return out


def merge_stats_aggregate(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The moments, extremes and counts of several tensors' values from each one's
    statistics (exact: counts add, norms combine, the mean and the spread pool)."""
    total = Summary()
    for p in parts:
        total.merge(Summary.from_fields(p))
    return total.fields()


def merge_signal_details(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the parts' signals say beside the tensors and the aggregate, as the whole's:
    ``estimates`` (each tensor's bound from its part; the aggregate's the loosest part's,
    a bound of the pooled one only as far as the parts' samples are alike; the update's
    rounding bounds joined, the aggregate's the root of their squares), ``local``
    (covered tensors and top elements joined), ``faults`` (joined) and ``first_nonfinite``
    (the earliest)."""
    out: dict[str, Any] = {}
    estimates = [p["estimates"] for p in parts if p.get("estimates")]
    if estimates:
        merged = dict(estimates[0])
        merged["rank_error"] = {k: v for e in estimates for k, v in e["rank_error"].items()}
        merged["aggregate_rank_error"] = max(e["aggregate_rank_error"] for e in estimates)
        rounding = {k: v for e in estimates for k, v in (e.get("update_rounding") or {}).items()}
        if rounding:  # each tensor's bound of norm(update - stored change): they add as squares
            merged["update_rounding"] = rounding
            merged["aggregate_update_rounding"] = math.sqrt(sum(b * b for b in rounding.values()))
        out["estimates"] = merged
    locals_ = [p["local"] for p in parts if p.get("local")]
    if locals_:
        out["local"] = {
            "covered": [n for loc in locals_ for n in loc.get("covered", [])],
            "top": {k: v for loc in locals_ for k, v in (loc.get("top") or {}).items()},
        }
    faults = {k: v for p in parts for k, v in (p.get("faults") or {}).items()}
    if faults:
        out["faults"] = faults
    firsts = [p["first_nonfinite"] for p in parts if p.get("first_nonfinite")]
    if firsts:
        out["first_nonfinite"] = min(firsts, key=lambda f: f["step"])
    return out
