"""Summary statistics of tensors, computed where they live, and Adam's derived views.

A person debugging training wants to see a 1B-element ``exp_avg_sq`` as a few hundred
numbers: its norm, moments, extremes, quantiles, NaN/Inf/zero counts and histograms. This
module computes them with torch on the tensor's own device and returns plain Python
numbers. What is exact and what is sampled:

* ``numel``, ``norm`` (L2), ``mean``, ``std`` (population, ``correction=0``), ``min``,
  ``max`` and the ``nan``/``inf``/``zeros``/``negative`` counts are exact for every size.
  Moments, norm and extremes are over the finite elements (a NaN does not hide the rest;
  the counts say how many were left out). Tensors above :data:`EXACT_LIMIT` elements are
  reduced in chunks of :data:`CHUNK` elements, so a derived view never materializes whole.
* Quantiles and histograms are exact up to :data:`EXACT_LIMIT` elements (2**24, the size
  ``torch.quantile`` itself accepts). Above it they come from a deterministic strided
  sample of at most :data:`SAMPLE_SIZE` elements (:func:`sample_plan`: every ``stride``-th
  element, the stride made coprime with the last dimension so rows and columns are all
  visited), reported as ``"sampled": true`` with ``"sample_size"``.
* Quantiles interpolate linearly between order statistics (numpy's and torch's default):
  at ``q``, position ``q * (n - 1)`` of the sorted finite values.
* Histograms: ``bins`` equal bins over ``[min, max]`` of the finite values or a given range
  (edges ``lo + i * (hi - lo) / bins``, as ``numpy.linspace``), each bin ``[e_i, e_i+1)``
  and the last one closed, binned in float64; values outside a given range are counted as
  ``below``/``above``. The log histogram bins ``log10 |x|`` of the finite non-zero values
  the same way and reports ``zeros`` and ``negative`` beside it.

Derived views of the Adam state (:data:`VIEW_KEYS`), per parameter at its own state step
``t`` with its group's current options, computed as ``_single_tensor_adam`` (PyTorch's
for-loop implementation, the reference) does::

    bc1 = 1 - beta1 ** t;  bc2 = 1 - beta2 ** t;  step_size = lr / bc1
    denom  = (v.sqrt() / bc2 ** 0.5).add_(eps)     # v: max_exp_avg_sq under amsgrad
    m_hat  = m / bc1;  v_hat = v / bc2;  lr_eff = step_size / denom
    update = -step_size * (m / denom)               # the last step's Adam update

``denom`` is computed in the state's own dtype with PyTorch's operations (so it is bit for
bit the denominator the for-loop used); the views are then widened to float32 (float64
for float64 state) before dividing. ``update`` leaves out AdamW's decoupled decay term
``lr * weight_decay * p``. A parameter at step 0 has no defined views.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..engine.stepper import Stepper

__all__ = [
    "CHUNK",
    "DEFAULT_QUANTILES",
    "EXACT_LIMIT",
    "MAX_BINS",
    "MAX_QUANTILES",
    "SAMPLE_SIZE",
    "STATE_VIEWS",
    "VIEW_KEYS",
    "Source",
    "StatsSpec",
    "View",
    "Summary",
    "adam_factors",
    "aggregate",
    "describe",
    "describe_stepper",
    "quantiles_of",
    "real_flat",
    "sample_plan",
    "strided_sample",
    "upload",
    "view_of",
    "wide_dtype",
]

#: Quantiles and histograms are exact up to this many elements (torch.quantile's limit).
EXACT_LIMIT = 1 << 24
#: Above EXACT_LIMIT, quantiles and histograms use a strided sample of at most this size.
SAMPLE_SIZE = 1 << 18
#: Exact reductions of large tensors (and derived views) run over chunks of this size.
CHUNK = 1 << 24
DEFAULT_QUANTILES = (0.01, 0.5, 0.99)
MAX_QUANTILES = 32
MAX_BINS = 512
#: The variance comes from the sums when mean**2 <= this * variance (else two passes).
_SHORTCUT = 16.0
#: Below this many values order statistics come from one sort; above, from kthvalue.
_SORT_LIMIT = 1 << 16

#: Tensors the stats of a parameter can describe: the parameter, its state, derived views.
VIEW_KEYS = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "m_hat", "v_hat", "lr_eff",
             "update")
#: The raw state tensors among VIEW_KEYS.
STATE_VIEWS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 (and complex128) data, else float32: the dtype stats use."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def real_flat(t: torch.Tensor) -> torch.Tensor:
    """A flat real view: complex tensors as their (real, imag) pairs, as Adam steps them."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1)


