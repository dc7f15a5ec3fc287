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

The views of Adam's state these describe (m_hat, lr_eff, ...) are :mod:`.views`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adamscope.client.numerics import real_flat, upload, wide_dtype

from .summary import Summary, finite_part, summarize_chunk

__all__ = [
    "CHUNK",
    "DEFAULT_QUANTILES",
    "EXACT_LIMIT",
    "MAX_BINS",
    "MAX_QUANTILES",
    "SAMPLE_SIZE",
    "Described",
    "Source",
    "StatsSpec",
    "aggregate",
    "describe",
    "quantiles_of",
    "sample_plan",
    "strided_sample",
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
#: Below this many values order statistics come from one sort; above, from kthvalue.
_SORT_LIMIT = 1 << 16


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
    return flat[plan.start :: plan.stride][: plan.count]


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
        return Source(
            flat.numel(),
            flat.dtype,
            flat.device,
            _last_dim(t.shape, t.is_complex()),
            lambda a, b: flat[a:b],
            lambda plan: strided_sample(flat, plan),
        )

    @staticmethod
    def derived(
        inputs: Sequence[torch.Tensor], fn: Callable[..., torch.Tensor], dtype: torch.dtype
    ) -> Source:
        """``fn`` applied elementwise to same-shaped ``inputs`` (flat real views)."""
        flats = [real_flat(t) for t in inputs]
        first = inputs[0]
        return Source(
            flats[0].numel(),
            dtype,
            flats[0].device,
            _last_dim(first.shape, first.is_complex()),
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
            if r is not None and not (math.isfinite(r[0]) and math.isfinite(r[1]) and r[0] < r[1]):
                raise ValueError(f"a range must be two finite numbers lo < hi, got {list(r)}")

    def key(self) -> tuple[Any, ...]:
        return (self.quantiles, self.bins, self.hist_range, self.log, self.log_range)


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
    return {
        "edges": list(edges),
        "counts": host[:bins],
        "below": host[bins],
        "above": host[bins + 1],
    }


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
        h = (
            _histogram(logs, edges)
            if edges
            else {"edges": [], "counts": [], "below": 0, "above": 0}
        )
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
        summary, finite = summarize_chunk(source.chunk(0, source.numel).to(wide))
        sample, sampled = finite, False
    else:
        summary = Summary()
        scratch = torch.empty(CHUNK, dtype=wide, device=source.device)
        for c in source.chunks():
            summary.merge(summarize_chunk(c.to(wide), scratch)[0])
        plan = sample_plan(source.numel, SAMPLE_SIZE, source.last_dim)
        sample = finite_part(source.sample(plan).to(wide))[0]
        sampled = True
    stats = _with_distribution(summary, sample, sampled, spec)
    return Described(stats, summary, source, finite if keep_values else None)


def _with_distribution(
    summary: Summary, sample: torch.Tensor, sampled: bool, spec: StatsSpec
) -> dict[str, Any]:
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
    wide = (
        torch.float64
        if any(wide_dtype(p.source.dtype) == torch.float64 for p in parts)
        else torch.float32
    )
    device = parts[0].source.device
    if all(p.values is not None for p in parts) and summary.finite <= EXACT_LIMIT:
        pooled = torch.cat(
            [
                p.values.to(device=device, dtype=wide)  # type: ignore[union-attr]
                for p in parts
            ]
        )
        return _with_distribution(summary, pooled, False, spec)
    total = max(1, summary.numel)
    pieces = [torch.empty(0, dtype=wide, device=device)]
    for p in parts:
        if p.source.numel:
            n = max(1, round(SAMPLE_SIZE * p.source.numel / total))
            plan = sample_plan(p.source.numel, n, p.source.last_dim)
            pieces.append(finite_part(p.source.sample(plan).to(wide))[0].to(device))
    return _with_distribution(summary, torch.cat(pieces), True, spec)
