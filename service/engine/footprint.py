"""What a stepper holds in memory: the one estimate the memory budget and placement share.

A stepper of ``P`` parameter bytes holds more than its parameters and Adam state:

* **state**: the parameters, ``exp_avg`` and ``exp_avg_sq`` (``max_exp_avg_sq`` too under
  ``amsgrad``) and a 4-byte ``step`` per parameter: ``3P`` or ``4P`` (what the summary's
  ``state_bytes`` reports once every parameter has stepped);
* **gradients**: the buffer a step's gradients are received into, ``P`` (on the CPU the
  host buffer the request body is read into; on a GPU the device copy PyTorch steps with);
* **workspace**: the temporaries PyTorch's ``step()`` allocates and frees again, by
  implementation (read off ``torch/optim/adam.py``): ``fused`` none; ``foreach`` one
  ``_foreach_sqrt`` result per tensor of a group (``P``), the gradient copies that
  ``maximize`` and L2 ``weight_decay`` make being freed before it; ``forloop`` (one tensor
  at a time) ``denom``'s two temporaries of the largest tensor, plus one more gradient
  copy of it under ``maximize`` or L2 ``weight_decay``; ``capturable`` adds a few
  per-tensor scalars. Groups step one after another: the largest group's peak counts;
* **pinned**: on an accelerator, page-locked host buffers: the staging buffer gradients
  arrive in (``P``) and the mirror replies stream parameters from (``P``): ``2P`` of host
  memory the operating system can neither swap nor move;

and each process that uses a CUDA device pays for its context once (:data:`CONTEXT_BYTES`,
a conservative allowance: the CUDA runtime, cuBLAS and PyTorch's kernels take 300 to 600
MiB depending on the GPU and driver).

PyTorch's default implementation (``foreach=None``, ``fused=None``) is ``foreach`` for
tensors on a GPU and the for-loop on the CPU, as ``_default_to_fused_or_foreach`` chooses.
The figures are estimates of allocations, not measurements: the CUDA caching allocator
rounds each block up (512 bytes, 2 MiB segments), so many small tensors take a little more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CONTEXT_BYTES",
    "STEP_BYTES",
    "Footprint",
    "footprint",
    "implementation",
    "state_bytes",
    "step_working_set",
    "workspace_bytes",
]

#: PyTorch keeps each parameter's ``step`` as a float32 scalar tensor.
STEP_BYTES = 4
#: Device memory a process's CUDA context takes before it holds any tensor (an allowance).
CONTEXT_BYTES = 512 * 2**20
#: A ``capturable`` group's per-tensor scalar temporaries (bias corrections, step sizes),
#: each a 512-byte block of the caching allocator.
_CAPTURABLE_SCALARS = 4 * 512


@dataclass(frozen=True)
class Footprint:
    """Bytes a stepper holds, by kind (see the module docstring)."""

    device: str  # the device type: "cpu", "cuda", ...
    state: int
    gradients: int
    workspace: int
    pinned: int

    @property
    def on_device(self) -> int:
        """Bytes on the stepper's device (the host's memory for a CPU stepper)."""
        return self.state + self.gradients + self.workspace

    @property
    def total(self) -> int:
        """Everything, device and pinned host memory together."""
        return self.on_device + self.pinned

    def as_dict(self) -> dict[str, int]:
        return {
            "state": self.state,
            "gradients": self.gradients,
            "workspace": self.workspace,
            "pinned": self.pinned,
            "on_device": self.on_device,
            "total": self.total,
        }


def implementation(options: Mapping[str, Any], device: str) -> str:
    """``"fused"``, ``"foreach"`` or ``"forloop"``: which of Adam's implementations
    ``step()`` runs for a group with these options on this device type."""
    if options.get("fused"):
        return "fused"
    foreach = options.get("foreach")
    if foreach is None and not options.get("differentiable"):
        foreach = device != "cpu"
    return "foreach" if foreach else "forloop"


def state_bytes(sizes: Iterable[int], amsgrad: bool) -> int:
    """Parameters plus Adam state after the first step, for parameters of ``sizes`` bytes."""
    return sum(n * (4 if amsgrad else 3) + STEP_BYTES for n in sizes)


def workspace_bytes(sizes: Sequence[int], options: Mapping[str, Any], device: str) -> int:
    """Peak temporaries of one group's ``step()`` (parameters of ``sizes`` bytes)."""
    if not sizes:
        return 0
    impl = implementation(options, device)
    scalars = _CAPTURABLE_SCALARS * len(sizes) if options.get("capturable") else 0
    if impl == "fused":
        return 0
    if impl == "foreach":
        return sum(sizes) + scalars
    grad_copy = bool(options.get("maximize")) or _l2(options)
    largest = max(sizes)
    return (3 if grad_copy else 2) * largest + (_CAPTURABLE_SCALARS if scalars else 0)


def _l2(options: Mapping[str, Any]) -> bool:
    """Adam's coupled weight decay (``grad + wd * p``: a new tensor); AdamW's is in place."""
    return bool(options.get("weight_decay")) and not options.get("decoupled_weight_decay")


def footprint(groups: Iterable[tuple[Sequence[int], Mapping[str, Any]]], device: str) -> Footprint:
    """The footprint of a stepper whose param groups are ``(parameter bytes, options)``
    (options by PyTorch's names; absent ones take PyTorch's defaults) on ``device``
    (a device type or name: ``"cuda:1"`` counts as ``"cuda"``)."""
    kind = device.split(":", 1)[0]
    state = gradients = workspace = 0
    for sizes, options in groups:
        state += state_bytes(sizes, bool(options.get("amsgrad")))
        gradients += sum(sizes)
        workspace = max(workspace, workspace_bytes(sizes, options, kind))
    pinned = 0 if kind == "cpu" else 2 * gradients
    return Footprint(kind, state, gradients, workspace, pinned)


def step_working_set(
    groups: Iterable[tuple[Sequence[tuple[int, bool]], Mapping[str, Any]]], device: str
) -> int:
    """Device bytes one ``optimizer.step()`` allocates: the state it creates and the peak
    workspace, for param groups of ``((bytes, fresh) of each stepped parameter, options)``
    (``fresh``: the parameter has no state yet, the step creates it)."""
    created = workspace = 0
    for stepped, options in groups:
        created += state_bytes((n for n, fresh in stepped if fresh), bool(options["amsgrad"]))
        workspace = max(workspace, workspace_bytes([n for n, _ in stepped], options, device))
    return created + workspace
