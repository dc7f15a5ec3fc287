"""Per-step signals: cheap scalars that show what Adam just did, after every step.

:class:`SignalObserver` watches a stepper's steps (a :class:`~.stepper.StepObserver`) and
leaves, after each one, ``stepper.signals``::

    {"step": 12, "time": 1718000000.0,
     "tensors": {"w": {"grad_norm": ..., ...}, ...},   # every tensor that stepped
     "aggregate": {"grad_norm": ..., ...},              # the stepper as a whole
     "sample": {"w": 1024, ...}}                        # elements sampled per tensor

with the signals of :data:`SIGNALS` (floats; NaN where undefined, e.g. at the first step):

=================  ===============================================================
grad_norm          L2 norm of the gradient (as sent: before maximize/weight decay)
param_norm         L2 norm of the parameter after the step
update_norm        L2 norm of the step's change ``p_after - p_before``
update_ratio       ``update_norm / norm(p_before)``
exp_avg_norm       L2 norm of ``exp_avg`` (m) after the step
exp_avg_sq_mean    mean of ``exp_avg_sq`` (v) after the step
lr_eff_p1/p50/p99  quantiles of this step's effective learning rate ``step_size / denom``
                   (``denom`` from ``max_exp_avg_sq`` under amsgrad; see below)
shock_p99          p99 of ``g^2 / v_hat(t-1)``, g the gradient v sees (with Adam's L2
                   weight decay), ``v_hat(t-1) = exp_avg_sq / bc2`` before the step, over
                   the elements where that is > 0; NaN at a tensor's first step
gamma_frac         fraction of elements whose effective LR grew since the previous step
                   (Reddi et al.'s Gamma_t < 0, which AMSGrad rules out up to bias
                   correction); NaN at the first step
amsgrad_clamp      mean of ``max_exp_avg_sq / exp_avg_sq`` where ``exp_avg_sq > 0`` (1.0
                   exactly without amsgrad)
eps_dominance      fraction of elements with ``sqrt(v_hat) < eps``
nan_count          NaN elements in the gradient, exp_avg and exp_avg_sq together
inf_count          the same for +-Inf
=================  ===============================================================

Quantiles and fractions are over the elements where the value is defined (not NaN).

Cost: a fused CPU step of a 10M-element tensor takes a few milliseconds; the signals must
cost a small fraction of that, so they come from a sample. Each step samples about
:data:`STEP_SAMPLE` elements in all, shared among the stepped tensors in proportion to
their size with at least :data:`MIN_PER_TENSOR` each (a tensor that small is taken whole).
A sampled tensor contributes blocks of :data:`BLOCK` consecutive elements (one cache line
of fp32) every ``stride`` elements, the stride a multiple of the block chosen so that the
blocks pass through every column (:func:`block_plan`): the same elements every step, so
step-to-step comparisons such as gamma compare like with like. Norms are scaled up from the
sample (``norm * sqrt(numel / n)``), means and fractions are the sample's; for a tensor
taken whole every signal is exact. NaN/Inf counts are exact whenever they are reported
non-zero: when the sample holds a NaN/Inf, or when a scan finds one, they are counted over
the whole gradient, exp_avg and exp_avg_sq. The scan reads the next :data:`SCAN_STEP`
elements of the sampled tensors' exp_avg_sq (taken as one run) every step, round robin
(every NaN/Inf a gradient brings reaches v and stays there), so a fault outside the sample
is counted within ``numel / SCAN_STEP`` steps (76 for 10M elements, however many tensors
hold them). All of it runs on the stepper's device, vectorized over all stepped tensors
at once (a few dozen small operations per step however many tensors: each sample is
gathered by one foreach copy through views kept from step to step), with one transfer of
the results to the host.

The effective LR and its denominator reproduce PyTorch's for-loop (``_single_tensor_adam``)
bit for bit, including the roundings it does in 16-bit state dtypes (``denom`` is rounded
to the state's dtype after each of its operations) and the widening to float32 (float64 for
float64 tensors) for the division, exactly as :mod:`.stats` computes the ``lr_eff`` view.
The previous step's effective LR (for gamma) is the one this observer computed at that step
when the state is still the one it saw; otherwise (a restart, a state load) it is
recomputed from the state with the current options.

Aggregate signals treat the stepped tensors as one: norms combine as the root of the summed
squares, means and fractions weight each tensor by its size, counts add up, and quantiles
are taken over the pooled samples, each element weighted by its tensor's ``numel / n``
(exactly the quantile of the concatenation when every tensor is taken whole; otherwise the
weighted inverse CDF, without interpolation).
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .stats import Factors, adam_factors, real_flat, upload, wide_dtype
from ..engine.steps import rounded_scalar as _rounded

if TYPE_CHECKING:
    from ..engine.stepper import Stepper

__all__ = [
    "BLOCK",
    "MIN_PER_TENSOR",
    "SCAN_STEP",
    "SIGNALS",
    "STEP_SAMPLE",
    "BlockPlan",
    "Entry",
    "SignalCache",
    "SignalObserver",
    "attach_signals",
    "begin",
    "block_plan",
    "empty_signals",
    "finish",
    "observer_of",
]

log = logging.getLogger("adamscope.signals")

SIGNALS = ("grad_norm", "param_norm", "update_norm", "update_ratio", "exp_avg_norm",
           "exp_avg_sq_mean", "lr_eff_p1", "lr_eff_p50", "lr_eff_p99", "shock_p99",
           "gamma_frac", "amsgrad_clamp", "eps_dominance", "nan_count", "inf_count")
#: Elements sampled per step, in all (see the module docstring).
STEP_SAMPLE = 1 << 10
#: Each stepped tensor gets at least this many sampled elements (a smaller one: all), fewer
#: (down to BLOCK) when there are so many tensors that this would pass 2 * STEP_SAMPLE.
MIN_PER_TENSOR = 64
#: Sampled tensors contribute runs of this many consecutive elements.
BLOCK = 16
#: Elements of the sampled tensors' exp_avg_sq scanned for NaN/Inf per step (in all), in pieces
#: of SCAN_PIECE (small enough to run on one thread: no wait for a busy core).
SCAN_STEP = 1 << 17
SCAN_PIECE = 1 << 15
#: The quantiles computed of the effective LR and of the shock (whose p99 is reported).
_QUANTILES = (0.01, 0.5, 0.99)


def empty_signals() -> dict[str, Any]:
    """``stepper.signals`` before the first observed step."""
    return {"step": None, "time": None, "tensors": {}, "aggregate": {}, "sample": {}}


@dataclass
class Entry:
    """One tensor that steps: its parameter, gradient, state dict and param group."""

    name: str
    param: torch.Tensor
    grad: torch.Tensor
    state: Mapping[str, Any]
    group: Mapping[str, Any]


# ---------------------------------------------------------------------- sampling


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
        return flat.as_strided((self.blocks, self.block), (self.stride, 1),
                               flat.storage_offset())

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
    views: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = field(
        default_factory=dict)
    #: Pooled sample buffers by (role, dtype), with each tensor's slot in it.
    buffers: dict[tuple[str, torch.dtype], tuple[torch.Tensor, list[torch.Tensor]]] = field(
        default_factory=dict)
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
                piece = out[at:at + plan.count]
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
        if hit is not None and len(hit[0]) == len(tensors) and all(
                a is b for a, b in zip(hit[0], tensors, strict=True)):
            return hit[1]
        views = [plan.view(real_flat(t)) for plan, t in zip(self.plans, tensors, strict=True)]
        # A non-contiguous tensor's flat form is a copy: never reuse one.
        if all(t.is_contiguous() for t in tensors):
            self.views[role] = (list(tensors), views)
        return views


def _layout_key(entries: Sequence[Entry]) -> tuple[Any, ...]:
    return tuple((e.name, tuple(e.param.shape), e.param.dtype, e.param.device.type,
                  e.param.device.index) for e in entries)


def _last_dim(p: torch.Tensor) -> int:
    return 2 if p.is_complex() else (int(p.shape[-1]) if p.dim() >= 2 else 0)


def _build_layout(entries: Sequence[Entry]) -> Layout:
    numels = [real_flat(e.param).numel() for e in entries]
    total = max(1, sum(numels))
    floor = max(BLOCK, min(MIN_PER_TENSOR, STEP_SAMPLE // len(entries)))
    plans = [block_plan(n, max(floor, round(STEP_SAMPLE * n / total)), _last_dim(e.param))
             for e, n in zip(entries, numels, strict=True)]
    dtypes = [real_flat(e.param).dtype for e in entries]
    cdtype = torch.float64 if torch.float64 in dtypes else torch.float32
    device = entries[0].param.device
    counts = [p.count for p in plans]
    seg = torch.repeat_interleave(torch.arange(len(entries), device=device),
                                  upload(counts, torch.int64, device))
    offsets = [0]
    for c in counts[:-1]:
        offsets.append(offsets[-1] + c)
    layout = Layout(
        key=_layout_key(entries), names=[e.name for e in entries], plans=plans, numels=numels,
        dtypes=dtypes, cdtype=cdtype, device=device, seg=seg,
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


def _round(x: torch.Tensor, narrow: Sequence[tuple[torch.dtype, torch.Tensor | None]]
           ) -> torch.Tensor:
    """Round the elements of narrower-dtype tensors to their dtype (emulating PyTorch
    computing in that dtype): exact, as the pool's dtype holds them and their operations'
    results (double rounding through a dtype of more than twice the precision is exact)."""
    for dtype, mask in narrow:
        rounded = x.to(dtype).to(x.dtype)
        x = rounded if mask is None else torch.where(mask, rounded, x)
    return x


def _gather(layout: Layout, tensors: Sequence[torch.Tensor], role: str,
            dtype: torch.dtype | None = None) -> torch.Tensor:
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


def _per_seg(layout: Layout, values: Sequence[float], rounding: str = "") -> Scalar:
    """Per-tensor constants, rounded as PyTorch rounds a Python scalar it combines with
    that tensor: ``"storage"`` to the tensor's dtype (a scalar it adds), ``"opmath"`` to
    float32 for non-float64 tensors (a scalar it divides by). One Python float when every
    tensor has the same (a broadcast scalar: fewer operations), else per element."""
    rounded = [_rounded(v, d if rounding == "storage" else wide_dtype(d)) if rounding else v
               for v, d in zip(values, layout.dtypes, strict=True)]
    if len(set(rounded)) == 1 or all(math.isnan(v) for v in rounded):
        return rounded[0]
    return upload(rounded, torch.float64, layout.device).to(layout.cdtype)[layout.seg]


# ---------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class _Token:
    """Identifies a state as a step left it: the same tensors, ``step`` not advanced."""

    v: weakref.ref[torch.Tensor]
    step: weakref.ref[torch.Tensor]
    version: int

    @staticmethod
    def of(state: Mapping[str, Any]) -> _Token | None:
        v, step = state.get("exp_avg_sq"), state.get("step")
        if v is None or step is None:
            return None
        return _Token(weakref.ref(v), weakref.ref(step), step._version)

    def holds(self, state: Mapping[str, Any]) -> bool:
        step = state.get("step")
        return (self.v() is state.get("exp_avg_sq") and self.step() is step
                and step is not None and step._version == self.version)


def _cache_key(layout: Layout) -> tuple[Any, ...]:
    return (layout.key, tuple(layout.plans))


@dataclass
class SignalCache:
    """The effective LR each tensor's sample had after the last observed step, valid while
    its state is the one that step left (same tensors, step not advanced)."""

    layout_key: tuple[Any, ...] | None = None
    lr_eff: torch.Tensor | None = None
    tokens: list[_Token | None] = field(default_factory=list)

    def valid(self, layout: Layout, states: Sequence[Mapping[str, Any]]) -> list[bool]:
        if self.layout_key != _cache_key(layout) or self.lr_eff is None:
            return [False] * len(states)
        return [tok is not None and tok.holds(s)
                for s, tok in zip(states, self.tokens, strict=True)]


# ---------------------------------------------------------------------- one step


@dataclass
class Pending:
    """What :func:`begin` captured before the step, for :func:`finish`."""

    layout: Layout
    g: torch.Tensor
    p0: torch.Tensor
    lr_prev: torch.Tensor  # NaN where undefined
    shock: torch.Tensor  # NaN where undefined


def _steps(entries: Sequence[Entry]) -> list[float | None]:
    """Each entry's state step (None without state), one transfer per accelerator."""
    steps: list[float | None] = [None] * len(entries)
    remote: dict[torch.device, list[int]] = {}
    for i, e in enumerate(entries):
        s = e.state.get("step") if e.state else None
        if s is None:
            continue
        if s.device.type == "cpu":
            steps[i] = float(s)
        else:
            remote.setdefault(s.device, []).append(i)
    for idx in remote.values():
        values = torch.stack([entries[i].state["step"].reshape(()).double()
                              for i in idx]).tolist()
        for i, v in zip(idx, values, strict=True):
            steps[i] = v
    return steps


