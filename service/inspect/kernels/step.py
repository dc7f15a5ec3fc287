"""One step's signals: :func:`begin` captures what they compare against before the step,
:func:`finish` computes them after it (one transfer to the host)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adamscope.client.numerics import Factors, adam_factors, real_flat, upload, wide_dtype

from .cache import SignalCache, Token, cache_key
from .quantiles import quantiles
from .sampling import Entry, Layout, build_layout, gather, per_seg, round_as

__all__ = [
    "COMBINE",
    "SCAN_PIECE",
    "SCAN_STEP",
    "SIGNALS",
    "Pending",
    "begin",
    "empty_signals",
    "finish",
]

SIGNALS = (
    "grad_norm",
    "param_norm",
    "update_norm",
    "update_ratio",
    "exp_avg_norm",
    "exp_avg_sq_mean",
    "lr_eff_p1",
    "lr_eff_p50",
    "lr_eff_p99",
    "shock_p99",
    "gamma_frac",
    "amsgrad_clamp",
    "eps_dominance",
    "nan_count",
    "inf_count",
)
#: How each signal of several tensors (or several shards of a stepper) combines from each
#: part's: norms as the root of the summed squares, means and fractions weighted by each
#: part's elements, counts added; quantiles cannot be combined exactly from the parts'
#: quantiles: p50 is the element-weighted mean of the parts' medians and the tails are
#: bounds (the lowest p1, the highest p99), which is what an alert on them needs.
#: ``update_ratio`` needs each part's update norm beside it (see
#: :func:`adamscope.service.inspect.merge.combine_signals`).
COMBINE = {
    "grad_norm": "norm",
    "param_norm": "norm",
    "update_norm": "norm",
    "exp_avg_norm": "norm",
    "exp_avg_sq_mean": "mean",
    "gamma_frac": "mean",
    "amsgrad_clamp": "mean",
    "eps_dominance": "mean",
    "lr_eff_p50": "mean",
    "nan_count": "sum",
    "inf_count": "sum",
    "lr_eff_p1": "min",
    "lr_eff_p99": "max",
    "shock_p99": "max",
    "update_ratio": "ratio",
}
#: Elements of the sampled tensors' exp_avg_sq scanned for NaN/Inf per step (in all), in pieces
#: of SCAN_PIECE (small enough to run on one thread: no wait for a busy core).
SCAN_STEP = 1 << 17
SCAN_PIECE = 1 << 15
#: The quantiles computed of the effective LR and of the shock (whose p99 is reported).
_QUANTILES = (0.01, 0.5, 0.99)


def empty_signals() -> dict[str, Any]:
    """The signals before the first observed step."""
    return {"step": None, "time": None, "tensors": {}, "aggregate": {}, "sample": {}}


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
        values = torch.stack([entries[i].state["step"].reshape(()).double() for i in idx]).tolist()
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


def _lr_eff(
    layout: Layout,
    sources: Sequence[torch.Tensor],
    entries: Sequence[Entry],
    steps: Sequence[float | None],
    role: str,
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
    uniform = (
        len(set(layout.dtypes)) == 1
        and wide == layout.cdtype
        and all(len(set(map(repr, c))) == 1 for c in (bc2s, eps, ss))
    )
    if uniform:
        vs = gather(layout, sources, role, layout.dtypes[0])
        root = vs.sqrt() / bc2s[0]
        # A 0-dim CPU tensor: a true division (not reciprocal * scalar, as a Python float
        # would give), its value passed to the kernel as an argument (no upload, no sync).
        lr = torch.tensor(ss[0], dtype=wide) / root.add(eps[0]).to(wide)
        return lr, root < eps[0], vs.to(layout.cdtype)
    vs = gather(layout, sources, role)
    c_eps = per_seg(layout, eps, "storage")
    root = round_as(
        round_as(vs.sqrt(), layout.narrow) / per_seg(layout, bc2s, "opmath"), layout.narrow
    )
    denom = round_as(root + c_eps, layout.narrow)
    step_size = per_seg(layout, ss, "opmath")
    if not isinstance(step_size, torch.Tensor):  # a true division, not reciprocal * scalar
        step_size = torch.tensor(step_size, dtype=denom.dtype)  # 0-dim on the CPU: no sync
    return round_as(step_size / denom, layout.narrow_wide), root < c_eps, vs


def _v_source(e: Entry) -> torch.Tensor:
    s = e.state
    v: torch.Tensor = (
        s["max_exp_avg_sq"] if e.group["amsgrad"] and "max_exp_avg_sq" in s else s["exp_avg_sq"]
    )
    return v


def begin(
    entries: Sequence[Entry],
    cache: SignalCache | None,
    layout: Layout | None = None,
    valid: Sequence[bool] | None = None,
    steps: Sequence[float | None] | None = None,
) -> Pending:
    """Capture, before the step, what the signals compare against: the gradient and
    parameter samples, the previous effective LR and the second-moment shock. ``steps``:
    each entry's state step if the caller knows them (else read from the states)."""
    layout = layout or build_layout(entries)
    g = gather(layout, [e.grad for e in entries], "g")
    p0 = gather(layout, [e.param for e in entries], "p0")
    nan = torch.full((layout.total,), math.nan, dtype=layout.cdtype, device=layout.device)
    with_state = [bool(e.state) and "exp_avg_sq" in e.state for e in entries]
    if not any(with_state):
        return Pending(layout, g, p0, nan, nan)
    known = _steps(entries) if steps is None else steps
    steps = [t if ok else None for t, ok in zip(known, with_state, strict=True)]
    v_prev = gather(
        layout,
        [
            e.state["exp_avg_sq"] if ok else e.param
            for e, ok in zip(entries, with_state, strict=True)
        ],
        "v0",
    )
    # Second-moment shock: the new gradient (as v will see it) against v_hat(t-1).
    bc2, wd = [], []
    for (e, t), f in zip(zip(entries, steps, strict=True), _factors(entries, steps), strict=True):
        bc2.append(f.bc2 if t is not None and f.bc2 != 0 else math.nan)
        decay = float(e.group.get("weight_decay", 0.0))
        wd.append(decay if decay and not e.group.get("decoupled_weight_decay") else 0.0)
    g_eff = g if not any(wd) else g + per_seg(layout, wd) * p0
    v_hat = v_prev / per_seg(layout, bc2)
    shock = (g_eff * g_eff / v_hat).masked_fill_(~(v_hat > 0), math.nan)
    # The previous effective LR: the one computed at the last step, else from the state.
    ok_cache = (
        list(valid)
        if valid is not None
        else (
            cache.valid(layout, [e.state for e in entries])
            if cache is not None
            else [False] * len(entries)
        )
    )
    if all(ok_cache) and cache is not None and cache.lr_eff is not None:
        return Pending(layout, g, p0, cache.lr_eff, shock)
    lr_prev = _lr_eff(
        layout,
        [_v_source(e) if ok else e.param for e, ok in zip(entries, with_state, strict=True)],
        entries,
        steps,
        "vs0",
    )[0]
    if any(ok_cache) and cache is not None and cache.lr_eff is not None:
        use = upload(ok_cache, torch.bool, layout.device)[layout.seg]
        lr_prev = torch.where(use, cache.lr_eff, lr_prev)
    return Pending(layout, g, p0, lr_prev, shock)


