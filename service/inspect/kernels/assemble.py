"""One step's signals assembled from what :func:`~.step.finish` brought to the host: the
exact reductions of the full tensors (:mod:`.exact`), the sums over each tensor's sample,
its quantiles; and which of them are estimates, with their error bound."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .exact import REDUCED, ROLES, STATS, update_rounding
from .sampling import Entry, Layout

__all__ = [
    "CONFIDENCE",
    "ESTIMATES",
    "Columns",
    "Row",
    "aggregate",
    "estimates",
    "full_signals",
    "rank_error",
    "rounding",
    "tensor_signals",
]

#: The confidence at which :func:`rank_error` bounds the sampled signals' error.
CONFIDENCE = 0.99
#: The signals computed from a tensor's sample (exact when it is taken whole), by kind:
#: quantiles (their rank error is bounded), fractions (their absolute error is bounded by
#: the same number) and values scaled up from the sample (no distribution-free bound).
#: Every other signal is exact.
ESTIMATES = {
    "quantiles": ("lr_eff_p1", "lr_eff_p50", "lr_eff_p99", "shock_p99"),
    "fractions": ("gamma_frac", "eps_dominance"),
    "scaled": ("amsgrad_clamp",),
}
#: The exact reductions reported besides the older signals (``grad_norm``, ``param_norm``,
#: ``update_norm``, ``exp_avg_norm``): sums, minima and maxima of every role, v's norm.
_OLDER = ("grad_norm", "param_norm", "update_norm", "exp_avg_norm")
FULL = tuple(c for c in REDUCED[:-1] if c not in _OLDER)
_AT = {name: i for i, name in enumerate(REDUCED)}


def rank_error(n: float) -> float:
    """The Dvoretzky-Kiefer-Wolfowitz bound for ``n`` elements drawn independently: with
    probability :data:`CONFIDENCE` the sample's CDF is within this of the tensor's
    everywhere, so a sample quantile's rank (and a sample fraction) is within it."""
    return math.sqrt(math.log(2 / (1 - CONFIDENCE)) / (2 * n)) if n > 0 else math.inf


def estimates(layout: Layout) -> dict[str, Any]:
    """Which signals are estimates and how far off they may be: ``rank_error`` per tensor
    (0.0 for a tensor taken whole: its signals are exact) and for the aggregate (the pooled
    sample's effective size, ``(sum w)^2 / sum w^2`` with each element weighted by its
    tensor's ``numel / n``)."""
    per = {
        name: 0.0 if plan.exact else rank_error(plan.count)
        for name, plan in zip(layout.names, layout.plans, strict=True)
    }
    if all(layout.exact):
        pooled = 0.0
    else:
        counts = [p.count for p in layout.plans]
        total = sum(w * c for w, c in zip(layout.weights, counts, strict=True))
        squares = sum(w * w * c for w, c in zip(layout.weights, counts, strict=True))
        pooled = rank_error(total * total / squares)
    return {
        "method": "block sample (see sample)",
        "confidence": CONFIDENCE,
        **{kind: list(names) for kind, names in ESTIMATES.items()},
        "rank_error": per,
        "aggregate_rank_error": pooled,
    }


@dataclass(frozen=True)
class Columns:
    """Where each per-tensor sum over the sample sits in a row of ``finish``'s columns:
    squares of the update ``p1 - p0`` (0) and of ``p0`` (1), [vmax / v], then the counted
    flags."""

    amsgrad: bool

    @property
    def ratio(self) -> int:
        return 2

    @property
    def grew(self) -> int:
        return 3 if self.amsgrad else 2

    @property
    def comparable(self) -> int:
        return self.grew + 1

    @property
    def eps(self) -> int:
        return self.grew + 2

    @property
    def has_v(self) -> int:
        return self.grew + 3


@dataclass(frozen=True)
class Row:
    """One tensor's numbers: ``sums`` over its sample, ``reduced`` (the exact reductions,
    :data:`~.exact.REDUCED`), its elements, the sample's weight and size."""

    sums: Sequence[float]
    reduced: Sequence[float]
    numel: int
    weight: float
    n: int


