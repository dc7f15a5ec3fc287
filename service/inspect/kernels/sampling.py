"""Which elements of each stepped tensor the signals read, and where they sit pooled.

Each step samples about :data:`STEP_SAMPLE` elements in all, in runs of :data:`BLOCK` (see
the package docstring); a :class:`Layout` keeps, per set of stepped tensors, each one's
plan and its place in the pooled buffers the signals are computed on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adamscope.client.numerics import real_flat, rounded_scalar, upload, wide_dtype

__all__ = [
    "BLOCK",
    "MIN_PER_TENSOR",
    "STEP_SAMPLE",
    "WHOLE_BUDGET",
    "BlockPlan",
    "Entry",
    "Layout",
    "block_plan",
    "build_layout",
    "gather",
    "layout_key",
    "per_seg",
    "round_as",
]

#: Elements sampled per step, in all, from the tensors not taken whole (see the package
#: docstring).
STEP_SAMPLE = 1 << 11
#: The smallest stepped tensors are taken whole (their estimates are exact) while their
#: elements add up to no more than this.
WHOLE_BUDGET = 1 << 12
#: Each stepped tensor gets at least this many sampled elements (a smaller one: all), fewer
#: (down to BLOCK) when there are so many tensors that this would pass 2 * STEP_SAMPLE.
MIN_PER_TENSOR = 64
#: Sampled tensors contribute runs of this many consecutive elements.
BLOCK = 16


@dataclass
class Entry:
    """One tensor that steps: its parameter, gradient, state dict and param group."""

    name: str
    param: torch.Tensor
    grad: torch.Tensor
    state: Mapping[str, Any]
    group: Mapping[str, Any]


@dataclass(frozen=True)
class BlockPlan:
    """``blocks`` runs of ``block`` consecutive elements of a flat tensor, the run ``k``
    starting at ``k * stride``; one run of all elements when the tensor is taken whole."""

    stride: int
    blocks: int
    block: int
    exact: bool

    @property
    def count(self) -> int:
        return self.blocks * self.block

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return flat
        return flat.as_strided((self.blocks, self.block), (self.stride, 1), flat.storage_offset())

    def indices(self) -> torch.Tensor:
        """The flat positions sampled, in sample order."""
        starts = torch.arange(self.blocks) * self.stride
        return (starts[:, None] + torch.arange(self.block)[None, :]).reshape(-1)


def block_plan(numel: int, want: int, last_dim: int = 0) -> BlockPlan:
    """About ``want`` of ``numel`` elements in runs of BLOCK (the whole tensor if that
    is no more than ``want``). The stride is ``BLOCK * s`` with ``s`` coprime with the
    last dimension, so the runs start at every multiple of gcd(stride, last_dim), which
    divides BLOCK: every column is visited."""
    if numel <= want:
        return BlockPlan(1, 1, numel, True)
    blocks = max(1, want // BLOCK)
    s = max(1, -(-numel // (BLOCK * blocks)))
    if last_dim > 1:
        while math.gcd(s, last_dim) != 1:
            s += 1
    stride = BLOCK * s
    blocks = max(1, min(blocks, (numel - BLOCK) // stride + 1))
    return BlockPlan(stride, blocks, BLOCK, False)


# ---------------------------------------------------------------------- layout


@dataclass
class Layout:
    """Where each stepped tensor's sample sits in the pooled buffers (cached per set of
    stepped tensors)."""

    key: tuple[Any, ...]
    names: list[str]
    plans: list[BlockPlan]
    numels: list[int]
    dtypes: list[torch.dtype]  # real dtype of each tensor
    cdtype: torch.dtype  # the pooled buffers' dtype
    device: torch.device
    seg: torch.Tensor  # segment id of every pooled element
    offsets: torch.Tensor  # (S,) first pooled element of each segment
    lengths: torch.Tensor  # (S,) elements per segment
    weights: list[float]  # numel / n per tensor
    exact: list[bool]
    #: (dtype, per-element mask or None for all) for each dtype narrower than cdtype
    narrow: list[tuple[torch.dtype, torch.Tensor | None]] = field(default_factory=list)
    #: the same for the widened dtype (float32 vs a float64 pool), for the lr division
    narrow_wide: list[tuple[torch.dtype, torch.Tensor | None]] = field(default_factory=list)
    seg_is: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # (S,) masks
    #: The sample views of each role's tensors, with those tensors: the parameters, states
    #: and gradient buffers are the same tensors step after step, and making a view costs
    #: more than the few elements it reads. One list per role, so at most one set of
    #: gradients a caller has dropped stays referenced until the next step replaces it.
    views: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=dict)
    #: Pooled sample buffers by (role, dtype), with each tensor's slot in it.
    buffers: dict[tuple[str, torch.dtype], tuple[torch.Tensor, list[torch.Tensor]]] = field(
        default_factory=dict
    )
    #: Constant tensors on the layout's device (quantile levels, weights), made once.
    constants: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)

    def constant(self, values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
        """``values`` as a tensor of ``dtype`` on the layout's device, uploaded once."""
        key = (tuple(values), dtype)
        found = self.constants.get(key)
        if found is None:
            found = self.constants[key] = upload(values, dtype, self.device)
        return found

    def buffer(self, role: str, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The pooled buffer of ``role`` and the views of it each tensor's sample fills
        (shaped as :meth:`BlockPlan.view` shapes the sample)."""
        found = self.buffers.get((role, dtype))
        if found is None:
            out = torch.empty(self.total, dtype=dtype, device=self.device)
            slots, at = [], 0
            for plan in self.plans:
                piece = out[at : at + plan.count]
                slots.append(piece if plan.exact else piece.view(plan.blocks, plan.block))
                at += plan.count
            found = self.buffers[(role, dtype)] = (out, slots)
        return found

    @property
    def total(self) -> int:
        return int(sum(p.count for p in self.plans))

    @property
    def single(self) -> bool:
        return len(self.plans) == 1

    def views_of(self, tensors: Sequence[torch.Tensor], role: str) -> list[torch.Tensor]:
        """The sampled elements of each of ``tensors`` (the stepped tensors, in layout
        order), as views."""
        hit = self.views.get(role)
        # The cached list holds its tensors, so none of their ids can have been reused.
        if (
            hit is not None
            and len(hit[0]) == len(tensors)
            and all(a is b for a, b in zip(hit[0], tensors, strict=True))
        ):
            return hit[1]
        views = [plan.view(real_flat(t)) for plan, t in zip(self.plans, tensors, strict=True)]
        # A non-contiguous tensor's flat form is a copy: never reuse one.
        if all(t.is_contiguous() for t in tensors):
            self.views[role] = (list(tensors), views)
        return views


def layout_key(entries: Sequence[Entry]) -> tuple[Any, ...]:
    return tuple(
        (e.name, tuple(e.param.shape), e.param.dtype, e.param.device.type, e.param.device.index)
        for e in entries
    )


def _last_dim(p: torch.Tensor) -> int:
    return 2 if p.is_complex() else (int(p.shape[-1]) if p.dim() >= 2 else 0)


def build_layout(entries: Sequence[Entry]) -> Layout:
    numels = [real_flat(e.param).numel() for e in entries]
    whole, used = set(), 0
    for i in sorted(range(len(numels)), key=numels.__getitem__):
        if used + numels[i] > WHOLE_BUDGET:
            break
        whole.add(i)
        used += numels[i]
    total = max(1, sum(n for i, n in enumerate(numels) if i not in whole))
    floor = max(BLOCK, min(MIN_PER_TENSOR, STEP_SAMPLE // len(entries)))
    plans = [
        block_plan(
            n, n if i in whole else max(floor, round(STEP_SAMPLE * n / total)), _last_dim(e.param)
        )
        for i, (e, n) in enumerate(zip(entries, numels, strict=True))
    ]
    dtypes = [real_flat(e.param).dtype for e in entries]
    cdtype = torch.float64 if torch.float64 in dtypes else torch.float32
    device = entries[0].param.device
    counts = [p.count for p in plans]
    seg = torch.repeat_interleave(
        torch.arange(len(entries), device=device), upload(counts, torch.int64, device)
    )
    offsets = [0]
    for c in counts[:-1]:
        offsets.append(offsets[-1] + c)
    layout = Layout(
        key=layout_key(entries),
        names=[e.name for e in entries],
        plans=plans,
        numels=numels,
        dtypes=dtypes,
        cdtype=cdtype,
        device=device,
        seg=seg,
        offsets=upload(offsets, torch.int64, device),
        lengths=upload(counts, torch.int64, device),
        weights=[n / max(1, p.count) for n, p in zip(numels, plans, strict=True)],
        exact=[p.exact for p in plans],
    )
    for d in sorted(set(dtypes), key=str):
        seg_mask = upload([x == d for x in dtypes], torch.bool, device)
        layout.seg_is[d] = seg_mask
        if d != cdtype:
            layout.narrow.append((d, None if all(x == d for x in dtypes) else seg_mask[seg]))
    wides = {d: wide_dtype(d) for d in dtypes}
    for w in sorted(set(wides.values()), key=str):
        if w != cdtype:
            mask = upload([wides[x] == w for x in dtypes], torch.bool, device)
            everywhere = all(wides[x] == w for x in dtypes)
            layout.narrow_wide.append((w, None if everywhere else mask[seg]))
    return layout


def round_as(
    x: torch.Tensor, narrow: Sequence[tuple[torch.dtype, torch.Tensor | None]]
) -> torch.Tensor:
    """Round the elements of narrower-dtype tensors to their dtype (emulating PyTorch
    computing in that dtype): exact, as the pool's dtype holds them and their operations'
    results (double rounding through a dtype of more than twice the precision is exact)."""
    for dtype, mask in narrow:
        rounded = x.to(dtype).to(x.dtype)
        x = rounded if mask is None else torch.where(mask, rounded, x)
    return x


def gather(
    layout: Layout, tensors: Sequence[torch.Tensor], role: str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The pooled sample: each tensor's planned elements in one buffer of ``dtype``
    (default: the pool's, widening), copied by one foreach call however many tensors.
    ``role`` names what the tensors are at which point of the step (``"p0"``, ``"g"``,
    ...): the buffer is the layout's for that role, overwritten by the next step's."""
    dtype = dtype or layout.cdtype
    views = layout.views_of(tensors, role)
    if len(views) == 1:
        return views[0].to(dtype, copy=True).view(-1)
    out, slots = layout.buffer(role, dtype)
    torch._foreach_copy_(slots, views)
    return out


Scalar = float | torch.Tensor


def per_seg(layout: Layout, values: Sequence[float], rounding: str = "") -> Scalar:
    """Per-tensor constants, rounded as PyTorch rounds a Python scalar it combines with
    that tensor: ``"storage"`` to the tensor's dtype (a scalar it adds), ``"opmath"`` to
    float32 for non-float64 tensors (a scalar it divides by). One Python float when every
    tensor has the same (a broadcast scalar: fewer operations), else per element."""
    rounded = [
        rounded_scalar(v, d if rounding == "storage" else wide_dtype(d)) if rounding else v
        for v, d in zip(values, layout.dtypes, strict=True)
    ]
    if len(set(rounded)) == 1 or all(math.isnan(v) for v in rounded):
        return rounded[0]
    return upload(rounded, torch.float64, layout.device).to(layout.cdtype)[layout.seg]
