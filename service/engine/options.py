"""Optimizer options: PyTorch's defaults, PyTorch's validation, device resolution.

Validation is delegated to PyTorch itself: a candidate set of options is used to build a
throwaway ``torch.optim.Adam``/``AdamW`` (whose ``__init__`` raises PyTorch's own messages)
and, for options whose errors only surface when stepping (``fused`` on an unsupported
dtype, ``capturable`` on the CPU), to step a one-element probe of each dtype involved.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from adamscope.client.constants import OPTION_NAMES

from .errors import DeviceOutOfMemory, DeviceUnavailable, InvalidHyperparameter
from .memory import is_out_of_memory

__all__ = [
    "OPTIMIZERS",
    "OPTION_NAMES",
    "STRUCTURAL_OPTIONS",
    "SUPPORTED_DTYPES",
    "default_options",
    "quiet_capturable",
    "resolve_device",
    "validate_options",
]

OPTIMIZERS: dict[str, type[torch.optim.Adam]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


#: Options that change which kernel runs or which state exists: worth a probe step.
STRUCTURAL_OPTIONS = frozenset({"amsgrad", "foreach", "capturable", "differentiable", "fused"})

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64)


#: Keywords each constructor takes in the installed torch (older releases lack some, e.g.
#: ``decoupled_weight_decay`` arrived in 2.7); an absent one can only be left at its default.
_ACCEPTED = {
    kind: set(inspect.signature(cls.__init__).parameters) for kind, cls in OPTIMIZERS.items()
}
_ABSENT_DEFAULTS: dict[str, Any] = {"decoupled_weight_decay": False}


def quiet_capturable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` with PyTorch's capturable warning marked as given.

    Where an accelerator is available, ``Optimizer.step`` warns once per instance that
    every group has ``capturable=True`` but the step runs outside graph capture. The
    service never graph-captures: a user asks for ``capturable=True`` for its placement
    (steps on the device) and its numerics, which the stepper must reproduce. Under
    ``filterwarnings=error`` that warning would fail a step. PyTorch keeps the "warned
    already" flag per instance (``_warned_capturable_if_run_uncaptured``); a new instance
    starts with it set in every release since 1.12, but an instance rebuilt from its
    ``__getstate__`` (pickling, ``copy.deepcopy``) starts without it. The service sets it
    on every optimizer it owns so that no path can warn.
    """
    optimizer._warned_capturable_if_run_uncaptured = True
    return optimizer


def _group_options(kind: str, group: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: group.get(k, _ABSENT_DEFAULTS.get(k)) for k in OPTION_NAMES}
    if kind == "adamw" and "decoupled_weight_decay" not in group:
        out["decoupled_weight_decay"] = True
    return out


def default_options(kind: str) -> dict[str, Any]:
    """The option dict PyTorch puts in a fresh group of ``kind`` (AdamW included)."""
    probe = torch.zeros(1, requires_grad=True)
    return _group_options(kind, OPTIMIZERS[kind]([probe]).param_groups[0])


def _normalize(options: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(options)
    if out.get("betas") is not None:
        out["betas"] = tuple(out["betas"])
    return out


def validate_options(
    kind: str,
    options: Mapping[str, Any],
    probe_like: Iterable[torch.Tensor] = (),
    probe_step: bool = True,
) -> dict[str, Any]:
    """Check a group's complete options with PyTorch and return them normalized.

    ``probe_like`` gives the device/dtype of the group's parameters; with ``probe_step``
    a zero gradient is stepped on a one-element copy of each distinct kind, so errors that
    PyTorch raises only when stepping are caught before any real tensor is touched.
    """
    opts = _normalize(options)
    unknown = set(opts) - set(OPTION_NAMES)
    if unknown:
        raise InvalidHyperparameter(f"unknown option(s): {', '.join(sorted(unknown))}")
    if opts.get("differentiable"):
        raise InvalidHyperparameter(
            "differentiable=True is not supported by a remote optimizer: "
            "an autograd graph cannot cross the network"
        )
    kwargs = dict(opts)
    if kind == "adamw" and kwargs.pop("decoupled_weight_decay", True) is not True:
        raise InvalidHyperparameter(
            "AdamW always decouples weight decay; use optimizer 'adam' for L2 decay"
        )
    for k in list(kwargs):
        if k not in _ACCEPTED[kind]:
            if kwargs[k] not in (None, _ABSENT_DEFAULTS.get(k)):
                raise InvalidHyperparameter(
                    f"{k}={kwargs[k]!r} needs a newer torch than {torch.__version__}"
                )
            del kwargs[k]
    kinds = {(t.dtype, t.device) for t in probe_like} or {(torch.float32, torch.device("cpu"))}
    probes = [torch.zeros(1, dtype=dt, device=dev, requires_grad=True) for dt, dev in kinds]
    try:
        optim = quiet_capturable(OPTIMIZERS[kind](probes, **kwargs))
        if probe_step:
            for p in probes:
                p.grad = torch.zeros_like(p)
            optim.step()
    except (ValueError, RuntimeError, TypeError, KeyError, AssertionError) as e:
        if is_out_of_memory(e):  # the probe's one element did not fit: not the options' fault
            raise DeviceOutOfMemory(f"out of device memory checking the options ({e})") from None
        raise InvalidHyperparameter(str(e)) from None
    group = optim.param_groups[0]
    return _group_options(kind, group)


def resolve_device(spec: str | None, default: str) -> torch.device:
    """Parse a device name and check this process can use it."""
    name = spec or default
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise DeviceUnavailable(f"invalid device {name!r}: {e}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {name!r} requested but CUDA is not available here")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s)"
            )
        return torch.device("cuda", index)
    raise DeviceUnavailable(f"device type {device.type!r} is not supported (use cpu or cuda)")
