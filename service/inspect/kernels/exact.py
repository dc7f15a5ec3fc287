"""Exact per-tensor reductions of a step's full tensors, and exact NaN/Inf counts.

Every step, for every stepped tensor, over all of its elements (no sample): the L2 norm,
the sum, the minimum and the maximum of the gradient, the parameter after the step, the
update, exp_avg and exp_avg_sq (:data:`ROLES` x :data:`STATS`), and the norm of the
parameter before the step (for ``update_ratio``).

The update is Adam's step recomputed from the state it leaves:
``-step_size * m / (sqrt(v_denom) / sqrt(bc2) + eps)`` (``v_denom`` is ``max_exp_avg_sq``
under amsgrad), plus the decoupled weight decay's ``-lr * wd * p_before``, where
``p_before = (p - u_adam) / (1 - lr * wd)``. No copy of the parameter is kept across the
step. It differs from the stored change ``p_after - p_before`` only by roundings: the
parameter's (its last addition, and the decay's product) and the few of the denominator,
so ``norm(update - (p_after - p_before)) <= eps * (param_norm + 5 * update_norm)`` with
``eps = torch.finfo(param dtype).eps`` (:func:`update_rounding`; tested against float64):
the update's norm, minimum and maximum are within that of the stored change's, its sum
within ``sqrt(numel)`` times it.

Each tensor is read once, in chunks of :data:`CHUNK` elements on the CPU (all reductions of
a chunk while it is in cache; the update never exists as a full tensor) and whole on an
accelerator. Small CPU tensors (at most :data:`SMALL` elements: biases, norms) of one length,
dtype and param group are stacked and reduced together, in float64, one operation per
statistic for all of them: alone, each would cost some thirty operations' overhead for a
few hundred elements (bench_step's 10M model: 80 biases and norms, 6.6 ms alone, about 1.5
ms together, of about 35 ms in all). The results stay on the device until the caller's one
transfer to the host.

NaN and Inf propagate through a norm, a sum, a minimum and a maximum, so these reductions
say for free whether a tensor holds any: only then (a rare step) are its NaN and Inf
elements counted, exactly and per role (:func:`count_faults`). A norm that overflows (every
element finite, the sum of squares beyond the accumulator's range) only costs that count,
which then finds nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from adamscope.client.numerics import Factors, real_flat, wide_dtype

from .sampling import Entry

__all__ = [
    "CHUNK",
    "FAULT_ROLES",
    "REDUCED",
    "ROLES",
    "SMALL",
    "STATS",
    "combine_chunks",
    "count_faults",
    "reduce_chunks",
    "update_rounding",
]

#: The tensors reduced exactly, by the prefix of their signals.
ROLES = ("grad", "param", "update", "exp_avg", "exp_avg_sq")
#: What each role is reduced to.
STATS = ("norm", "sum", "min", "max")
#: The columns :func:`reduce_exact` gives per tensor, in order: ``<role>_<stat>``, then the
#: parameter's norm before the step.
REDUCED = (*(f"{r}_{s}" for r in ROLES for s in STATS), "param_before_norm")
#: The tensors a NaN/Inf is counted in, by role, in the order they are reported.
FAULT_ROLES = ("grad", "param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
#: Elements reduced at a time on the CPU: every role's chunk and the update's stay in the
#: cache while they are reduced (1 MiB each in fp32); measured faster than 64K (fewer
#: calls) on bench_step's 10M layout.
CHUNK = 1 << 18
#: CPU tensors of at most this many elements are reduced together, per batch of those that
#: share their dtypes, factors and weight decay (biases and norms: each one alone would
#: cost some thirty operations' overhead for a few hundred elements).
SMALL = 1 << 12


#: Relative resolution of ``|p_before|^2`` from the identity in :func:`combine_chunks`
#: (16 float32 roundings of its terms).
_RESOLUTION = 16 * 2.0**-23
#: What each chunk gives (:func:`reduce_chunks`): per role its sum of squares, sum, minimum
#: and maximum (the update's as ``r``, where ``update = scale * r``), then ``sum(p * r)``.
_PER_CHUNK = len(ROLES) * len(STATS) + 1


def _stats(x: torch.Tensor, out: Sequence[torch.Tensor]) -> None:
    """Sum of squares, sum, min, max of a flat chunk into ``out`` (4 cells of the stats
    dtype: 16-bit values are widened, their sums would overflow). ``dot`` sums the squares
    in one pass, within a few roundings of float64 on a chunk (``vector_norm`` on the CPU
    drifts by about n / 8000 roundings: 17 at 120K elements)."""
    wide = x if x.dtype == out[0].dtype else x.to(out[0].dtype)
    torch.dot(wide, wide, out=out[0])
    torch.sum(wide, 0, out=out[1])
    torch.amin(wide, 0, out=out[2])
    torch.amax(wide, 0, out=out[3])


def _update(
    p: torch.Tensor,
    m: torch.Tensor,
    vd: torch.Tensor,
    f: Factors,
    decay: float,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Adam's update of one chunk from the state after the step, as ``(r, scale)`` with
    ``update = scale * r`` (the scale left to the host: one pass less), in the stats dtype.

    ``step_size * m / (sqrt(v) / b + eps) == (step_size * b) * m / (sqrt(v) + eps * b)``
    with ``b = sqrt(bc2)``: the same up to roundings the bound covers. Under decoupled
    weight decay the update also takes ``lr * wd * p_before`` with ``p_before = (p -
    u_adam) / (1 - lr * wd)``, so it is formed whole (scale 1). ``out``: where to put it
    (a buffer of the update's dtype and the chunk's length), else a new tensor."""
    wide = wide_dtype(p.dtype)
    if vd.dtype != wide:
        denom = vd.to(wide).sqrt_()
    else:
        denom = torch.sqrt(vd, out=out) if out is not None else vd.sqrt()
    r = torch.div(m, denom.add_(f.eps * f.bc2_sqrt), out=denom)
    scale = -f.step_size * f.bc2_sqrt
    if not decay:
        return r, scale
    c = f.lr * decay / (1.0 - f.lr * decay)
    return r.mul_(scale * (1 + c)).sub_(p, alpha=c), 1.0