def _div(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 else math.inf
    return a / b


def tensor_signals(
    row: Row,
    lr_eff: Sequence[float],
    shock: float,
    col: Columns,
    amsgrad: bool,
    faults: Mapping[str, tuple[int, int]],
    lr_scale: float,
) -> dict[str, float]:
    """One tensor's signals (``faults``: its exact NaN/Inf counts per role, if any)."""
    r, red = row.sums, row.reduced
    clamp = 1.0
    if amsgrad:
        clamp = r[col.ratio] / r[col.has_v] if r[col.has_v] else math.nan
    return {
        "grad_norm": red[_AT["grad_norm"]],
        "param_norm": red[_AT["param_norm"]],
        "update_norm": red[_AT["update_norm"]],
        "update_ratio": _div(red[_AT["update_norm"]], red[_AT["param_before_norm"]]),
        "exp_avg_norm": red[_AT["exp_avg_norm"]],
        "exp_avg_sq_mean": red[_AT["exp_avg_sq_sum"]] / row.numel,
        "lr_eff_p1": lr_eff[0],
        "lr_eff_p50": lr_eff[1],
        "lr_eff_p99": lr_eff[2],
        "shock_p99": shock,
        "gamma_frac": r[col.grew] / r[col.comparable] if r[col.comparable] else math.nan,
        "amsgrad_clamp": clamp,
        "eps_dominance": r[col.eps] / row.n,
        "nan_count": float(sum(c[0] for c in faults.values())),
        "inf_count": float(sum(c[1] for c in faults.values())),
        "lr_scale": lr_scale,
    }


def full_signals(reduced: Sequence[float]) -> dict[str, float]:
    """One tensor's :data:`FULL` signals from its exact reductions."""
    return {name: reduced[_AT[name]] for name in FULL}


def _full_totals(reduced: Sequence[Sequence[float]]) -> dict[str, float]:
    """The stepper's :data:`FULL` signals: norms as the root of the summed squares, sums
    added, the least minimum and the greatest maximum."""
    out: dict[str, float] = {}
    for role in ROLES:
        for stat in STATS:
            name = f"{role}_{stat}"
            values = [red[_AT[name]] for red in reduced]
            if not values:
                out[name] = math.nan
            elif stat == "norm":
                out[name] = math.sqrt(sum(x * x for x in values))
            elif stat == "sum":
                out[name] = math.fsum(values)
            else:  # NaN wins, as it does within a tensor
                nan = any(math.isnan(x) for x in values)
                out[name] = math.nan if nan else (min if stat == "min" else max)(values)
    return out


def aggregate(
    layout: Layout,
    rows: Sequence[Sequence[float]],
    reduced: Sequence[Sequence[float]],
    col: Columns,
    tensors: Mapping[str, Mapping[str, float]],
    amsgrad: Sequence[bool],
) -> dict[str, float]:
    """The stepper's signals but the quantiles: norms as the root of the summed squares,
    means and fractions weighted by elements, counts added."""

    def total(c: int, which: Sequence[bool] | None = None) -> float:
        return sum(
            w * r[c]
            for i, (r, w) in enumerate(zip(rows, layout.weights, strict=True))
            if which is None or which[i]
        )

    full = _full_totals(reduced)
    p0 = math.sqrt(sum(red[-1] * red[-1] for red in reduced))
    numel = sum(layout.numels)
    clamp = 1.0
    if any(amsgrad):  # without amsgrad a tensor's ratio is exactly 1 wherever v > 0
        plain = [not a for a in amsgrad]
        defined = total(col.has_v)
        clamp = (
            (total(col.ratio, amsgrad) + total(col.has_v, plain)) / defined if defined else math.nan
        )
    comparable = total(col.comparable)
    scales = {t["lr_scale"] for t in tensors.values()}
    return {
        "grad_norm": full["grad_norm"],
        "param_norm": full["param_norm"],
        "update_norm": full["update_norm"],
        "update_ratio": _div(full["update_norm"], p0),
        "exp_avg_norm": full["exp_avg_norm"],
        "exp_avg_sq_mean": full["exp_avg_sq_sum"] / numel if numel else math.nan,
        "gamma_frac": total(col.grew) / comparable if comparable else math.nan,
        "amsgrad_clamp": clamp,
        "eps_dominance": total(col.eps) / numel if numel else math.nan,
        "nan_count": sum(t["nan_count"] for t in tensors.values()),
        "inf_count": sum(t["inf_count"] for t in tensors.values()),
        # The aggregate's effective LR scales with the schedule only when every tensor's
        # does alike.
        "lr_scale": scales.pop() if len(scales) == 1 else math.nan,
        **_local_totals(layout, tensors),
        **{name: full[name] for name in FULL},
    }


def _local_totals(layout: Layout, tensors: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The localized counts of the tensors that report them, added (NaN: none does)."""
    numels = dict(zip(layout.names, layout.numels, strict=True))
    seen = [(n, t) for n, t in tensors.items() if not math.isnan(t["lr_fell_count"])]
    if not seen:
        return dict.fromkeys(("lr_fell_count", "lr_rose_count", "lr_fell_frac"), math.nan)
    fell = sum(t["lr_fell_count"] for _, t in seen)
    covered = sum(numels[n] for n, _ in seen)
    return {
        "lr_fell_count": fell,
        "lr_rose_count": sum(t["lr_rose_count"] for _, t in seen),
        "lr_fell_frac": fell / covered if covered else math.nan,
    }


def rounding(
    entries: Sequence[Entry], tensors: Mapping[str, Mapping[str, float]]
) -> dict[str, Any]:
    """How far the exact update may be from the stored ``p_after - p_before``: per tensor
    (:func:`~.exact.update_rounding`) and for the stepper (the root of their squares)."""
    per = {
        e.name: update_rounding(
            e.param.dtype.to_real(),
            tensors[e.name]["param_norm"],
            tensors[e.name]["update_norm"],
        )
        for e in entries
    }
    return {
        "update_rounding": per,
        "aggregate_update_rounding": math.sqrt(sum(b * b for b in per.values())),
    }
