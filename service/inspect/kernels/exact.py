"""Exact per-tensor reductions of a step's full tensors, and exact NaN/Inf counts.

Every step, for every stepped tensor, over all of its elements (no sample): the L2 norms of
the gradient, the parameter after the step and exp_avg, and the sum of exp_avg_sq. One
``torch._foreach_norm`` call for the three norms of every tensor and one sum per tensor for
v: each tensor read once, bound by memory bandwidth (about 16 ms per 10M fp32 parameters on
one core), no copy of a full tensor and no temporary the size of one. (A maximum of v would
cost another pass, about a third more: left out.) The results stay on the device until the
caller's one transfer to the host.

NaN and Inf propagate through a norm and a sum, so these reductions say for free
whether a tensor holds any: only then (a rare step) are its NaN and Inf elements counted,
exactly and per role (:func:`count_faults`). A norm that overflows (every element finite,
the sum of squares beyond the accumulator's range) only costs that count, which then finds
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adamscope.client.numerics import real_flat

from .sampling import Entry

__all__ = ["FAULT_ROLES", "REDUCED", "count_faults", "reduce_exact"]

#: The columns :func:`reduce_exact` gives per tensor, in order.
REDUCED = ("grad_norm", "param_norm", "exp_avg_norm", "exp_avg_sq_sum")
#: The tensors a NaN/Inf is counted in, by role, in the order they are reported.
FAULT_ROLES = ("grad", "param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _stacked(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-dim results as one float64 vector (one stack when they share a dtype)."""
    if len({v.dtype for v in values}) == 1:
        return torch.stack(list(values)).to(torch.float64)
    return torch.stack([v.to(torch.float64) for v in values])


def reduce_exact(entries: Sequence[Entry]) -> torch.Tensor:
    """(S, len(REDUCED)) float64 on the entries' device: :data:`REDUCED` of each entry's
    full tensors (after the step; entries must have their state)."""
    n = len(entries)
    gs = [real_flat(e.grad) for e in entries]
    ps = [real_flat(e.param) for e in entries]
    ms = [real_flat(e.state["exp_avg"]) for e in entries]
    vs = [real_flat(e.state["exp_avg_sq"]) for e in entries]
    # float32 results for narrow dtypes: a 16-bit norm of a large tensor would overflow.
    norms = _stacked(torch._foreach_norm([*gs, *ps, *ms], 2, dtype=_result_dtype(gs)))
    sums = _stacked([v.sum(dtype=torch.float32) if v.element_size() < 4 else v.sum() for v in vs])
    return torch.cat([norms.view(3, n), sums[None]]).t()


def _result_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype | None:
    if any(t.element_size() < 4 for t in tensors) and all(
        t.dtype != torch.float64 for t in tensors
    ):
        return torch.float32
    return None


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
