"""Quantiles of pooled samples: per tensor (numpy's linear interpolation) and pooled
(each element weighted by its tensor's ``numel / n``), in a few vectorized operations."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .sampling import Layout

__all__ = ["quantiles"]


def _interpolate(
    ordered: torch.Tensor, start: torch.Tensor, n: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """numpy's linear quantiles of runs of sorted values: in row r of ``ordered`` (R, L),
    run i starts at ``start[i]`` and has ``n[r, i]`` values. (R, S, Q) float64; NaN for an
    empty run."""
    last = (n[:, :, None] - 1).clamp(min=0).double()
    pos = q[None, None, :] * last
    lo = pos.floor()
    t = pos - lo
    base = start[None, :, None]
    a = torch.gather(ordered, 1, (base + lo.long()).flatten(1)).view(lo.shape).double()
    b = (
        torch.gather(ordered, 1, (base + torch.minimum(lo + 1, last).long()).flatten(1))
        .view(lo.shape)
        .double()
    )
    out = torch.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)
    return out.masked_fill_(n[:, :, None] == 0, math.nan)


def _whole(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.nanquantile(x, q, dim=1).t()`` ((R, Q) float64), by one sort (nanquantile
    takes milliseconds for ten thousand elements)."""
    ordered = torch.sort(x.masked_fill(torch.isnan(x), math.nan), dim=1).values  # NaN last
    n = (~torch.isnan(x)).sum(1, keepdim=True)
    return _interpolate(ordered, torch.zeros(1, dtype=torch.long, device=x.device), n, q)[:, 0]


def _order_key(x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """int64 keys sorting float32 ``x`` by (segment, value), NaN last in each segment."""
    bits = x.view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)
    return (seg << 32) | ordered


def quantiles(
    layout: Layout, x: torch.Tensor, qs: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``x`` (R, L): per-segment linear-interpolation quantiles over its
    non-NaN elements ((R, S, Q), NaN for a segment without any), and the pooled
    (aggregate) quantiles ((R, Q): weighted inverse CDF, or linear interpolation when
    every tensor is taken whole)."""
    q = layout.constant(qs, torch.float64)
    if layout.single:  # the aggregate of one tensor is that tensor
        per = _whole(x, q)
        return per[:, None, :], per
    valid = ~torch.isnan(x)
    x = x.masked_fill(~valid, math.nan)  # one NaN (positive) so that it sorts last
    glob, order = torch.sort(x, dim=1)  # NaN last
    n = torch.segment_reduce(
        valid.double(), "sum", axis=1, lengths=layout.lengths.expand(x.shape[0], -1)
    ).long()
    if x.dtype == torch.float32:
        by_seg = torch.sort(_order_key(x, layout.seg), dim=1).indices
    else:
        by_seg = torch.gather(order, 1, torch.sort(layout.seg[order], dim=1, stable=True).indices)
    per = _interpolate(torch.gather(x, 1, by_seg), layout.offsets, n, q)
    total = valid.sum(1, keepdim=True)
    if all(layout.exact):
        return per, _whole(x, q)
    weights = layout.constant(layout.weights, torch.float64)
    w = weights[layout.seg[order]].masked_fill(torch.isnan(glob), 0.0)
    cum = torch.cumsum(w, 1)
    idx = torch.searchsorted(cum, q[None, :] * cum[:, -1:]).clamp(max=x.shape[1] - 1)
    pooled = torch.gather(glob, 1, idx).double().masked_fill(total == 0, math.nan)
    return per, pooled
