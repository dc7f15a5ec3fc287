"""A stepper's reusable memory, so that a step allocates nothing large.

Three kinds, each made once per parameter and reused by every request after it: host
buffers the wire writes gradients into (page-locked on an accelerator, so the copy to the
device can be asynchronous; one per wire dtype), device buffers those gradients are copied
to, and page-locked host mirrors of the parameters that a reply is sent from.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import DeviceOutOfMemory
from .memory import is_out_of_memory

__all__ = ["Buffers", "out_of_memory"]


def out_of_memory(error: BaseException, what: str, **extra: object) -> DeviceOutOfMemory:
    """The 507 problem for an allocation that failed ``what`` (first line of its message)."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DeviceOutOfMemory(f"out of device memory {what} ({first})", **extra)


class Buffers:
    """The reusable buffers of one stepper on ``device`` (see the module docstring). The
    stepper calls these under its lock."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.staging: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.device_grads: dict[str, torch.Tensor] = {}
        self.host_mirrors: dict[str, torch.Tensor] = {}

    def grad(self, name: str, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The host buffer a gradient of ``name`` in ``dtype`` is received into."""
        buf = self.staging.get((name, dtype))
        if buf is None:
            pin = self.device.type == "cuda"
            try:
                buf = torch.empty(param.shape, dtype=dtype, pin_memory=pin)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                raise out_of_memory(e, f"staging the gradient of {name!r}") from None
            self.staging[(name, dtype)] = buf
        return buf

    def on_device(self, name: str, param: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Gradient ``g`` where the step reads it: contiguous, on the parameter's device."""
        if self.device.type == "cpu":
            return g if g.is_contiguous() else g.contiguous()
        dev = self.device_grads.get(name)
        if dev is None:
            dev = self.device_grads[name] = torch.empty_like(param)
        return dev.copy_(g, non_blocking=True)

    def host(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parameters as CPU tensors: themselves on the CPU (no copy), else their
        page-locked mirrors, refreshed (one wait for every copy)."""
        if self.device.type == "cpu":
            return {n: p.detach() for n, p in params.items()}
        out = {}
        for n, p in params.items():
            mirror = self.host_mirrors.get(n)
            if mirror is None:
                try:
                    mirror = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
                except Exception as e:
                    if not is_out_of_memory(e):
                        raise
                    raise out_of_memory(e, "for the reply's host buffers") from None
                self.host_mirrors[n] = mirror
            mirror.copy_(p.detach(), non_blocking=True)
            out[n] = mirror
        torch.cuda.current_stream(self.device).synchronize()
        return out

    def clear(self) -> None:
        """Drop every buffer (the stepper was deleted)."""
        self.staging.clear()
        self.device_grads.clear()
        self.host_mirrors.clear()