def _operands(
    e: Entry, f: Factors | None
) -> tuple[tuple[torch.Tensor, ...], float, tuple[object, ...]]:
    """One entry's flat real grad, param, exp_avg, exp_avg_sq and denominator's v, its
    decoupled weight decay (0 without) and what must match for it to share a batch."""
    s = e.state
    g, p = real_flat(e.grad), real_flat(e.param)
    m, v = real_flat(s["exp_avg"]), real_flat(s["exp_avg_sq"])
    vd = real_flat(s["max_exp_avg_sq"]) if e.group["amsgrad"] and "max_exp_avg_sq" in s else v
    decay = float(e.group.get("weight_decay", 0.0) or 0.0)
    decay = decay if e.group.get("decoupled_weight_decay") else 0.0
    key = (id(f), decay, p.device, *(t.dtype for t in (g, p, m, v, vd)))
    return (g, p, m, v, vd), decay, key


def _chunks(
    e: Entry, f: Factors | None, chunk: int, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """One entry's per-chunk rows (see :data:`_PER_CHUNK`) and its update's scale
    (``scratch``: a buffer of at least ``chunk`` elements of the update's dtype, reused)."""
    (g, p, m, v, vd), decay, _ = _operands(e, f)
    n, wide = p.numel(), wide_dtype(p.dtype)
    rows = torch.full((max(1, -(-n // chunk)), _PER_CHUNK), math.nan, dtype=wide, device=p.device)
    if n == 0:  # empty sums, no extremes
        rows[:, 0:-1:4] = rows[:, 1::4] = rows[:, -1] = 0.0
        return rows, 1.0
    scale = math.nan
    for i, a in enumerate(range(0, n, chunk)):
        b, row = min(n, a + chunk), rows[i].unbind()  # the cells, as views in one call
        if f is not None and f.defined:
            out = scratch[: b - a] if scratch is not None and scratch.dtype == wide else None
            r, scale = _update(p[a:b], m[a:b], vd[a:b], f, decay, out)
        else:  # no step to recompute
            r = torch.full((b - a,), math.nan, dtype=wide, device=p.device)
        for k, x in enumerate((g[a:b], p[a:b], r, m[a:b], v[a:b])):
            _stats(x, row[4 * k : 4 * k + 4])
        pw = p[a:b] if p.dtype == wide else p[a:b].to(wide)
        torch.dot(pw, r, out=row[-1])
    return rows, scale


def _batch_rows(
    batch: Sequence[tuple[tuple[torch.Tensor, ...], float]], f: Factors
) -> tuple[torch.Tensor, float]:
    """One row (see :data:`_PER_CHUNK`) per entry of ``batch`` (the :func:`_operands` of
    small tensors of one length sharing their dtypes, factors and weight decay), in
    float64, and their update's scale: each role of all of them stacked as a matrix, the
    update computed once (elementwise: the same numbers as :func:`_chunks`' per tensor),
    every statistic reduced per row in float64 (the squares' sums within a rounding or two
    of float64: closer than ``dot``'s)."""
    decay = batch[0][1]
    g, p, m, v, vd = (torch.stack([o[0][k] for o in batch]) for k in range(5))
    r, scale = _update(p, m, vd, f, decay)
    rows = torch.empty((len(batch), _PER_CHUNK), dtype=torch.float64, device=p.device)
    wide: list[torch.Tensor] = []
    for k, x in enumerate((g, p, r, m, v)):
        w = x.to(torch.float64)
        wide.append(w)
        torch.sum(w * w, 1, out=rows[:, 4 * k])
        torch.sum(w, 1, out=rows[:, 4 * k + 1])
        torch.amin(w, 1, out=rows[:, 4 * k + 2])
        torch.amax(w, 1, out=rows[:, 4 * k + 3])
    torch.sum(wide[1] * wide[2], 1, out=rows[:, -1])
    return rows, scale


def reduce_chunks(
    entries: Sequence[Entry], factors: Sequence[Factors | None] | None = None
) -> tuple[torch.Tensor, list[int], list[float]]:
    """What :func:`combine_chunks` makes :data:`REDUCED` of, on the entries' device: the
    rows of every entry's chunks as one float64 tensor, how many rows each entry has and
    each one's update scale (``factors``: each entry's Adam factors at its step, None
    where it has none: its update is NaN). Entries must have their state.

    On the CPU, tensors of at most :data:`SMALL` elements that share their length, dtypes,
    factors and weight decay are reduced together (:func:`_batch_rows`): one row each, some
    thirty operations for all of them rather than per tensor."""
    if factors is None:
        factors = [None] * len(entries)
    rows: list[torch.Tensor | None] = [None] * len(entries)
    scales = [1.0] * len(entries)
    batches: dict[tuple[object, ...], list[tuple[int, tuple[torch.Tensor, ...], float]]] = {}
    scratch: dict[torch.dtype, torch.Tensor] = {}  # for the update of a CPU chunk
    longest = min(CHUNK, max((e.param.numel() for e in entries), default=0))
    for i, (e, f) in enumerate(zip(entries, factors, strict=True)):
        numel, cpu = e.param.numel(), e.param.device.type == "cpu"
        if cpu and 0 < numel <= SMALL and f is not None and f.defined:
            operands, decay, key = _operands(e, f)
            batches.setdefault((numel, *key), []).append((i, operands, decay))
            continue
        wide = wide_dtype(e.param.dtype)
        chunk = CHUNK if cpu else max(1, numel)
        if cpu and numel > 0 and wide not in scratch:
            scratch[wide] = torch.empty(2 * longest, dtype=wide)  # complex: 2 per element
        rows[i], scales[i] = _chunks(e, f, chunk, scratch.get(wide) if cpu else None)
    for batch in batches.values():
        f = factors[batch[0][0]]
        assert f is not None
        got, scale = _batch_rows([(o, d) for _, o, d in batch], f)
        for j, (i, _, _) in enumerate(batch):
            rows[i], scales[i] = got[j : j + 1], scale
    parts = [r for r in rows if r is not None]
    counts = [r.shape[0] for r in parts]
    if len({r.dtype for r in parts}) == 1:
        return torch.cat(parts).to(torch.float64), counts, scales
    return torch.cat([r.to(torch.float64) for r in parts]), counts, scales


def combine_chunks(
    values: Sequence[float], counts: Sequence[int], scales: Sequence[float]
) -> list[list[float]]:
    """Each entry's :data:`REDUCED` from :func:`reduce_chunks`' rows (brought to the host,
    flat): sums of squares and sums added, the extremes' extreme, the update scaled, the
    parameter before the step from ``|p - u|^2 = |p|^2 - 2 (p . u) + |u|^2``."""
    out, pos = [], 0
    for count, scale in zip(counts, scales, strict=True):
        rows = [values[pos + i * _PER_CHUNK : pos + (i + 1) * _PER_CHUNK] for i in range(count)]
        pos += count * _PER_CHUNK
        red: list[float] = []
        squares = []
        for k in range(len(ROLES)):
            if count == 1:  # one row (a small tensor's, or one chunk): its cells as they are
                sq, total, low, high = rows[0][k * 4 : k * 4 + 4]
            else:
                col = [row[k * 4 : k * 4 + 4] for row in rows]
                sq, total = math.fsum(c[0] for c in col), math.fsum(c[1] for c in col)
                low = _extreme(min, [c[2] for c in col])
                high = _extreme(max, [c[3] for c in col])
            if ROLES[k] == "update":
                sq, total = sq * scale * scale, total * scale
                low, high = (
                    (low * scale, high * scale) if scale >= 0 else (high * scale, low * scale)
                )
            squares.append(sq)
            red += [math.sqrt(sq) if sq >= 0 else math.nan, total, low, high]
        pr = (rows[0][-1] if count == 1 else math.fsum(row[-1] for row in rows)) * scale
        before = squares[1] - 2 * pr + squares[2]
        # Below the identity's rounding (a parameter that was 0: a zero-initialised bias at
        # its first step) it is 0, so the ratio reads inf, not a number made of roundings.
        if before < _RESOLUTION * (squares[1] + 2 * abs(pr) + squares[2]):
            before = 0.0
        red.append(math.sqrt(before) if not math.isnan(before) else math.nan)
        out.append(red)
    return out


def _extreme(pick: Callable[[list[float]], float], values: list[float]) -> float:
    """NaN wins, as it does within a chunk."""
    return math.nan if any(math.isnan(x) for x in values) else pick(values)


def update_rounding(dtype: torch.dtype, param_norm: float, update_norm: float) -> float:
    """The bound of ``norm(update - (p_after - p_before))`` (see the module docstring)."""
    return torch.finfo(dtype).eps * (param_norm + 5 * update_norm)


def count_faults(e: Entry) -> dict[str, tuple[int, int]]:
    """``{role: (nan, inf)}`` over the entry's full tensors (roles with none left out)."""
    s = e.state
    found: dict[str, tuple[int, int]] = {}
    for role, t in zip(
        FAULT_ROLES,
        (e.grad, e.param, s.get("exp_avg"), s.get("exp_avg_sq"), s.get("max_exp_avg_sq")),
        strict=True,
    ):
        if t is None:
            continue
        flat = real_flat(t)
        counts = torch.stack([torch.isnan(flat).sum(), torch.isinf(flat).sum()]).tolist()
        if counts[0] or counts[1]:
            found[role] = (int(counts[0]), int(counts[1]))
    return found
