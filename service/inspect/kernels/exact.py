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
accelerator. The results stay on the device until the caller's one transfer to the host.

NaN and Inf propagate through a norm, a sum, a minimum and a maximum, so these reductions
say for free whether a tensor holds any: only then (a rare step) are its NaN and Inf
elements counted, exactly and per role (:func:`count_faults`). A norm that overflows (every
element finite, the sum of squares beyond the accumulator's range) only costs that count,
which then finds nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from adamscope.client.numerics import Factors, real_flat, wide_dtype

from .sampling import Entry

__all__ = [
    "CHUNK",
    "FAULT_ROLES",
    "REDUCED",
    "ROLES",
    "STATS",
    "count_faults",
    "reduce_exact",
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
#: Elements reduced at a time on the CPU: every role's chunk and the update's fit in the
#: cache together (2 MiB of fp32 in all).
CHUNK = 1 << 16


def _stats(x: torch.Tensor) -> list[torch.Tensor]:
    """norm, sum, min, max of a flat chunk (norms and sums accumulated in float32 or wider:
    a 16-bit one of a large tensor would overflow). The norm is the root of a sum of
    squares: ``sum`` adds in a cascade (within a few roundings of float64 on 64K elements),
    where ``vector_norm`` on the CPU drifts by about n / 8000 roundings (17 at 120K)."""
    low, high = torch.aminmax(x)
    wide = x if x.element_size() >= 4 else x.float()
    return [torch.mul(wide, wide).sum().sqrt(), wide.sum(), low, high]


def _update(
    p: torch.Tensor, m: torch.Tensor, vd: torch.Tensor, f: Factors, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's update of one chunk from the state after the step, and the chunk's parameter
    before the step, in the stats dtype."""
    wide = wide_dtype(p.dtype)
    denom = vd.to(wide).sqrt_() if vd.dtype != wide else vd.sqrt()
    denom.div_(f.bc2_sqrt).add_(f.eps)
    u = torch.div(m, denom, out=denom).mul_(-f.step_size)
    if decay:  # decoupled: p_before = (p - u_adam) / (1 - lr * wd), decayed by lr * wd of it
        keep = 1.0 - f.lr * decay
        p0 = (p - u).div_(keep)
        u.sub_(p0, alpha=f.lr * decay)
        return u, p0
    return u, p - u


def _reduce_one(e: Entry, f: Factors | None, chunk: int) -> torch.Tensor:
    """One entry's :data:`REDUCED` (float64, on its device)."""
    s = e.state
    g, p = real_flat(e.grad), real_flat(e.param)
    m, v = real_flat(s["exp_avg"]), real_flat(s["exp_avg_sq"])
    vd = real_flat(s["max_exp_avg_sq"]) if e.group["amsgrad"] and "max_exp_avg_sq" in s else v
    decay = float(e.group.get("weight_decay", 0.0) or 0.0)
    decay = decay if e.group.get("decoupled_weight_decay") else 0.0
    n = p.numel()
    parts = []
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        if f is not None and f.defined:
            u, p0 = _update(p[a:b], m[a:b], vd[a:b], f, decay)
        else:  # no step to recompute
            u = p0 = torch.full((b - a,), math.nan, dtype=wide_dtype(p.dtype), device=p.device)
        values = [*_stats(g[a:b]), *_stats(p[a:b]), *_stats(u), *_stats(m[a:b]), *_stats(v[a:b])]
        values.append(torch.linalg.vector_norm(p0))
        if len({x.dtype for x in values}) == 1:
            parts.append(torch.stack(values).to(torch.float64))
        else:
            parts.append(torch.stack([x.to(torch.float64) for x in values]))
    if len(parts) == 1:
        return parts[0]
    per = torch.stack(parts).view(len(parts), -1)
    squares = per * per
    cols = []
    for i in range(len(ROLES)):
        k = i * len(STATS)
        cols += [
            squares[:, k].sum().sqrt(),
            per[:, k + 1].sum(),
            per[:, k + 2].min(),
            per[:, k + 3].max(),
        ]
    cols.append(squares[:, -1].sum().sqrt())
    return torch.stack(cols)


def reduce_exact(
    entries: Sequence[Entry], factors: Sequence[Factors | None] | None = None
) -> torch.Tensor:
    """(S, len(REDUCED)) float64 on the entries' device: :data:`REDUCED` of each entry's
    full tensors after the step (entries must have their state; ``factors``: each entry's
    Adam factors at its step, None where it has none: its update is NaN)."""
    if factors is None:
        factors = [None] * len(entries)
    return torch.stack(
        [
            _reduce_one(e, f, CHUNK if e.param.device.type == "cpu" else max(1, e.param.numel()))
            for e, f in zip(entries, factors, strict=True)
        ]
    )


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