def _columns(
    pending: Pending, entries: Sequence[Entry], steps: Sequence[float | None] | None
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Per pooled element, the values :func:`finish` sums per tensor (see
    :class:`_Columns`); the effective LR after the step; each entry's amsgrad."""
    layout = pending.layout
    states = [e.state for e in entries]
    p1 = gather(layout, [e.param for e in entries], "p1")
    m = gather(layout, [s["exp_avg"] for s in states], "m1")
    v = gather(layout, [s["exp_avg_sq"] for s in states], "v1")
    amsgrad = [
        bool(e.group["amsgrad"]) and "max_exp_avg_sq" in s
        for e, s in zip(entries, states, strict=True)
    ]
    lr, below_eps, vs = _lr_eff(
        layout,
        [_v_source(e) for e in entries],
        entries,
        _steps(entries) if steps is None else steps,
        "vs1",
    )
    g, p0 = pending.g, pending.p0
    comparable = ~torch.isnan(lr + pending.lr_prev)
    squares = torch.stack([g, p1, p1 - p0, p0, m])
    flags = [(lr > pending.lr_prev) & comparable, comparable, below_eps, ~torch.isfinite(g + m + v)]
    values = [squares * squares, v[None]]
    if any(amsgrad):  # max_exp_avg_sq / exp_avg_sq where v > 0 (exactly 1 without amsgrad)
        has_v = v > 0
        values.append((vs / v).masked_fill_(~has_v, 0.0)[None])
        flags.append(has_v)
    return torch.cat([*values, torch.stack(flags).to(v.dtype)]).double(), lr, amsgrad


def _tensor_signals(
    e: Entry,
    r: Sequence[float],
    weight: float,
    n: int,
    lr_eff: Sequence[float],
    shock: float,
    col: _Columns,
    amsgrad: bool,
    faulty: bool,
) -> dict[str, float]:
    """One tensor's signals from its row of sums (``r``), its sample's size ``n`` and
    weight, its quantiles; NaN/Inf counted over the whole tensors when ``faulty``."""
    nan_count, inf_count = _exact_faults(e) if faulty else (0, 0)
    clamp = 1.0
    if amsgrad:
        clamp = r[col.ratio] / r[col.has_v] if r[col.has_v] else math.nan
    return {
        "grad_norm": math.sqrt(weight * r[0]),
        "param_norm": math.sqrt(weight * r[1]),
        "update_norm": math.sqrt(weight * r[2]),
        "update_ratio": _div(math.sqrt(r[2]), math.sqrt(r[3])),
        "exp_avg_norm": math.sqrt(weight * r[4]),
        "exp_avg_sq_mean": r[5] / n,
        "lr_eff_p1": lr_eff[0],
        "lr_eff_p50": lr_eff[1],
        "lr_eff_p99": lr_eff[2],
        "shock_p99": shock,
        "gamma_frac": r[col.grew] / r[col.comparable] if r[col.comparable] else math.nan,
        "amsgrad_clamp": clamp,
        "eps_dominance": r[col.eps] / n,
        "nan_count": float(nan_count),
        "inf_count": float(inf_count),
    }


def finish(
    pending: Pending,
    entries: Sequence[Entry],
    step: int,
    steps: Sequence[float | None] | None = None,
) -> tuple[dict[str, Any], SignalCache]:
    """The signals of the step just taken, and the cache for the next one (``steps``:
    each entry's state step now, if the caller knows them)."""
    layout = pending.layout
    states = [e.state for e in entries]
    columns, lr, amsgrad = _columns(pending, entries, steps)
    sums = (
        columns.sum(1, keepdim=True)
        if layout.single
        else torch.segment_reduce(
            columns, "sum", lengths=layout.lengths.expand(columns.shape[0], -1), axis=1
        )
    )
    per_q, pooled_q = quantiles(layout, torch.stack([lr, pending.shock]), _QUANTILES)
    # Hard faults: the next SCAN_STEP elements of the sampled tensors' v, every step.
    pieces = _scan_pieces(
        [(i, real_flat(states[i]["exp_avg_sq"])) for i, ex in enumerate(layout.exact) if not ex],
        step,
    )
    parts = [sums.t().reshape(-1), per_q.reshape(-1), pooled_q.reshape(-1)]
    if pieces:
        parts.append(torch.stack(torch._foreach_max([p for _, p in pieces])).to(torch.float64))
    host = torch.cat(parts).tolist()  # the one transfer
    s_n, k, nq = len(entries), columns.shape[0], len(_QUANTILES)
    rows = [host[i * k : (i + 1) * k] for i in range(s_n)]
    pos = s_n * k
    lr_rows = [host[pos + i * nq : pos + (i + 1) * nq] for i in range(s_n)]
    pos += s_n * nq
    shock_rows = [host[pos + i * nq + 2] for i in range(s_n)]
    pos += s_n * nq
    lr_pooled, shock_pooled = host[pos : pos + nq], host[pos + nq + 2]
    pos += 2 * nq
    scan_found = {
        i for (i, _), top in zip(pieces, host[pos:], strict=True) if not math.isfinite(top)
    }
    col = _Columns(any(amsgrad))
    tensors = {
        e.name: _tensor_signals(
            e,
            rows[i],
            layout.weights[i],
            layout.plans[i].count,
            lr_rows[i],
            shock_rows[i],
            col,
            amsgrad[i],
            rows[i][col.bad] > 0 or i in scan_found,
        )
        for i, e in enumerate(entries)
    }
    agg = _aggregate(layout, rows, col, tensors, amsgrad)
    agg.update(
        {
            "lr_eff_p1": lr_pooled[0],
            "lr_eff_p50": lr_pooled[1],
            "lr_eff_p99": lr_pooled[2],
            "shock_p99": shock_pooled,
        }
    )
    signals = {
        "step": step,
        "time": time.time(),
        "tensors": tensors,
        "aggregate": {s: agg[s] for s in SIGNALS},
        "sample": {n: p.count for n, p in zip(layout.names, layout.plans, strict=True)},
    }
    return signals, SignalCache(cache_key(layout), lr, [Token.of(s) for s in states])


def _scan_pieces(
    flats: Sequence[tuple[int, torch.Tensor]], step: int
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
        out.extend((i, flat[a : min(a + SCAN_PIECE, hi)]) for a in range(lo, hi, SCAN_PIECE))
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


def _aggregate(
    layout: Layout,
    rows: Sequence[Sequence[float]],
    col: _Columns,
    tensors: Mapping[str, Mapping[str, float]],
    amsgrad: Sequence[bool],
) -> dict[str, float]:
    def total(c: int, which: Sequence[bool] | None = None) -> float:
        return sum(
            w * r[c]
            for i, (r, w) in enumerate(zip(rows, layout.weights, strict=True))
            if which is None or which[i]
        )

    numel = sum(layout.numels)
    clamp = 1.0
    if any(amsgrad):  # without amsgrad a tensor's ratio is exactly 1 wherever v > 0
        plain = [not a for a in amsgrad]
        defined = total(col.has_v)
        clamp = (
            (total(col.ratio, amsgrad) + total(col.has_v, plain)) / defined if defined else math.nan
        )
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
