"""What the schedule did at a step: each param group's options and Adam factors, recorded
with the step's signals so that a person (and the alert rules) can tell a scheduler's step
from a jump of v.

Groups are numbered in the order their first parameter appears in the optimizer (a hosted
stepper's param group order). At every step each group that stepped gives::

    {"group": 0, "step": 12.0, "lr": 1e-3, "beta1": 0.9, "beta2": 0.999,
     "bc1": 1 - beta1 ** step, "bc2": 1 - beta2 ** step, "step_size": lr / bc1}

and the same as aggregate signals ``group0.lr``, ``group0.beta1``, ... (history columns,
step events, and ``/metrics`` as ``adamscope_group_option{group,option}``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adamscope.client.numerics import adam_factors

from .kernels import Entry
from .optimizer import OptimizerState

__all__ = [
    "GROUP_FIELDS",
    "GROUP_PREFIX",
    "group_fields",
    "group_order",
    "split_group_key",
    "with_groups",
]

#: The per-group fields, in order.
GROUP_FIELDS = ("lr", "beta1", "beta2", "bc1", "bc2", "step_size")
#: Aggregate signals ``group<i>.<field>`` carry them.
GROUP_PREFIX = "group"


def split_group_key(key: str) -> tuple[str, str] | None:
    """``"group3.lr"`` -> ``("3", "lr")``; None for any other signal name."""
    head, dot, field = key.partition(".")
    if not dot or not head.startswith(GROUP_PREFIX) or not head[len(GROUP_PREFIX) :].isdigit():
        return None
    return head[len(GROUP_PREFIX) :], field


def group_order(opt: OptimizerState) -> dict[str, int]:
    """Each parameter's group number: groups in the order their first parameter comes."""
    seen: dict[int, int] = {}
    return {n: seen.setdefault(id(opt.param_group(n)), len(seen)) for n in opt.names}


def group_fields(
    order: Mapping[str, int], found: Sequence[Entry], steps: Sequence[float | None]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Each stepped group's options and factors at its step (after the step), as a list
    and as flat aggregate signals (``order``: :func:`group_order`)."""
    groups: dict[int, dict[str, Any]] = {}
    for e, t in zip(found, steps, strict=True):
        index = order.get(e.name)
        if index is None or index in groups or t is None:
            continue
        f = adam_factors(e.group, t)
        groups[index] = {
            "group": index,
            "step": t,
            "lr": f.lr,
            "beta1": f.beta1,
            "beta2": f.beta2,
            "bc1": f.bc1,
            "bc2": f.bc2,
            "step_size": f.step_size if f.bc1 else float("nan"),
        }
    listed = [groups[i] for i in sorted(groups)]
    flat = {f"{GROUP_PREFIX}{g['group']}.{k}": float(g[k]) for g in listed for k in GROUP_FIELDS}
    return listed, flat


def with_groups(
    signals: dict[str, Any],
    order: Mapping[str, int],
    found: Sequence[Entry],
    steps: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """``signals`` with ``groups`` and the ``group<i>.<field>`` aggregate signals added
    (``steps``: each entry's state step after the step, else read from the states)."""
    if steps is None:
        steps = [float(e.state["step"]) if "step" in e.state else None for e in found]
    groups, flat = group_fields(order, found, steps)
    signals["groups"] = groups
    signals["aggregate"].update(flat)
    return signals
