"""Exact reductions of tensors (moments, extremes, counts) that merge exactly.

A :class:`Summary` of a tensor is computed in chunks and summaries of several tensors (or
of a sharded stepper's shards) merge into the summary of all of them: counts add, the norm
combines, the mean and the spread pool (Chan et al.'s parallel update).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Summary", "finite_part", "summarize_chunk"]

#: The variance comes from the sums when mean**2 <= this * variance (else two passes).
_SHORTCUT = 16.0


@dataclass
class Summary:
    """Exact reductions of one tensor (or several, merged), in Python numbers."""

    numel: int = 0
    nan: int = 0
    inf: int = 0
    zeros: int = 0
    finite: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    sumsq: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def merge(self, other: Summary) -> None:
        """Chan et al.'s parallel update of mean and m2, plus the plain totals."""
        n_a, n_b = self.finite, other.finite
        if n_b:
            n = n_a + n_b
            delta = other.mean - self.mean
            self.mean += delta * n_b / n
            self.m2 += other.m2 + delta * delta * n_a * n_b / n
            self.min = min(self.min, other.min)
            self.max = max(self.max, other.max)
        self.numel += other.numel
        self.nan += other.nan
        self.inf += other.inf
        self.zeros += other.zeros
        self.finite += other.finite
        self.sumsq += other.sumsq

    @staticmethod
    def from_fields(fields: Mapping[str, Any]) -> Summary:
        """A summary from the fields :meth:`fields` gives (and JSON carries: non-finite
        numbers as strings), so that summaries computed elsewhere (a shard's) merge."""

        def number(key: str, default: float) -> float:
            value = fields.get(key)
            x = default if value is None else float(value)
            return default if math.isnan(x) else x

        finite = int(fields.get("finite") or 0)
        std = number("std", 0.0)
        return Summary(
            numel=int(fields.get("numel") or 0),
            nan=int(fields.get("nan") or 0),
            inf=int(fields.get("inf") or 0),
            zeros=int(fields.get("zeros") or 0),
            finite=finite,
            mean=number("mean", 0.0) if finite else 0.0,
            m2=std * std * finite,
            sumsq=number("norm", 0.0) ** 2,
            min=number("min", math.inf) if finite else math.inf,
            max=number("max", -math.inf) if finite else -math.inf,
        )

    def fields(self) -> dict[str, Any]:
        defined = self.finite > 0
        return {
            "numel": self.numel,
            "finite": self.finite,
            "nan": self.nan,
            "inf": self.inf,
            "zeros": self.zeros,
            "norm": math.sqrt(self.sumsq),
            "mean": self.mean if defined else math.nan,
            "std": math.sqrt(max(self.m2, 0.0) / self.finite) if defined else math.nan,
            "min": self.min if defined else math.nan,
            "max": self.max if defined else math.nan,
        }


def finite_part(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``x`` without NaN/Inf (the same tensor when all are finite), and the counts."""
    fin = torch.isfinite(x)
    n_fin = int(fin.sum())
    if n_fin == x.numel():
        return x, 0, 0
    nan = int(torch.isnan(x).sum())
    return x[fin], nan, x.numel() - n_fin - nan


def _reductions(x: torch.Tensor) -> list[float]:
    """min, max, sum, L2 norm and non-zero count of a non-empty ``x``, in one transfer."""
    lo, hi = torch.aminmax(x)
    parts = [lo, hi, x.sum(), torch.linalg.vector_norm(x), torch.count_nonzero(x).to(x.dtype)]
    return [float(v) for v in torch.stack(parts).tolist()]


def summarize_chunk(
    x: torch.Tensor, scratch: torch.Tensor | None = None
) -> tuple[Summary, torch.Tensor]:
    """Exact reductions of one chunk (wide dtype), and its finite values. ``scratch``: a
    reusable buffer of at least ``x``'s size and dtype for the deviations."""
    s = Summary(numel=x.numel())
    if x.numel() == 0:
        return s, x
    values = _reductions(x)  # one device sync
    if not (math.isfinite(values[0]) and math.isfinite(values[1])):
        # A NaN propagates through aminmax, an Inf is an extreme: the sums are of no use.
        x, s.nan, s.inf = finite_part(x)
        if x.numel():
            values = _reductions(x)
    s.finite = x.numel()
    if s.finite == 0:
        return s, x
    s.min, s.max = values[0], values[1]
    s.mean = values[2] / s.finite
    s.sumsq = values[3] ** 2
    s.zeros = s.finite - int(values[4])
    # The spread: from the sums when the mean is small against it (the cancellation then
    # costs at most a few bits of the norm's accuracy), else a second pass over the
    # deviations from the mean, exact however large the mean.
    m2 = s.sumsq - s.finite * s.mean * s.mean
    if m2 > 0 and s.mean * s.mean * s.finite <= _SHORTCUT * m2:
        s.m2 = m2
    else:
        dev = scratch[: s.finite] if scratch is not None else torch.empty_like(x)
        s.m2 = float(torch.linalg.vector_norm(torch.sub(x, s.mean, out=dev))) ** 2
    return s, x
