"""Adam state tensors as a load sends them: checked against their parameter before they
replace anything (so a rejected load leaves the stepper as it was)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import DtypeMismatch, InvalidState, ShapeMismatch
from .spec import dtype_name

__all__ = ["STATE_KEYS", "check_key", "check_shape", "checked_tensor", "missing_keys"]

#: Per-parameter state tensors of torch.optim.Adam, in PyTorch's order.
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_key(name: str, key: str) -> None:
    if key not in STATE_KEYS:
        raise InvalidState(
            f"unknown state key {key!r} for {name!r}; expected one of {', '.join(STATE_KEYS)}",
            parameter=name,
        )


def _check_step_shape(name: str, shape: Sequence[int]) -> None:
    if math.prod(shape) != 1 or len(shape) > 1:
        raise ShapeMismatch(
            f"step of {name!r} must be a scalar, got shape {list(shape)}", parameter=name
        )


def _check_like(name: str, key: str, shape: Sequence[int], param: torch.Tensor) -> None:
    if tuple(shape) != tuple(param.shape):
        raise ShapeMismatch(
            f"{key} for {name!r} has shape {list(shape)}, parameter has {list(param.shape)}",
            parameter=name,
        )


def check_shape(name: str, key: str, shape: Sequence[int], param: torch.Tensor) -> None:
    """Raise as :func:`checked_tensor` would for a tensor of this shape (before any byte of
    it has been read or allocated)."""
    check_key(name, key)
    if key == "step":
        _check_step_shape(name, shape)
    else:
        _check_like(name, key, shape, param)


def _checked_step(name: str, t: torch.Tensor) -> torch.Tensor:
    _check_step_shape(name, list(t.shape))
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise DtypeMismatch(f"step of {name!r} must be a real number", parameter=name)
    value = float(t.reshape(()).item())
    if not (math.isfinite(value) and value >= 0):
        raise InvalidState(f"step of {name!r} must be finite and >= 0, got {value}", parameter=name)
    if not t.dtype.is_floating_point:
        t = t.to(torch.float32)
    return t.reshape(()).clone()


def checked_tensor(
    name: str, key: str, t: torch.Tensor, param: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """State tensor ``key`` of parameter ``name`` as the optimizer will hold it (a scalar
    float ``step``; a moment on ``device`` in the parameter's dtype), or the error."""
    check_key(name, key)
    if key == "step":
        return _checked_step(name, t)
    _check_like(name, key, list(t.shape), param)
    # PyTorch casts floating state to the parameter's dtype on load; other params keep
    # the state's dtype, so for those it must already match.
    ok = t.dtype == param.dtype or (param.is_floating_point() and t.is_floating_point())
    if not ok:
        raise DtypeMismatch(
            f"{key} for {name!r} has dtype {dtype_name(t.dtype)}, "
            f"parameter has {dtype_name(param.dtype)}",
            parameter=name,
        )
    return t.to(device=device, dtype=param.dtype)


def missing_keys(state: Mapping[str, Any], amsgrad: bool) -> list[str]:
    """The keys a parameter's non-empty state lacks under its group's ``amsgrad``."""
    need = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    return [k for k in need if k not in state]
