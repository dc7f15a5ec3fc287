"""Localized signals: which elements' effective LR jumped, exactly, for a budget of
elements per step.

Per tensor, over all of its elements, at every step after its first: how many elements'
effective LR fell (``lr_fell_count``) or rose (``lr_rose_count``) by more than
:data:`FACTOR` since the previous step beyond what the schedule explains, their fraction
(``lr_fell_frac``), and the :data:`TOP_K` elements (flat indices into the real view, and
values) with the largest such change and with the largest second-moment shock. The change
beyond the schedule of one element is ::

    rho = lr_eff(t) / lr_eff(t-1) / (lr_scale(t) / lr_scale(t-1))
        = (sqrt(v(t-1)) + eps * sqrt(bc2(t-1))) / (sqrt(v(t)) + eps * sqrt(bc2(t)))

(``v`` the denominator's second moment: max_exp_avg_sq under amsgrad), exact with eps;
the shock is ``g^2 / v_hat(t-1)`` with g the gradient as sent. Adam's v shrinks by at most
beta2 a step, so its effective LR rises by at most ``1 / sqrt(beta2)`` beyond the schedule
(``lr_rose_count`` stays 0 for a factor of 2); a v jump makes it fall, and AMSGrad's
max_exp_avg_sq only moves when v passes its maximum.

Cost: this needs the previous step's v; it is kept, as a copy in the state's dtype, for
the smallest stepped tensors while their elements add up to :data:`LOCAL_BUDGET` (4 MiB of
fp32 copies, a few milliseconds of work per step at most); larger tensors beyond the budget
report NaN counts and no top elements (``local`` in the signals lists the tensors covered).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from adamscope.client.numerics import Factors, real_flat

from .sampling import Entry

__all__ = ["FACTOR", "LOCAL_BUDGET", "LOCAL_SIGNALS", "TOP_K", "covered", "local_pass", "unpack"]

#: A change of an element's effective LR by more than this factor is counted.
FACTOR = 2.0
#: Elements per step (the smallest tensors first) whose previous v is kept and compared.
LOCAL_BUDGET = 1 << 20
#: Elements reported per tensor with the largest change and the largest shock.
TOP_K = 8
#: The per-tensor scalar signals this adds.
LOCAL_SIGNALS = ("lr_fell_count", "lr_rose_count", "lr_fell_frac")


def covered(numels: Sequence[int]) -> list[int]:
    """Indices of the tensors covered (smallest first while within the budget)."""
    out, used = [], 0
    for i in sorted(range(len(numels)), key=numels.__getitem__):
        if used + numels[i] > LOCAL_BUDGET:
            break
        out.append(i)
        used += numels[i]
    return sorted(out)


def _source(e: Entry) -> torch.Tensor:
    s = e.state
    amsgrad = e.group["amsgrad"] and "max_exp_avg_sq" in s
    return real_flat(s["max_exp_avg_sq"] if amsgrad else s["exp_avg_sq"])


def local_pass(
    entries: Sequence[Entry],
    which: Sequence[int],
    prev: Mapping[str, tuple[torch.Tensor, Factors]],
    factors: Sequence[Factors],
) -> tuple[list[torch.Tensor], dict[str, tuple[torch.Tensor, Factors]]]:
    """For each covered entry with a previous v: one float64 vector ``[fell, rose,
    k change indices, k change values, k shock indices, k shock values]`` (on the device,
    for the caller's one transfer; padded with NaN); and the copies of v for the next
    step."""
    out: list[torch.Tensor] = []
    keep: dict[str, tuple[torch.Tensor, Factors]] = {}
    for i in which:
        e, f = entries[i], factors[i]
        v = _source(e)
        keep[e.name] = (v.clone(), f)
        before = prev.get(e.name)
        if before is None or before[0].shape != v.shape or not f.defined:
            out.append(torch.full((2 + 4 * TOP_K,), math.nan, dtype=torch.float64, device=v.device))
            continue
        v0, f0 = before
        wide = torch.float64 if v.dtype == torch.float64 else torch.float32
        d1 = v.to(wide).sqrt().add_(f.eps * f.bc2_sqrt)
        rho = v0.to(wide).sqrt().add_(f0.eps * f0.bc2_sqrt).div_(d1)
        fell = (rho < 1 / FACTOR).sum()
        rose = (rho > FACTOR).sum()
        change = rho.log().abs_().nan_to_num_(nan=-math.inf)
        g = real_flat(e.grad).to(wide)
        shock = (g * g).mul_(f0.bc2).div_(v0.to(wide)).nan_to_num_(nan=-math.inf)
        k = min(TOP_K, v.numel())
        top_c, top_s = torch.topk(change, k), torch.topk(shock, k)
        pad = torch.full((TOP_K - k,), math.nan, dtype=torch.float64, device=v.device)
        parts = [torch.stack([fell, rose]).double()]
        for top, values in ((top_c, rho), (top_s, shock)):
            parts += [top.indices.double(), pad, values[top.indices].double(), pad]
        out.append(torch.cat(parts))
    return out, keep


def unpack(row: Sequence[float], numel: int) -> tuple[dict[str, float], dict[str, object]]:
    """One covered tensor's scalars and its top elements from :func:`local_pass`'s row."""
    fell, rose = row[0], row[1]
    scalars = {
        "lr_fell_count": fell,
        "lr_rose_count": rose,
        "lr_fell_frac": fell / numel if numel else math.nan,
    }
    tops: dict[str, object] = {}
    at = 2
    for label in ("lr_change", "shock"):
        index, values = row[at : at + TOP_K], row[at + TOP_K : at + 2 * TOP_K]
        at += 2 * TOP_K
        pairs = [
            (int(i), v)
            for i, v in zip(index, values, strict=True)
            if not math.isnan(i) and math.isfinite(v)
        ]
        tops[label] = {"index": [i for i, _ in pairs], "value": [v for _, v in pairs]}
    return scalars, tops
