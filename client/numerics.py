"""PyTorch's numerics as adamscope reproduces them, in plain Python and torch.

Shared by the service's engine and inspection and by code that runs where an optimizer's
state lives (a user's training job): the dtype statistics widen to, a flat real view of a
tensor, a host value uploaded without a device sync, a Python scalar rounded as PyTorch
rounds it, and Adam's bias-correction factors as its for-loop implementation computes them.
Nothing here imports the service (the client never does).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Factors", "adam_factors", "real_flat", "rounded_scalar", "upload", "wide_dtype"]


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 (and complex128) data, else float32: the dtype stats use."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def real_flat(t: torch.Tensor) -> torch.Tensor:
    """A flat real view: complex tensors as their (real, imag) pairs, as Adam steps them."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1)


def upload(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values as a tensor on ``device`` without waiting for the device: a tensor
    made with ``torch.tensor(..., device="cuda")`` is copied from pageable memory and
    synchronizes with every kernel queued before it; this copies from page-locked memory,
    queued behind them."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def rounded_scalar(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (to nearest, ties to even), in plain Python."""
    if dtype == torch.float64 or not math.isfinite(value):
        return value
    # Through float32 first, as PyTorch converts a Python scalar to a 16-bit dtype.
    try:
        single = float(struct.unpack("f", struct.pack("f", value))[0])
        if dtype == torch.float16:
            return float(struct.unpack("e", struct.pack("e", single))[0])
    except OverflowError:
        return math.copysign(math.inf, value)
    if dtype != torch.bfloat16 or not math.isfinite(single):
        return single
    bits = struct.unpack("I", struct.pack("f", single))[0]
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return float(struct.unpack("f", struct.pack("I", bits & 0xFFFFFFFF))[0])


@dataclass(frozen=True)
class Factors:
    """One parameter's Adam scalars at its state step, as the for-loop computes them."""

    step: float
    lr: float
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool
    bc1: float = field(init=False)
    bc2: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bc1", 1 - self.beta1**self.step)
        object.__setattr__(self, "bc2", 1 - self.beta2**self.step)

    @property
    def defined(self) -> bool:
        return self.bc1 != 0 and self.bc2 != 0

    @property
    def step_size(self) -> float:
        return self.lr / self.bc1

    @property
    def bc2_sqrt(self) -> float:
        return float(self.bc2**0.5)


def adam_factors(group: Mapping[str, Any], step: float) -> Factors:
    beta1, beta2 = (float(b) for b in group["betas"])
    return Factors(
        float(step), float(group["lr"]), beta1, beta2, float(group["eps"]), bool(group["amsgrad"])
    )
