"""One step's signals: :func:`begin` captures what they compare against before the step,
:func:`finish` computes them after it (one transfer to the host)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adamscope.client.numerics import Factors, adam_factors, upload, wide_dtype

from .assemble import (
    FULL,
    Columns,
    Row,
    aggregate,
    estimates,
    full_signals,
    rounding,
    tensor_signals,
)
from .cache import SignalCache, Token, cache_key
from .exact import combine_chunks, count_faults, reduce_chunks
from .histogram import histograms
from .histogram import wanted as wanted_histograms
from .local import LOCAL_BUDGET, covered, local_pass, tops
from .quantiles import quantiles
from .sampling import Entry, Layout, build_layout, gather, per_seg, round_as

__all__ = [
    "COMBINE",
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
    "lr_scale",
    "lr_fell_count",
    "lr_rose_count",
    "lr_fell_frac",
    *FULL,
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
    "first_nonfinite_step": "min",
    "lr_scale": "max",
    "lr_fell_count": "sum",
    "lr_rose_count": "sum",
    "lr_fell_frac": "mean",
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
    **{name: name.rsplit("_", 1)[1] for name in FULL},
}
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
    #: The previous v of the tensors the localized signals cover, where still valid.
    local: dict[str, tuple[torch.Tensor, Factors]] = field(default_factory=dict)
    #: The kept v of covered tensors that do not step now (kept for their next step).
    carry: SignalCache = field(default_factory=SignalCache)


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
    local: dict[str, tuple[torch.Tensor, Factors]] | None = None,
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
        [_v_source(e) if ok else e.param for e, ok in zip(entries, with_state, strict=True)],
        "v0",
    )
    # Second-moment shock: the new gradient (as v will see it) against v_hat(t-1), the
    # denominator's: max_exp_avg_sq / bc2 under amsgrad.
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
    if local is None:  # else the caller's (a dry run's copies have no tokens of their own)
        local = cache.local_for(entries) if cache is not None else {}
    carry = cache.carried({e.name for e in entries}) if cache is not None else SignalCache()
    if all(ok_cache) and cache is not None and cache.lr_eff is not None:
        return Pending(layout, g, p0, cache.lr_eff, shock, local, carry)
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
    return Pending(layout, g, p0, lr_prev, shock, local, carry)


def _columns(
    pending: Pending, entries: Sequence[Entry], steps: Sequence[float | None]
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Per pooled element, the values :func:`finish` sums per tensor over the sample (see
    :class:`~.assemble.Columns`); the effective LR after the step; each entry's amsgrad."""
    layout = pending.layout
    states = [e.state for e in entries]
    p1 = gather(layout, [e.param for e in entries], "p1")
    v = gather(layout, [s["exp_avg_sq"] for s in states], "v1")
    amsgrad = [
        bool(e.group["amsgrad"]) and "max_exp_avg_sq" in s
        for e, s in zip(entries, states, strict=True)
    ]
    lr, below_eps, vs = _lr_eff(layout, [_v_source(e) for e in entries], entries, steps, "vs1")
    p0 = pending.p0
    comparable = ~torch.isnan(lr + pending.lr_prev)
    update = p1 - p0
    squares = torch.stack([update, p0])
    flags = [(lr > pending.lr_prev) & comparable, comparable, below_eps]
    values = [squares * squares]
    if any(amsgrad):  # max_exp_avg_sq / exp_avg_sq where v > 0 (exactly 1 without amsgrad)
        has_v = v > 0
        values.append((vs / v).masked_fill_(~has_v, 0.0)[None])
        flags.append(has_v)
    return torch.cat([*values, torch.stack(flags).to(v.dtype)]).double(), lr, amsgrad


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
    steps = _steps(entries) if steps is None else steps
    columns, lr, amsgrad = _columns(pending, entries, steps)
    sums = (
        columns.sum(1, keepdim=True)
        if layout.single
        else torch.segment_reduce(
            columns, "sum", lengths=layout.lengths.expand(columns.shape[0], -1), axis=1
        )
    )
    per_q, pooled_q = quantiles(layout, torch.stack([lr, pending.shock]), _QUANTILES)
    factors = _factors(entries, steps)
    chunks, chunk_counts, update_scales = reduce_chunks(entries, factors)
    which = covered(layout.numels)
    counts, kept, rho = local_pass(entries, which, pending.local, factors)
    parts = [sums.t().reshape(-1), per_q.reshape(-1), pooled_q.reshape(-1), chunks.reshape(-1)]
    parts.append(counts.reshape(-1))
    host = torch.cat(parts).tolist()  # the one transfer
    s_n, k, nq, nr = len(entries), columns.shape[0], len(_QUANTILES), chunks.numel()
    rows = [host[i * k : (i + 1) * k] for i in range(s_n)]
    pos = s_n * k
    lr_rows = [host[pos + i * nq : pos + (i + 1) * nq] for i in range(s_n)]
    pos += s_n * nq
    shock_rows = [host[pos + i * nq + 2] for i in range(s_n)]
    pos += s_n * nq
    lr_pooled, shock_pooled = host[pos : pos + nq], host[pos + nq + 2]
    pos += 2 * nq
    reduced = combine_chunks(host[pos : pos + nr], chunk_counts, update_scales)
    pos += nr
    local = {i: (host[pos + 2 * j], host[pos + 2 * j + 1]) for j, i in enumerate(which)}
    flagged = [j for j, i in enumerate(which) if local[i][0] > 0 or local[i][1] > 0]
    # NaN/Inf propagate through the norms, the sum and the max: counted only then.
    faults = {
        e.name: found
        for e, red in zip(entries, reduced, strict=True)
        if not all(math.isfinite(x) for x in red) and (found := count_faults(e))
    }
    scales = [
        f.step_size * f.bc2_sqrt if t is not None and f.defined else math.nan
        for t, f in zip(steps, factors, strict=True)
    ]
    col = Columns(any(amsgrad))
    tensors = {
        e.name: tensor_signals(
            Row(rows[i], reduced[i], layout.numels[i], layout.weights[i], layout.plans[i].count),
            lr_rows[i],
            shock_rows[i],
            col,
            amsgrad[i],
            faults.get(e.name, {}),
            scales[i],
        )
        | _local_signals(local.get(i, (math.nan, math.nan)), layout.numels[i])
        | full_signals(reduced[i])
        for i, e in enumerate(entries)
    }
    agg = aggregate(layout, rows, reduced, col, tensors, amsgrad)
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
        "estimates": estimates(layout) | rounding(entries, tensors),
        "local": {
            "covered": [entries[i].name for i in which],
            "top": tops(entries, which, rho, kept, pending.local, flagged) if flagged else {},
        },
    }
    if wanted_histograms(step):  # every HISTOGRAM_EVERY steps: see .histogram
        signals["histograms"] = histograms(entries, factors, step)
    if faults:
        signals["faults"] = {
            name: {role: {"nan": c[0], "inf": c[1]} for role, c in found.items()}
            for name, found in faults.items()
        }
    tokens = [Token.of(s) for s in states]
    tokens_of = dict(zip(layout.names, tokens, strict=True))
    # Tensors that skipped this step keep their v while the budget allows.
    keep, keep_tokens = kept.pieces(), {n: tokens_of[n] for n in kept.names}
    room = LOCAL_BUDGET - sum(kept.lengths)
    for n, (v, f) in pending.carry.local.items():
        if v.numel() <= room:
            keep[n], keep_tokens[n] = (v, f), pending.carry.local_tokens.get(n)
            room -= v.numel()
    return signals, SignalCache(cache_key(layout), lr, tokens, keep, keep_tokens)


def _local_signals(counts: tuple[float, float], numel: int) -> dict[str, float]:
    fell, rose = counts
    return {"lr_fell_count": fell, "lr_rose_count": rose, "lr_fell_frac": fell / numel}
