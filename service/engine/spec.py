"""What a stepper is made of, checked before anything is allocated: its parameters' names
and dtypes, its param groups, and each group's options (validated by PyTorch itself)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import DuplicateName, InvalidSpec, UnknownParameter
from .options import OPTIMIZERS, SUPPORTED_DTYPES, default_options, validate_options

__all__ = ["GroupDef", "StepperSpec", "checked_spec", "dtype_name"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class GroupDef:
    """A param group as created: parameter names plus options that differ from defaults."""

    params: list[str]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepperSpec:
    """A stepper's layout, checked: parameter names in order, the groups (each keeps its
    parameters in the order given: that order defines PyTorch's state_dict indices) and
    every group's complete options."""

    names: list[str]
    groups: list[GroupDef]
    options: list[dict[str, Any]]


def _check_params(params: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    names = [n for n, _ in params]
    if not names:
        raise InvalidSpec("a stepper needs at least one parameter")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise DuplicateName(f"parameter name {n!r} appears more than once")
        seen.add(n)
    for n, t in params:
        if t.dtype not in SUPPORTED_DTYPES:
            allowed = ", ".join(dtype_name(d) for d in SUPPORTED_DTYPES)
            raise InvalidSpec(
                f"parameter {n!r} has dtype {dtype_name(t.dtype)}; Adam steps floating "
                f"or complex tensors and the wire carries: {allowed}"
            )
        if t.is_sparse:
            raise InvalidSpec(f"parameter {n!r} is sparse; Adam steps dense tensors")
    return names


def _check_groups(names: Sequence[str], groups: Sequence[GroupDef]) -> None:
    known = set(names)
    grouped: list[str] = [n for g in groups for n in g.params]
    for n in grouped:
        if n not in known:
            raise UnknownParameter(f"param group names unknown parameter {n!r}")
    if sorted(grouped) != sorted(names):
        dup = sorted({n for n in grouped if grouped.count(n) > 1})
        missing = [n for n in names if n not in grouped]
        raise InvalidSpec(
            "every parameter must be in exactly one group"
            + (f"; in several: {dup}" if dup else "")
            + (f"; in none: {missing}" if missing else "")
        )


def checked_spec(
    kind: str,
    device: torch.device,
    params: Sequence[tuple[str, torch.Tensor]],
    hyperparameters: Mapping[str, Any],
    groups: Sequence[GroupDef] | None = None,
) -> StepperSpec:
    """The layout of a stepper of ``kind`` over ``params`` on ``device``, or the error a
    create request gets (nothing is allocated before this returns)."""
    if kind not in OPTIMIZERS:
        raise InvalidSpec(f"unknown optimizer {kind!r}; expected 'adam' or 'adamw'")
    names = _check_params(params)
    chosen = list(groups) if groups is not None else [GroupDef(list(names))]
    _check_groups(names, chosen)
    by_name = dict(params)
    base = default_options(kind)
    for k, v in hyperparameters.items():
        if v is not None or k in ("foreach", "fused"):
            base[k] = v
    options: list[dict[str, Any]] = []
    for g in chosen:
        probe_like = [torch.empty(0, dtype=by_name[n].dtype, device=device) for n in g.params]
        options.append(validate_options(kind, {**base, **g.options}, probe_like))
    return StepperSpec(names, chosen, options)
