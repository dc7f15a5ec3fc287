"""Histograms over time: per tensor, the distribution of ``log10|x|`` of its gradient,
exp_avg, exp_avg_sq and effective LR, one column of a heat map every
:data:`HISTOGRAM_EVERY` steps.

The bins are fixed (:data:`LO` to :data:`HI` in :data:`BINS` bins of equal width in
``log10|x|``, the same at every step so columns compare), with three more counts: values
below ``10**LO`` but not zero (``under``), at or above ``10**HI`` (``over``), exactly zero
(``zeros``), and NaN/Inf (``nonfinite``). A tensor of at most :data:`SAMPLE` elements is
binned whole: its counts are exact. A larger one is binned over :data:`SAMPLE` elements
drawn uniformly and independently (with replacement) at each recorded step, its counts
scaled by ``numel / SAMPLE``: an estimate, whose cumulative fractions are within the
Dvoretzky-Kiefer-Wolfowitz bound ``rank_error`` of the whole tensor's at 99% confidence
(so each bin's fraction, a difference of two of them, within twice that). ``rank_error``
is 0.0 for a tensor binned whole.

Cost: at most :data:`SAMPLE` elements per tensor and quantity, pooled in float64 for one
``bincount`` per quantity and one transfer to the host, at one step in
:data:`HISTOGRAM_EVERY`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from adamscope.client.numerics import Factors, real_flat

from .assemble import rank_error
from .sampling import Entry

__all__ = [
    "BINS",
    "HI",
    "HISTOGRAM_EVERY",
    "KEYS",
    "LO",
    "SAMPLE",
    "edges",
    "histograms",
    "wanted",
]

#: Recorded at the steps that are a multiple of this.
HISTOGRAM_EVERY = 50
#: The quantities binned.
KEYS = ("grad", "exp_avg", "exp_avg_sq", "lr_eff")
#: log10|x| range and bins: 0.25 decade each from 1e-20 to 1e4.
LO, HI, BINS = -20.0, 4.0, 96
#: Elements binned per tensor and quantity (a tensor with no more is binned whole).
SAMPLE = 1 << 12
#: Extra counts after the bins, in this order.
EXTRA = ("under", "over", "zeros", "nonfinite")


def edges() -> list[float]:
    """The bins' edges in log10|x| (``BINS + 1`` of them)."""
    width = (HI - LO) / BINS
    return [LO + i * width for i in range(BINS + 1)]


def wanted(step: int) -> bool:
    """Whether histograms are recorded at this step."""
    return step > 0 and step % HISTOGRAM_EVERY == 0


def _picks(numel: int, device: torch.device, gen: torch.Generator) -> torch.Tensor | None:
    """The elements to bin: None for all of them, else :data:`SAMPLE` uniform draws."""
    if numel <= SAMPLE:
        return None
    return torch.randint(numel, (SAMPLE,), device=device, generator=gen)


def _values(e: Entry, key: str, f: Factors, pick: torch.Tensor | None) -> torch.Tensor:
    """The quantity ``key`` of entry ``e`` at the ``pick``ed elements (all if None), flat,
    in float64 (lr_eff: ``step_size / (sqrt(v_hat) / sqrt(bc2) + eps)``, v_hat from
    max_exp_avg_sq under amsgrad): only the picked elements are read and transformed."""
    s = e.state
    if key == "grad":
        src = e.grad
    elif key != "lr_eff":
        src = s[key]
    else:
        amsgrad = e.group["amsgrad"] and "max_exp_avg_sq" in s
        src = s["max_exp_avg_sq"] if amsgrad else s["exp_avg_sq"]
    flat = real_flat(src)
    # ``.double()`` of a float64 tensor is the tensor itself: nothing below works in place,
    # the state is the optimizer's (a trainer's own, when it is watched).
    x = (flat if pick is None else flat[pick]).double()
    if key != "lr_eff":
        return x
    if not f.defined:
        return torch.full_like(x, math.nan)
    return f.step_size / (x.sqrt() / f.bc2_sqrt + f.eps)


def bin_index(x: torch.Tensor) -> torch.Tensor:
    """Each float64 value's slot: bins 0..BINS-1, then under, over, zeros, nonfinite."""
    a = x.abs()
    logs = a.log10()
    width = (HI - LO) / BINS
    slot = ((logs - LO) / width).floor().clamp_(-1, BINS).long()
    slot = torch.where(slot < 0, BINS, torch.where(slot >= BINS, BINS + 1, slot))
    slot = torch.where(a == 0, BINS + 2, slot)
    return torch.where(torch.isfinite(x), slot, BINS + 3)


def histograms(entries: Sequence[Entry], factors: Sequence[Factors], seed: int) -> dict[str, Any]:
    """``{"edges", "tensors": {name: {key: {"counts", "under", "over", "zeros",
    "nonfinite"}}}, "rank_error": {name: bound}}`` of the entries now (after their step).
    The draws come from a generator of their own seeded with ``seed`` (the step): torch's
    global random state, which a training job may rely on, is left alone."""
    if not entries:
        return {"edges": edges(), "tensors": {}, "rank_error": {}}
    device = entries[0].param.device
    gen = torch.Generator(device=device).manual_seed(seed)
    slots = BINS + len(EXTRA)
    numels = [real_flat(e.param).numel() for e in entries]
    picks = [_picks(n, device, gen) for n in numels]
    sizes = [n if pick is None else SAMPLE for n, pick in zip(numels, picks, strict=True)]
    offsets = torch.repeat_interleave(
        torch.arange(len(entries), device=device) * slots,
        torch.tensor(sizes, device=device),
    )
    rows = []
    for key in KEYS:  # one binning pass over every tensor's values at once
        values = torch.cat(
            [_values(e, key, f, pick) for e, f, pick in zip(entries, factors, picks, strict=True)]
        )
        rows.append(torch.bincount(bin_index(values) + offsets, minlength=len(entries) * slots))
    host = torch.stack(rows).view(len(KEYS), len(entries), slots).tolist()  # one transfer
    out: dict[str, Any] = {"edges": edges(), "tensors": {}, "rank_error": {}}
    for i, (e, n, pick) in enumerate(zip(entries, numels, picks, strict=True)):
        scale = 1.0 if pick is None else n / SAMPLE
        out["tensors"][e.name] = {
            key: {
                "counts": [c * scale for c in host[k][i][:BINS]],
                **{x: host[k][i][BINS + j] * scale for j, x in enumerate(EXTRA)},
            }
            for k, key in enumerate(KEYS)
        }
        out["rank_error"][e.name] = 0.0 if pick is None else rank_error(SAMPLE)
    return out