def _factors(entries: Sequence[Entry], steps: Sequence[float | None]) -> list[Factors]:
    """Each entry's Adam factors at its step (0 without state), once per distinct
    (param group, step): tensors of one group stepping together share them."""
    memo: dict[tuple[int, float], Factors] = {}
    out = []
    for e, t in zip(entries, steps, strict=True):
        key = (id(e.group), t if t is not None else 0.0)
        f = memo.get(key)
        if f is None:
            f = memo[key] = adam_factors(e.group, key[1])
        out.append(f)
    return out


def _lr_eff(layout: Layout, sources: Sequence[torch.Tensor], entries: Sequence[Entry],
            steps: Sequence[float | None], role: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Effective LR of the sampled ``sources`` (each tensor's v or vmax) at ``steps``,
    PyTorch's way: ``denom = (v.sqrt() / bc2_sqrt).add_(eps)`` in the state dtype, then
    ``step_size / denom`` widened (NaN where the factors are undefined). Also whether
    ``sqrt(v_hat) < eps`` (eps dominance) and the sample of ``sources``, widened.

    When every tensor shares its dtype and factors (one param group stepping together:
    the usual case) these are PyTorch's own operations on the sample in the state dtype,
    so they are its for-loop's numbers on any device. Otherwise the pooled, widened sample
    emulates the state dtype's roundings as the CPU kernels do them."""
    bc2s, eps, ss = [], [], []
    for t, f in zip(steps, _factors(entries, steps), strict=True):
        defined = t is not None and f.defined
        bc2s.append(f.bc2_sqrt if defined else 1.0)
        eps.append(f.eps)
        ss.append(f.step_size if defined else math.nan)
    wide = wide_dtype(layout.dtypes[0])
    uniform = (len(set(layout.dtypes)) == 1 and wide == layout.cdtype
               and all(len(set(map(repr, c))) == 1 for c in (bc2s, eps, ss)))
    if uniform:
        vs = _gather(layout, sources, role, layout.dtypes[0])
        root = vs.sqrt() / bc2s[0]
        # A 0-dim CPU tensor: a true division (not reciprocal * scalar, as a Python float
        # would give), its value passed to the kernel as an argument (no upload, no sync).
        lr = torch.tensor(ss[0], dtype=wide) / root.add(eps[0]).to(wide)
        return lr, root < eps[0], vs.to(layout.cdtype)
    vs = _gather(layout, sources, role)
    c_eps = _per_seg(layout, eps, "storage")
    root = _round(_round(vs.sqrt(), layout.narrow) / _per_seg(layout, bc2s, "opmath"),
                  layout.narrow)
    denom = _round(root + c_eps, layout.narrow)
    step_size = _per_seg(layout, ss, "opmath")
    if not isinstance(step_size, torch.Tensor):  # a true division, not reciprocal * scalar
        step_size = torch.tensor(step_size, dtype=denom.dtype)  # 0-dim on the CPU: no sync
    return _round(step_size / denom, layout.narrow_wide), root < c_eps, vs


def _v_source(e: Entry) -> torch.Tensor:
    s = e.state
    return s["max_exp_avg_sq"] if e.group["amsgrad"] and "max_exp_avg_sq" in s \
        else s["exp_avg_sq"]


def begin(entries: Sequence[Entry], cache: SignalCache | None,
          layout: Layout | None = None, valid: Sequence[bool] | None = None,
          steps: Sequence[float | None] | None = None) -> Pending:
    """Capture, before the step, what the signals compare against: the gradient and
    parameter samples, the previous effective LR and the second-moment shock. ``steps``:
    each entry's state step if the caller knows them (else read from the states)."""
    layout = layout or _build_layout(entries)
    g = _gather(layout, [e.grad for e in entries], "g")
    p0 = _gather(layout, [e.param for e in entries], "p0")
    nan = torch.full((layout.total,), math.nan, dtype=layout.cdtype, device=layout.device)
    with_state = [bool(e.state) and "exp_avg_sq" in e.state for e in entries]
    if not any(with_state):
        return Pending(layout, g, p0, nan, nan)
    known = _steps(entries) if steps is None else steps
    steps = [t if ok else None for t, ok in zip(known, with_state, strict=True)]
    v_prev = _gather(layout, [e.state["exp_avg_sq"] if ok else e.param
                              for e, ok in zip(entries, with_state, strict=True)], "v0")
    # Second-moment shock: the new gradient (as v will see it) against v_hat(t-1).
    bc2, wd = [], []
    for (e, t), f in zip(zip(entries, steps, strict=True), _factors(entries, steps),
                         strict=True):
        bc2.append(f.bc2 if t is not None and f.bc2 != 0 else math.nan)
        decay = float(e.group.get("weight_decay", 0.0))
        wd.append(decay if decay and not e.group.get("decoupled_weight_decay") else 0.0)
    g_eff = g if not any(wd) else g + _per_seg(layout, wd) * p0
    v_hat = v_prev / _per_seg(layout, bc2)
    shock = (g_eff * g_eff / v_hat).masked_fill_(~(v_hat > 0), math.nan)
    # The previous effective LR: the one computed at the last step, else from the state.
    ok_cache = list(valid) if valid is not None else (
        cache.valid(layout, [e.state for e in entries]) if cache is not None
        else [False] * len(entries))
    if all(ok_cache) and cache is not None and cache.lr_eff is not None:
        return Pending(layout, g, p0, cache.lr_eff, shock)
    lr_prev = _lr_eff(layout, [_v_source(e) if ok else e.param
                               for e, ok in zip(entries, with_state, strict=True)],
                      entries, steps, "vs0")[0]
    if any(ok_cache) and cache is not None and cache.lr_eff is not None:
        use = upload(ok_cache, torch.bool, layout.device)[layout.seg]
        lr_prev = torch.where(use, cache.lr_eff, lr_prev)
    return Pending(layout, g, p0, lr_prev, shock)


def _interpolate(ordered: torch.Tensor, start: torch.Tensor, n: torch.Tensor,
                 q: torch.Tensor) -> torch.Tensor:
    """numpy's linear quantiles of runs of sorted values: in row r of ``ordered`` (R, L),
    run i starts at ``start[i]`` and has ``n[r, i]`` values. (R, S, Q) float64; NaN for an
    empty run."""
    last = (n[:, :, None] - 1).clamp(min=0).double()
    pos = q[None, None, :] * last
    lo = pos.floor()
    t = pos - lo
    base = start[None, :, None]
    a = torch.gather(ordered, 1, (base + lo.long()).flatten(1)).view(lo.shape).double()
    b = torch.gather(ordered, 1, (base + torch.minimum(lo + 1, last).long()).flatten(1)
                     ).view(lo.shape).double()
    out = torch.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)
    return out.masked_fill_(n[:, :, None] == 0, math.nan)


def _order_key(x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """int64 keys sorting float32 ``x`` by (segment, value), NaN last in each segment."""
    bits = x.view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)
    return (seg << 32) | ordered


def _quantiles(layout: Layout, x: torch.Tensor, qs: Sequence[float]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``x`` (R, L): per-segment linear-interpolation quantiles over its
    non-NaN elements ((R, S, Q), NaN for a segment without any), and the pooled
    (aggregate) quantiles ((R, Q): weighted inverse CDF, or linear interpolation when
    every tensor is taken whole)."""
    q = layout.constant(qs, torch.float64)
    if layout.single:  # the aggregate of one tensor is that tensor
        per = torch.nanquantile(x.double(), q, dim=1).t()
        return per[:, None, :], per
    valid = ~torch.isnan(x)
    x = x.masked_fill(~valid, math.nan)  # one NaN (positive) so that it sorts last
    glob, order = torch.sort(x, dim=1)  # NaN last
    n = torch.segment_reduce(valid.double(), "sum", axis=1,
                             lengths=layout.lengths.expand(x.shape[0], -1)).long()
    if x.dtype == torch.float32:
        by_seg = torch.sort(_order_key(x, layout.seg), dim=1).indices
    else:
        by_seg = torch.gather(order, 1, torch.sort(layout.seg[order], dim=1, stable=True
                                                   ).indices)
    per = _interpolate(torch.gather(x, 1, by_seg), layout.offsets, n, q)
    total = valid.sum(1, keepdim=True)
    if all(layout.exact):
        return per, torch.nanquantile(x.double(), q, dim=1).t()
    weights = layout.constant(layout.weights, torch.float64)
    w = weights[layout.seg[order]].masked_fill(torch.isnan(glob), 0.0)
    cum = torch.cumsum(w, 1)
    idx = torch.searchsorted(cum, q[None, :] * cum[:, -1:]).clamp(max=x.shape[1] - 1)
    pooled = torch.gather(glob, 1, idx).double().masked_fill(total == 0, math.nan)
    return per, pooled


def finish(pending: Pending, entries: Sequence[Entry], step: int,
           steps: Sequence[float | None] | None = None) -> tuple[dict[str, Any], SignalCache]:
    """The signals of the step just taken, and the cache for the next one (``steps``:
    each entry's state step now, if the caller knows them)."""
    layout = pending.layout
    states = [e.state for e in entries]
    p1 = _gather(layout, [e.param for e in entries], "p1")
    m = _gather(layout, [s["exp_avg"] for s in states], "m1")
    v = _gather(layout, [s["exp_avg_sq"] for s in states], "v1")
    amsgrad = [bool(e.group["amsgrad"]) and "max_exp_avg_sq" in s
               for e, s in zip(entries, states, strict=True)]
    lr, below_eps, vs = _lr_eff(layout, [_v_source(e) for e in entries], entries,
                                _steps(entries) if steps is None else steps, "vs1")
    g, p0 = pending.g, pending.p0
    comparable = ~torch.isnan(lr + pending.lr_prev)
    squares = torch.stack([g, p1, p1 - p0, p0, m])
    flags = [(lr > pending.lr_prev) & comparable, comparable, below_eps,
             ~torch.isfinite(g + m + v)]
    values = [squares * squares, v[None]]
    if any(amsgrad):  # max_exp_avg_sq / exp_avg_sq where v > 0 (exactly 1 without amsgrad)
        has_v = v > 0
        values.append((vs / v).masked_fill_(~has_v, 0.0)[None])
        flags.append(has_v)
    columns = torch.cat([*values, torch.stack(flags).to(v.dtype)]).double()
    sums = (columns.sum(1, keepdim=True) if layout.single else
            torch.segment_reduce(columns, "sum", lengths=layout.lengths.expand(
                columns.shape[0], -1), axis=1))
    per_q, pooled_q = _quantiles(layout, torch.stack([lr, pending.shock]), _QUANTILES)
    # Hard faults: the next SCAN_STEP elements of the sampled tensors' v, every step.
    pieces = _scan_pieces([(i, real_flat(states[i]["exp_avg_sq"]))
                           for i, ex in enumerate(layout.exact) if not ex], step)
    parts = [sums.t().reshape(-1), per_q.reshape(-1), pooled_q.reshape(-1)]
    if pieces:
        parts.append(torch.stack(torch._foreach_max([p for _, p in pieces])).to(torch.float64))
    host = torch.cat(parts).tolist()  # the one transfer
    s_n, k, nq = len(entries), columns.shape[0], len(_QUANTILES)
    rows = [host[i * k:(i + 1) * k] for i in range(s_n)]
    pos = s_n * k
    lr_rows = [host[pos + i * nq: pos + (i + 1) * nq] for i in range(s_n)]
    pos += s_n * nq
    shock_rows = [host[pos + i * nq + 2] for i in range(s_n)]
    pos += s_n * nq
    lr_pooled, shock_pooled = host[pos: pos + nq], host[pos + nq + 2]
    pos += 2 * nq
    scan_found = {i for (i, _), top in zip(pieces, host[pos:], strict=True)
                  if not math.isfinite(top)}
    weights = layout.weights
    tensors: dict[str, dict[str, float]] = {}
    col = _Columns(any(amsgrad))
    for i, e in enumerate(entries):
        r, wt, n = rows[i], weights[i], layout.plans[i].count
        faulty = r[col.bad] > 0 or i in scan_found
        nan_count, inf_count = _exact_faults(e) if faulty else (0, 0)
        clamp = 1.0
        if amsgrad[i]:
            clamp = r[col.ratio] / r[col.has_v] if r[col.has_v] else math.nan
        tensors[e.name] = {
            "grad_norm": math.sqrt(wt * r[0]),
            "param_norm": math.sqrt(wt * r[1]),
            "update_norm": math.sqrt(wt * r[2]),
            "update_ratio": _div(math.sqrt(r[2]), math.sqrt(r[3])),
            "exp_avg_norm": math.sqrt(wt * r[4]),
            "exp_avg_sq_mean": r[5] / n,
            "lr_eff_p1": lr_rows[i][0],
            "lr_eff_p50": lr_rows[i][1],
            "lr_eff_p99": lr_rows[i][2],
            "shock_p99": shock_rows[i],
            "gamma_frac": r[col.grew] / r[col.comparable] if r[col.comparable] else math.nan,
            "amsgrad_clamp": clamp,
            "eps_dominance": r[col.eps] / n,
            "nan_count": float(nan_count),
            "inf_count": float(inf_count),
        }
    agg = _aggregate(layout, rows, col, tensors, amsgrad)
    agg.update({"lr_eff_p1": lr_pooled[0], "lr_eff_p50": lr_pooled[1],
                "lr_eff_p99": lr_pooled[2], "shock_p99": shock_pooled})
    signals = {"step": step, "time": time.time(), "tensors": tensors,
               "aggregate": {s: agg[s] for s in SIGNALS},
               "sample": {n: p.count for n, p in zip(layout.names, layout.plans, strict=True)}}
    return signals, SignalCache(_cache_key(layout), lr, [_Token.of(s) for s in states])


def _scan_pieces(flats: Sequence[tuple[int, torch.Tensor]], step: int
                 ) -> list[tuple[int, torch.Tensor]]:
    """The SCAN_STEP elements scanned at ``step``, in SCAN_PIECE pieces, each with its
    tensor's index: the tensors ``flats`` (index, flat v) are read as one run, window by
    window, round robin, so the whole run is scanned every ``ceil(total / SCAN_STEP)``
    steps whatever the number of tensors."""
    total = sum(f.numel() for _, f in flats)
    if not total:
        return []
    start = (step % -(-total // SCAN_STEP)) * SCAN_STEP
    end = min(start + SCAN_STEP, total)
    out: list[tuple[int, torch.Tensor]] = []
    base = 0
    for i, flat in flats:
        n = flat.numel()
        lo, hi = max(start, base) - base, min(end, base + n) - base
        out.extend((i, flat[a:min(a + SCAN_PIECE, hi)]) for a in range(lo, hi, SCAN_PIECE))
        base += n
        if base >= end:
            break
    return out


def _div(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 else math.inf
    return a / b


def _exact_faults(e: Entry) -> tuple[int, int]:
    """NaN and Inf counts over the whole gradient, exp_avg and exp_avg_sq."""
    nan = inf = 0
    for t in (e.grad, e.state["exp_avg"], e.state["exp_avg_sq"]):
        flat = real_flat(t)
        nan += int(torch.isnan(flat).sum())
        inf += int(torch.isinf(flat).sum())
    return nan, inf


@dataclass(frozen=True)
class _Columns:
    """Where each per-tensor sum sits in a row of :func:`finish`'s ``columns``: squares of
    g, p1, p1 - p0, p0 and m (0-4), v (5), [vmax / v], then the counted flags."""

    amsgrad: bool

    @property
    def ratio(self) -> int:
        return 6

    @property
    def grew(self) -> int:
        return 7 if self.amsgrad else 6

    @property
    def comparable(self) -> int:
        return self.grew + 1

    @property
    def eps(self) -> int:
        return self.grew + 2

    @property
    def bad(self) -> int:
        return self.grew + 3

    @property
    def has_v(self) -> int:
        return self.grew + 4


def _aggregate(layout: Layout, rows: Sequence[Sequence[float]], col: _Columns,
               tensors: Mapping[str, Mapping[str, float]], amsgrad: Sequence[bool]
               ) -> dict[str, float]:
    def total(c: int, which: Sequence[bool] | None = None) -> float:
        return sum(w * r[c] for i, (r, w) in enumerate(zip(rows, layout.weights, strict=True))
                   if which is None or which[i])

    numel = sum(layout.numels)
    clamp = 1.0
    if any(amsgrad):  # without amsgrad a tensor's ratio is exactly 1 wherever v > 0
        plain = [not a for a in amsgrad]
        defined = total(col.has_v)
        clamp = (total(col.ratio, amsgrad) + total(col.has_v, plain)) / defined if defined \
            else math.nan
    comparable = total(col.comparable)
    return {
        "grad_norm": math.sqrt(total(0)),
        "param_norm": math.sqrt(total(1)),
        "update_norm": math.sqrt(total(2)),
        "update_ratio": _div(math.sqrt(total(2)), math.sqrt(total(3))),
        "exp_avg_norm": math.sqrt(total(4)),
        "exp_avg_sq_mean": total(5) / numel if numel else math.nan,
        "gamma_frac": total(col.grew) / comparable if comparable else math.nan,
        "amsgrad_clamp": clamp,
        "eps_dominance": total(col.eps) / numel if numel else math.nan,
        "nan_count": sum(t["nan_count"] for t in tensors.values()),
        "inf_count": sum(t["inf_count"] for t in tensors.values()),
    }


# ---------------------------------------------------------------------- the observer


class SignalObserver:
    """Computes the signals of every step of the stepper it is attached to (see the
    module docstring); never raises into the step: a failure is logged and leaves
    ``stepper.signals`` with an ``"error"``."""

    def __init__(self) -> None:
        self.cache = SignalCache()
        self._layout: Layout | None = None
        self._pending: Pending | None = None
        self._params: list[torch.Tensor] = []  # the parameters self._layout was made for
        self._entries: list[Entry] = []  # the step's, from before_step to after_step
        #: Off (``ADAMSCOPE_SIGNALS=false``): steps are recorded without signals, at no cost.
        self.enabled = True

    def entries(self, stepper: Stepper, grads: Mapping[str, torch.Tensor]) -> list[Entry]:
        opt = stepper.optimizer
        out = []
        for n in stepper.names:
            g = grads.get(n)
            if g is None:
                continue
            p = stepper.params[stepper.index[n]]
            if p.numel() == 0:
                continue
            out.append(Entry(n, p, g, opt.state.get(p, {}),
                             opt.param_groups[stepper.group_of[n]]))
        return out

    def layout_for(self, entries: Sequence[Entry]) -> Layout:
        params = [e.param for e in entries]
        # The same parameter tensors (whose shape, dtype and device a stepper never
        # changes) need no key comparison.
        if (self._layout is not None and len(params) == len(self._params)
                and all(a is b for a, b in zip(params, self._params, strict=True))):
            return self._layout
        key = _layout_key(entries)
        if self._layout is None or self._layout.key != key:
            self._layout = _build_layout(entries)
        self._params = params
        return self._layout

    def before_step(self, stepper: Stepper, grads: Mapping[str, torch.Tensor]) -> None:
        self._pending = None
        if not self.enabled:
            return
        try:
            entries = self._entries = self.entries(stepper, grads)
            if entries:
                with torch.no_grad():
                    self._pending = begin(entries, self.cache, self.layout_for(entries),
                                          steps=_known_steps(stepper, entries))
        except Exception as e:  # noqa: BLE001 - signals must never break a step
            self._fail(stepper, e)

    def after_step(self, stepper: Stepper, grads: Mapping[str, torch.Tensor]) -> None:
        step = stepper.observed_step
        pending, self._pending = self._pending, None
        entries, self._entries = self._entries, []
        try:
            if pending is None:
                if "error" not in stepper.signals:
                    stepper.signals = {**empty_signals(), "step": step, "time": time.time()}
                return
            with torch.no_grad():
                if not all(e.state for e in entries):  # states the step created
                    entries = self.entries(stepper, grads)
                stepper.signals, self.cache = finish(pending, entries, step,
                                                     _known_steps(stepper, entries))
        except Exception as e:  # noqa: BLE001 - signals must never break a step
            self._fail(stepper, e, step)

    def _fail(self, stepper: Stepper, error: Exception, step: int | None = None) -> None:
        log.exception("signals of stepper %r failed", stepper.name)
        self.cache = SignalCache()
        stepper.signals = {**empty_signals(), "step": step, "time": time.time(),
                           "error": f"{type(error).__name__}: {error}"}


def _known_steps(stepper: Stepper, entries: Sequence[Entry]) -> list[float | None]:
    """The entries' state steps from the stepper's mirror (no device read per step)."""
    steps = stepper.param_steps()
    return [steps[stepper.index[e.name]] for e in entries]


def observer_of(stepper: Stepper) -> SignalObserver | None:
    for o in stepper.observers:
        if isinstance(o, SignalObserver):
            return o
    return None


def attach_signals(stepper: Stepper) -> SignalObserver:
    """Give ``stepper`` its :class:`SignalObserver` (once: calling again is a no-op)."""
    found = observer_of(stepper)
    if found is not None:
        return found
    observer = SignalObserver()
    stepper.observers.insert(0, observer)  # first: later observers read stepper.signals
    if not stepper.signals:
        stepper.signals = empty_signals()
    return observer
