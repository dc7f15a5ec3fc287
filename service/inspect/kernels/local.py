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

Cost: this needs the previous step's v; it is kept, pooled in float32 (float64 for float64
tensors), for the smallest stepped tensors while their elements add up to
:data:`LOCAL_BUDGET` (1 MiB of copies; a tensor keeps its copy through steps it skips), with
a few pooled operations per step however many tensors; the top elements are found only at
a step that counted a change. Larger tensors beyond the budget report NaN counts and no top
elements (``local["covered"]`` in the signals lists the tensors covered).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adamscope.client.numerics import Factors, real_flat, upload

from .sampling import Entry

__all__ = [
    "FACTOR",
    "LOCAL_BUDGET",
    "LOCAL_SIGNALS",
    "TOP_K",
    "Kept",
    "covered",
    "local_pass",
    "tops",
]

#: A change of an element's effective LR by more than this factor is counted.
FACTOR = 2.0
#: Elements per step (the smallest tensors first) whose previous v is kept and compared.
LOCAL_BUDGET = 1 << 18
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


@dataclass
class Kept:
    """The covered tensors' v after a step, pooled (one buffer in a wide dtype), with each
    tensor's name, length and factors at that step."""

    names: list[str]
    lengths: list[int]
    factors: list[Factors]
    v: torch.Tensor

    def pieces(self) -> dict[str, tuple[torch.Tensor, Factors]]:
        views = self.v.split_with_sizes(self.lengths)
        return {n: (piece, f) for n, piece, f in zip(self.names, views, self.factors, strict=True)}


@functools.lru_cache(maxsize=4)
def _segments(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The tensor each pooled element belongs to (made once per set of lengths)."""
    idx = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)])
    return idx.to(device)


def _previous(
    before: Sequence[tuple[torch.Tensor, Factors] | None],
    lengths: Sequence[int],
    ok: Sequence[bool],
    wide: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The previous v pooled as the current one is (NaN where there is none): the kept
    buffer itself when every piece is its own, in order (the usual case: no copy)."""
    pieces = [b[0] for b in before if b is not None]
    if all(ok) and pieces and pieces[0].dtype == wide:
        base = pieces[0]
        start = base.storage_offset()
        contiguous = all(
            p.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
            and p.storage_offset() == start + sum(lengths[:i])
            for i, p in enumerate(pieces)
        )
        if contiguous:
            return base.as_strided((sum(lengths),), (1,), start)
    return torch.cat(
        [
            b[0].to(wide)
            if b is not None and good
            else torch.full((n,), math.nan, dtype=wide, device=device)
            for b, n, good in zip(before, lengths, ok, strict=True)
        ]
    )


def local_pass(
    entries: Sequence[Entry],
    which: Sequence[int],
    prev: Mapping[str, tuple[torch.Tensor, Factors]],
    factors: Sequence[Factors],
) -> tuple[torch.Tensor, Kept, torch.Tensor]:
    """The covered entries' ``[fell, rose]`` counts ((n, 2) float64 on the device, NaN for a
    tensor without a previous v), the pooled v kept for the next step, and each pooled
    element's change ``rho`` (for :func:`tops`). A few operations over the pooled covered
    tensors however many they are."""
    chosen = [entries[i] for i in which]
    sources = [_source(e) for e in chosen]
    lengths = [v.numel() for v in sources]
    device = chosen[0].param.device if chosen else torch.device("cpu")
    wide = torch.float64 if any(v.dtype == torch.float64 for v in sources) else torch.float32
    cur = torch.empty(sum(lengths), dtype=wide, device=device)
    if not chosen:
        empty = torch.zeros((0, 2), dtype=torch.float64, device=device)
        return empty, Kept([], [], [], cur), cur
    torch._foreach_copy_(list(cur.split_with_sizes(lengths)), sources)
    before = [prev.get(e.name) for e in chosen]
    ok = [
        b is not None and b[0].numel() == n and factors[i].defined
        for b, n, i in zip(before, lengths, which, strict=True)
    ]
    old = _previous(before, lengths, ok, wide, device)
    lens = upload(lengths, torch.int64, device)

    def per_element(values: list[float]) -> torch.Tensor | float:
        if len(set(values)) == 1:  # one group, one step: a scalar
            return values[0]
        return upload(values, wide, device)[_segments(tuple(lengths), device)]

    e_now = per_element([factors[i].eps * factors[i].bc2_sqrt for i in which])
    e_then = per_element([b[1].eps * b[1].bc2_sqrt if b is not None else math.nan for b in before])
    rho = old.sqrt().add_(e_then).div_(cur.sqrt().add_(e_now))
    flags = torch.stack([rho < 1 / FACTOR, rho > FACTOR]).to(wide)
    counts = torch.segment_reduce(flags, "sum", lengths=lens.expand(2, -1), axis=1).t()
    valid = upload(ok, torch.bool, device)[:, None]
    counts = counts.double().masked_fill(~valid, math.nan)
    kept = Kept([e.name for e in chosen], lengths, [factors[i] for i in which], cur)
    return counts, kept, rho


def tops(
    entries: Sequence[Entry],
    which: Sequence[int],
    rho: torch.Tensor,
    kept: Kept,
    prev: Mapping[str, tuple[torch.Tensor, Factors]],
    flagged: Sequence[int],
) -> dict[str, dict[str, dict[str, list[Any]]]]:
    """The :data:`TOP_K` elements by change of effective LR and by shock of the covered
    tensors ``flagged`` (positions in ``which``): ``{name: {"lr_change": {"index",
    "value"}, "shock": {...}}}`` (one transfer; run only at a step that counted a change)."""
    pieces = rho.split_with_sizes(kept.lengths)
    parts, names = [], []
    for j in flagged:
        e = entries[which[j]]
        before = prev[e.name]
        r = pieces[j]
        g = real_flat(e.grad).to(r.dtype)
        shock = (g * g).mul_(before[1].bc2).div_(before[0].to(r.dtype))
        k = min(TOP_K, r.numel())
        for values, key in ((r, r.log().abs_()), (shock, shock)):
            top = torch.topk(key.nan_to_num(nan=-math.inf), k)
            parts += [top.indices.double(), values[top.indices].double()]
        names.append((e.name, k))
    host = torch.cat(parts).tolist() if parts else []
    out: dict[str, dict[str, dict[str, list[Any]]]] = {}
    at = 0
    for name, k in names:
        found: dict[str, dict[str, list[Any]]] = {}
        for label in ("lr_change", "shock"):
            index, got = host[at : at + k], host[at + k : at + 2 * k]
            at += 2 * k
            pairs = [(int(i), v) for i, v in zip(index, got, strict=True) if math.isfinite(v)]
            found[label] = {"index": [i for i, _ in pairs], "value": [v for _, v in pairs]}
        out[name] = found
    return out
