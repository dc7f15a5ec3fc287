"""Name-keyed differences between two states of steppers (live steppers or snapshots).

PyTorch's ``state_dict`` keys state by position, so comparing two optimizers means trusting
that both list their parameters in the same order. Here tensors are matched by parameter
name and state key; for each pair this reports whether it changed (bitwise: a NaN that
stayed NaN is unchanged, ``0.0`` vs ``-0.0`` is a change), how many elements changed, the
largest absolute difference, the norm of the difference and that norm relative to the
first operand's. Differences are computed in float64 over the real view (complex tensors
as (real, imag) pairs); elements where either side is NaN/Inf are counted apart
(``nonfinite_changed``) and left out of the magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adamscope.client.numerics import real_flat

__all__ = ["Operand", "diff"]

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class Operand:
    """One side of a diff: tensors by parameter name and key (``param`` or a state key),
    the step, and each param group's options."""

    label: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]
    groups: list[dict[str, Any]] = field(default_factory=list)


def _bitwise(t: torch.Tensor) -> torch.Tensor:
    flat = real_flat(t)
    return flat.view(_BITS[flat.element_size()])


def _pair(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    if a.shape != b.shape or a.dtype != b.dtype:
        return {
            "comparable": False,
            "a": {"shape": list(a.shape), "dtype": str(a.dtype)[6:]},
            "b": {"shape": list(b.shape), "dtype": str(b.dtype)[6:]},
        }
    differs = _bitwise(a) != _bitwise(b)
    n_changed = int(differs.sum())
    xa, xb = real_flat(a).double(), real_flat(b).double()
    finite = torch.isfinite(xa) & torch.isfinite(xb)
    d = (xb - xa).masked_fill(~finite, 0.0)
    norm_a = float(torch.linalg.vector_norm(xa.masked_fill(~finite, 0.0)))
    norm_d = float(torch.linalg.vector_norm(d))
    out: dict[str, Any] = {
        "comparable": True,
        "changed": n_changed > 0,
        "changed_elements": n_changed,
        "numel": a.numel(),
        "nonfinite_changed": int((differs & ~finite).sum()),
        "max_abs_diff": float(d.abs().max()) if d.numel() else 0.0,
        "diff_norm": norm_d,
        "a_norm": norm_a,
        "relative": norm_d / norm_a if norm_a else (0.0 if norm_d == 0 else math.inf),
    }
    if a.numel() == 1:
        out["a"], out["b"] = float(xa[0]), float(xb[0])
    return out


def _options(
    a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    out = []
    for gi, (ga, gb) in enumerate(zip(a, b, strict=False)):
        for k in sorted(set(ga) | set(gb)):
            if k in ("params", "index"):
                continue
            va, vb = ga.get(k), gb.get(k)
            if isinstance(va, tuple | list) and isinstance(vb, tuple | list):
                va, vb = list(va), list(vb)
            if va != vb:
                out.append({"group": gi, "option": k, "a": va, "b": vb})
    return out


def diff(a: Operand, b: Operand) -> dict[str, Any]:
    """The name-keyed diff of ``b`` against ``a``."""
    names_a, names_b = list(a.tensors), list(b.tensors)
    only_a = [n for n in names_a if n not in b.tensors]
    only_b = [n for n in names_b if n not in a.tensors]
    tensors: dict[str, dict[str, Any]] = {}
    changed: list[str] = []
    missing: list[dict[str, Any]] = []
    for n in names_a:
        if n not in b.tensors:
            continue
        ta, tb = a.tensors[n], b.tensors[n]
        entry: dict[str, Any] = {}
        for key in list(ta) + [k for k in tb if k not in ta]:
            if key not in ta or key not in tb:
                missing.append({"name": n, "key": key, "in": "b" if key in tb else "a"})
                continue
            entry[key] = _pair(ta[key], tb[key])
            if entry[key].get("changed") or not entry[key]["comparable"]:
                changed.append(f"{n}.{key}")
        tensors[n] = entry
    group_count = (len(a.groups), len(b.groups))
    return {
        "a": a.label,
        "b": b.label,
        "tensors": tensors,
        "changed": changed,
        "only_in_a": only_a,
        "only_in_b": only_b,
        "state_only_in_one": missing,
        "options": _options(a.groups, b.groups),
        "groups": {"a": group_count[0], "b": group_count[1]},
    }