# ---------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Plan:
    """Elements ``start, start + stride, ...`` (``count`` of them) of a flat tensor."""

    start: int
    stride: int
    count: int

    @property
    def exact(self) -> bool:
        return self.stride == 1


def sample_plan(numel: int, size: int, last_dim: int = 0) -> Plan:
    """The deterministic strided sample of at most ``size`` of ``numel`` elements.

    The stride is the smallest at least ``ceil(numel / size)`` that is coprime with
    ``last_dim`` (a tensor's last dimension), so the sample walks through every column
    rather than one column of a matrix whose row length the stride divides.
    """
    if numel <= size:
        return Plan(0, 1, numel)
    stride = -(-numel // size)
    if last_dim > 1:
        while math.gcd(stride, last_dim) != 1:
            stride += 1
    start = (stride - 1) // 2
    count = min(size, len(range(start, numel, stride)))
    return Plan(start, stride, count)


def strided_sample(flat: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The planned elements of a flat tensor, as a view."""
    if plan.exact:
        return flat
    return flat[plan.start::plan.stride][: plan.count]


def _last_dim(shape: Sequence[int], is_complex: bool) -> int:
    if is_complex:
        return 2
    return int(shape[-1]) if len(shape) >= 2 else 0


# ---------------------------------------------------------------------- sources


@dataclass
class Source:
    """A tensor to describe, possibly computed (a derived view): its size, its elements in
    chunks, and the elements of a strided sample (computed on the sample alone)."""

    numel: int
    dtype: torch.dtype  # the dtype its values are computed in
    device: torch.device
    last_dim: int
    chunk: Callable[[int, int], torch.Tensor]  # [start, end) of the flat values
    sample: Callable[[Plan], torch.Tensor]

    @staticmethod
    def of(t: torch.Tensor) -> Source:
        flat = real_flat(t)
        return Source(flat.numel(), flat.dtype, flat.device, _last_dim(t.shape, t.is_complex()),
                      lambda a, b: flat[a:b], lambda plan: strided_sample(flat, plan))

    @staticmethod
    def derived(inputs: Sequence[torch.Tensor], fn: Callable[..., torch.Tensor],
                dtype: torch.dtype) -> Source:
        """``fn`` applied elementwise to same-shaped ``inputs`` (flat real views)."""
        flats = [real_flat(t) for t in inputs]
        first = inputs[0]
        return Source(
            flats[0].numel(), dtype, flats[0].device, _last_dim(first.shape, first.is_complex()),
            lambda a, b: fn(*(f[a:b] for f in flats)),
            lambda plan: fn(*(strided_sample(f, plan) for f in flats)),
        )

    def chunks(self) -> Iterator[torch.Tensor]:
        for a in range(0, self.numel, CHUNK):
            yield self.chunk(a, min(a + CHUNK, self.numel))


# ---------------------------------------------------------------------- the request


@dataclass(frozen=True)
class StatsSpec:
    """What to compute besides the moments: quantiles and histograms."""

    quantiles: tuple[float, ...] = DEFAULT_QUANTILES
    bins: int = 32  # 0: no histogram
    hist_range: tuple[float, float] | None = None
    log: bool = False  # also a histogram of log10 |x| (same number of bins)
    log_range: tuple[float, float] | None = None  # in log10 units

    def __post_init__(self) -> None:
        if len(self.quantiles) > MAX_QUANTILES:
            raise ValueError(f"at most {MAX_QUANTILES} quantiles")
        for q in self.quantiles:
            if not (math.isfinite(q) and 0.0 <= q <= 1.0):
                raise ValueError(f"a quantile must be in [0, 1], got {q}")
        if not 0 <= self.bins <= MAX_BINS:
            raise ValueError(f"bins must be in 0..{MAX_BINS}, got {self.bins}")
        if self.log and self.bins == 0:
            raise ValueError("a log histogram needs bins >= 1")
        for r in (self.hist_range, self.log_range):
            if r is not None and not (math.isfinite(r[0]) and math.isfinite(r[1])
                                      and r[0] < r[1]):
                raise ValueError(f"a range must be two finite numbers lo < hi, got {list(r)}")

    def key(self) -> tuple[Any, ...]:
        return (self.quantiles, self.bins, self.hist_range, self.log, self.log_range)


# ---------------------------------------------------------------------- moments


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


def _finite_part(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``x`` without NaN/Inf (the same tensor when all are finite), and the counts."""
    fin = torch.isfinite(x)
    n_fin = int(fin.sum())
    if n_fin == x.numel():
        return x, 0, 0
    nan = int(torch.isnan(x).sum())
    return x[fin], nan, x.numel() - n_fin - nan


def upload(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values as a tensor on ``device`` without waiting for the device: a tensor
    made with ``torch.tensor(..., device="cuda")`` is copied from pageable memory and
    synchronizes with every kernel queued before it; this copies from page-locked memory,
    queued behind them."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _reductions(x: torch.Tensor) -> list[float]:
    """min, max, sum, L2 norm and non-zero count of a non-empty ``x``, in one transfer."""
    lo, hi = torch.aminmax(x)
    parts = [lo, hi, x.sum(), torch.linalg.vector_norm(x), torch.count_nonzero(x).to(x.dtype)]
    return [float(v) for v in torch.stack(parts).tolist()]


def _summarize_chunk(x: torch.Tensor, scratch: torch.Tensor | None = None
                     ) -> tuple[Summary, torch.Tensor]:
    """Exact reductions of one chunk (wide dtype), and its finite values. ``scratch``: a
    reusable buffer of at least ``x``'s size and dtype for the deviations."""
    s = Summary(numel=x.numel())
    if x.numel() == 0:
        return s, x
    values = _reductions(x)  # one device sync
    if not (math.isfinite(values[0]) and math.isfinite(values[1])):
        # A NaN propagates through aminmax, an Inf is an extreme: the sums are of no use.
        x, s.nan, s.inf = _finite_part(x)
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


# ---------------------------------------------------------------------- order statistics


def _order_statistics(x: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """The values at 0-based sorted positions ``ks`` of ``x`` (finite, non-empty)."""
    n = x.numel()
    wanted = sorted(set(ks))
    if n <= _SORT_LIMIT or x.device.type != "cpu":
        ordered = torch.sort(x).values
        picked = ordered[upload(wanted, torch.int64, x.device)].tolist()
        return dict(zip(wanted, picked, strict=True))
    out: dict[int, float] = {}
    for k in wanted:
        if k in out:
            continue
        value = torch.kthvalue(x, k + 1).values
        out[k] = float(value)
        if k + 1 in wanted:  # the next order statistic in two passes, not another select
            if int((x <= value).sum()) >= k + 2:
                out[k + 1] = out[k]
            else:
                out[k + 1] = float(torch.where(x > value, x, math.inf).min())
    return out


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's linear interpolation (exact at both ends)."""
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def quantiles_of(x: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """Linear-interpolation quantiles of the finite tensor ``x`` (NaN when empty)."""
    n = x.numel()
    if n == 0 or not qs:
        return [math.nan] * len(qs)
    positions = [q * (n - 1) for q in qs]
    ks = []
    for pos in positions:
        lo = math.floor(pos)
        ks += [lo, min(lo + 1, n - 1)]
    stats = _order_statistics(x, ks)
    out = []
    for pos in positions:
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        out.append(_lerp(stats[lo], stats[hi], pos - lo))
    return out


# ---------------------------------------------------------------------- histograms


def _edges(lo: float, hi: float, bins: int) -> list[float]:
    if lo == hi:  # numpy's convention for a constant tensor
        lo, hi = lo - 0.5, hi + 0.5
    step = (hi - lo) / bins
    return [i * step + lo for i in range(bins)] + [hi]


def _histogram(x: torch.Tensor, edges: Sequence[float]) -> dict[str, Any]:
    """Counts of the finite values ``x`` in ``[e_i, e_i+1)`` (last bin closed), in float64."""
    bins = len(edges) - 1
    xd = x.to(torch.float64)
    below, above = xd < edges[0], xd > edges[-1]
    inner = upload(edges[1:-1], torch.float64, x.device)
    # Values outside the range go to an extra bin that is dropped: the counts, ``below``
    # and ``above`` come back in one transfer.
    idx = torch.bucketize(xd, inner, right=True).masked_fill_(below | above, bins)
    counts = torch.bincount(idx, minlength=bins + 1)
    host = torch.cat([counts[:bins], below.sum().view(1), above.sum().view(1)]).tolist()
    return {"edges": list(edges), "counts": host[:bins], "below": host[bins],
            "above": host[bins + 1]}


def _histograms(x: torch.Tensor, summary: Summary, spec: StatsSpec) -> dict[str, Any]:
    """The fixed-bin (``hist``) and log (``log_hist``) histograms of finite values ``x``.

    ``summary`` gives the default range (exact min and max, even when ``x`` is a sample).
    """
    out: dict[str, Any] = {}
    if spec.bins == 0:
        return out
    if spec.hist_range is not None:
        out["hist"] = _histogram(x, _edges(*spec.hist_range, spec.bins))
    elif summary.finite:
        out["hist"] = _histogram(x, _edges(summary.min, summary.max, spec.bins))
    else:
        out["hist"] = {"edges": [], "counts": [], "below": 0, "above": 0}
    if spec.log:
        xd = x.to(torch.float64)
        logs = torch.log10(xd[xd != 0].abs())
        negative = (x < 0).sum().to(torch.float64)
        if spec.log_range is not None:
            edges = _edges(*spec.log_range, spec.bins)
            n_neg = int(negative)
        elif logs.numel():
            lo, hi, n = torch.stack([*torch.aminmax(logs), negative]).tolist()
            edges, n_neg = _edges(lo, hi, spec.bins), int(n)
        else:
            edges, n_neg = [], int(negative)
        h = _histogram(logs, edges) if edges else {"edges": [], "counts": [], "below": 0,
                                                   "above": 0}
        # x holds finite values: the zeros are what the log left out.
        out["log_hist"] = {**h, "zeros": x.numel() - logs.numel(), "negative": n_neg}
    return out


# ---------------------------------------------------------------------- describing


@dataclass
class Described:
    """The JSON-ready statistics of one source, plus what aggregation needs."""

    stats: dict[str, Any]
    summary: Summary
    source: Source
    values: torch.Tensor | None = None  # all finite values (kept for an exact aggregate)


def describe(source: Source, spec: StatsSpec, keep_values: bool = False) -> Described:
    """Statistics of ``source`` (see the module docstring for what is exact)."""
    wide = wide_dtype(source.dtype)
    finite: torch.Tensor | None = None
    if source.numel <= EXACT_LIMIT:
        summary, finite = _summarize_chunk(source.chunk(0, source.numel).to(wide))
        sample, sampled = finite, False
    else:
        summary = Summary()
        scratch = torch.empty(CHUNK, dtype=wide, device=source.device)
        for c in source.chunks():
            summary.merge(_summarize_chunk(c.to(wide), scratch)[0])
        plan = sample_plan(source.numel, SAMPLE_SIZE, source.last_dim)
        sample = _finite_part(source.sample(plan).to(wide))[0]
        sampled = True
    stats = _with_distribution(summary, sample, sampled, spec)
    return Described(stats, summary, source, finite if keep_values else None)


def _with_distribution(summary: Summary, sample: torch.Tensor, sampled: bool,
                       spec: StatsSpec) -> dict[str, Any]:
    stats = summary.fields()
    stats["sampled"] = sampled
    stats["sample_size"] = sample.numel()
    qs = quantiles_of(sample, spec.quantiles)
    stats["quantiles"] = {repr(float(q)): v for q, v in zip(spec.quantiles, qs, strict=True)}
    stats.update(_histograms(sample, summary, spec))
    return stats


def aggregate(parts: Sequence[Described], spec: StatsSpec) -> dict[str, Any]:
    """Statistics of the concatenation of several described sources.

    Moments, extremes and counts merge exactly. Quantiles and histograms are exact when
    every part kept its finite values and they total at most EXACT_LIMIT elements;
    otherwise they come from a pooled sample drawing from each part in proportion to its
    size (about SAMPLE_SIZE in all), which is reported as ``"sampled": true``.
    """
    summary = Summary()
    for p in parts:
        summary.merge(p.summary)
    if not parts:
        return _with_distribution(summary, torch.empty(0), False, spec)
    wide = torch.float64 if any(wide_dtype(p.source.dtype) == torch.float64 for p in parts) \
        else torch.float32
    device = parts[0].source.device
    if all(p.values is not None for p in parts) and summary.finite <= EXACT_LIMIT:
        pooled = torch.cat([p.values.to(device=device, dtype=wide)  # type: ignore[union-attr]
                            for p in parts])
        return _with_distribution(summary, pooled, False, spec)
    total = max(1, summary.numel)
    pieces = [torch.empty(0, dtype=wide, device=device)]
    for p in parts:
        if p.source.numel:
            n = max(1, round(SAMPLE_SIZE * p.source.numel / total))
            plan = sample_plan(p.source.numel, n, p.source.last_dim)
            pieces.append(_finite_part(p.source.sample(plan).to(wide))[0].to(device))
    return _with_distribution(summary, torch.cat(pieces), True, spec)


# ---------------------------------------------------------------------- Adam views


@dataclass(frozen=True)
class Factors:
    """One parameter's Adam scalars at its state step, as the for-loop computes them."""

    step: float
    lr: float
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool
    bc1: float = field(init=False)
    bc2: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bc1", 1 - self.beta1**self.step)
        object.__setattr__(self, "bc2", 1 - self.beta2**self.step)

    @property
    def defined(self) -> bool:
        return self.bc1 != 0 and self.bc2 != 0

    @property
    def step_size(self) -> float:
        return self.lr / self.bc1

    @property
    def bc2_sqrt(self) -> float:
        return float(self.bc2**0.5)


def adam_factors(group: Mapping[str, Any], step: float) -> Factors:
    beta1, beta2 = (float(b) for b in group["betas"])
    return Factors(float(step), float(group["lr"]), beta1, beta2, float(group["eps"]),
                   bool(group["amsgrad"]))


def _denominator(v: torch.Tensor, f: Factors, wide: torch.dtype) -> torch.Tensor:
    """PyTorch's for-loop denominator ``(v.sqrt() / bc2_sqrt).add_(eps)``, computed in the
    state's dtype (bit for bit), then widened; one fresh tensor, the rest in place."""
    return v.sqrt().div_(f.bc2_sqrt).add_(f.eps).to(wide)


@dataclass(frozen=True)
class View:
    """An elementwise view of one parameter's tensors: ``fn`` of the real views of
    ``inputs`` (identity for a stored tensor), computed in ``dtype``."""

    inputs: tuple[torch.Tensor, ...]
    fn: Callable[..., torch.Tensor] | None
    dtype: torch.dtype

    def source(self) -> Source:
        if self.fn is None:
            return Source.of(self.inputs[0])
        return Source.derived(self.inputs, self.fn, self.dtype)

    def select(self, index: tuple[Any, ...]) -> torch.Tensor:
        """The view at ``index`` (ints and slices over the parameter's shape), computed on
        the selected elements only; complex parameters gain a trailing (real, imag) axis
        in derived views."""
        picked = [t.detach()[index] for t in self.inputs]
        if self.fn is None:
            return picked[0]
        reals = [torch.view_as_real(t) if t.is_complex() else t for t in picked]
        return self.fn(*reals)


def view_of(param: torch.Tensor, state: Mapping[str, Any], group: Mapping[str, Any],
            key: str) -> View | str:
    """View ``key`` (one of :data:`VIEW_KEYS`) of one parameter, or why it has none."""
    if key == "param":
        return View((param,), None, param.dtype)
    if key not in VIEW_KEYS:
        raise ValueError(f"unknown view {key!r}; expected one of {', '.join(VIEW_KEYS)}")
    if not state:
        return "no Adam state yet (the parameter has not stepped)"
    if key in STATE_VIEWS:
        if key not in state:
            return "amsgrad is off" if key == "max_exp_avg_sq" else f"no {key} in the state"
        return View((state[key],), None, state[key].dtype)
    f = adam_factors(group, float(state["step"]))
    if not f.defined:
        return f"state step is {f.step:g}: bias correction is 0 there, the view is undefined"
    v_src = state["max_exp_avg_sq"] if f.amsgrad and "max_exp_avg_sq" in state \
        else state["exp_avg_sq"]
    wide = wide_dtype(param.dtype)
    step_size = f.step_size
    if key == "m_hat":
        return View((state["exp_avg"],), lambda m: m.to(wide) / f.bc1, wide)
    if key == "v_hat":
        return View((v_src,), lambda v: v.to(wide) / f.bc2, wide)
    if key == "lr_eff":
        def lr_eff(v: torch.Tensor) -> torch.Tensor:
            denom = _denominator(v, f, wide)
            numerator = torch.tensor(step_size, dtype=wide)  # 0-dim CPU: an argument, no sync
            return torch.div(numerator, denom, out=denom)
        return View((v_src,), lr_eff, wide)

    def update(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        denom = _denominator(v, f, wide)
        return torch.div(m.to(wide), denom, out=denom).mul_(-step_size)
    return View((state["exp_avg"], v_src), update, wide)


# ---------------------------------------------------------------------- a stepper


def describe_stepper(stepper: Stepper, names: Sequence[str] | None, keys: Sequence[str],
                     spec: StatsSpec, with_aggregate: bool = True) -> dict[str, Any]:
    """Statistics of views ``keys`` of the named parameters (all if None), per tensor and
    aggregated per key over those tensors, read under the stepper's lock (one step)."""
    unknown = [k for k in keys if k not in VIEW_KEYS]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; expected some of {', '.join(VIEW_KEYS)}")
    with stepper.lock:
        selected = stepper._select(names)
        tensors: dict[str, dict[str, Any]] = {n: {} for n in selected}
        missing: list[dict[str, str]] = []
        aggregated: dict[str, Any] = {}
        for key in keys:  # one key at a time: the values kept for its aggregate are freed
            parts: list[Described] = []
            kept = 0
            for n in selected:
                p = stepper.params[stepper.index[n]]
                view = view_of(p, stepper.optimizer.state.get(p, {}),
                               stepper.optimizer.param_groups[stepper.group_of[n]], key)
                if isinstance(view, str):
                    missing.append({"name": n, "key": key, "reason": view})
                    continue
                source = view.source()
                keep = with_aggregate and kept + source.numel <= EXACT_LIMIT
                kept += source.numel if keep else 0
                d = describe(source, spec, keep_values=keep)
                tensors[n][key] = d.stats
                parts.append(d)
            if with_aggregate and parts:
                aggregated[key] = aggregate(parts, spec)
        out: dict[str, Any] = {"step": stepper.step_count, "version": stepper.version,
                               "tensors": {n: t for n, t in tensors.items() if t},
                               "missing": missing}
        if with_aggregate:
            out["aggregate"] = aggregated
        return out
