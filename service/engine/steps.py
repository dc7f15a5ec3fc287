"""Each parameter's Adam ``step`` as a Python float, read without a device sync per step.

Under ``fused=True`` or ``capturable=True`` PyTorch keeps ``state["step"]`` on the GPU;
reading it (``.item()``) waits for every kernel queued before it. The summary, the
bias-correction report and the per-step signals all need those steps, so a
:class:`StepMirror` keeps a host copy of each, valid while the tensor is the one it read and
its version counter says nothing else wrote to it:

* a value is read from the tensor once (every unknown one in one transfer per device);
* after a step, a tensor whose version moved by exactly one was incremented once by
  PyTorch's update (``step_t += 1`` / ``_foreach_add_(steps, 1)``): the mirror adds one,
  rounded to the tensor's dtype as PyTorch's addition rounds it; a fresh state's step
  (created and incremented once) is 1;
* anything else (a state load, a reset, an unexpected write) fails the version check and
  the value is read again.

Steps on the CPU (PyTorch's default placement) are read directly, as cheap as a lookup;
``mirror_cpu=True`` mirrors them too (the tests exercise the mirror that way on a CPU).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from adamscope.client.numerics import rounded_scalar

__all__ = ["StepMirror"]


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor has no version counter
        return None


class StepMirror:
    """Host copies of step tensors (see the module docstring), keyed by parameter index.

    Not thread-safe: the stepper calls it under its lock.
    """

    def __init__(self, mirror_cpu: bool = False) -> None:
        self.mirror_cpu = mirror_cpu
        #: index -> (the step tensor, its version when the value was known, the value)
        self._known: dict[int, tuple[torch.Tensor, int, float]] = {}
        #: Values read from tensors (a test and a benchmark can see reads stop).
        self.reads = 0

    def _mirrored(self, step: torch.Tensor) -> bool:
        return self.mirror_cpu or step.device.type != "cpu"

    def _hit(self, index: int, step: torch.Tensor) -> float | None:
        entry = self._known.get(index)
        if entry is not None and entry[0] is step and entry[1] == _version(step):
            return entry[2]
        return None

    def values(self, states: Sequence[Mapping[str, Any]]) -> list[float | None]:
        """The step of each state (None without one), reading what is not known, every
        tensor on one device in one transfer."""
        out: list[float | None] = [None] * len(states)
        missing: dict[torch.device, list[int]] = {}
        for i, s in enumerate(states):
            step = s.get("step") if s else None
            if step is None:
                continue
            if not self._mirrored(step):
                out[i] = float(step)
                continue
            hit = self._hit(i, step)
            if hit is not None:
                out[i] = hit
            else:
                missing.setdefault(step.device, []).append(i)
        for device, idx in missing.items():
            tensors = [states[i]["step"] for i in idx]
            if device.type == "cpu":
                values = [float(t) for t in tensors]
            else:
                values = torch.stack([t.reshape(()).double() for t in tensors]).tolist()
            self.reads += len(idx)
            for i, t, v in zip(idx, tensors, values, strict=True):
                out[i] = v
                version = _version(t)
                if version is not None:
                    self._known[i] = (t, version, v)
        return out

    def ensure(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Know every mirrored step now (one transfer for those not known): before an
        update, so that :meth:`advance` can tell a fresh state from a loaded one."""
        if any(
            s
            and s.get("step") is not None
            and self._mirrored(s["step"])
            and self._hit(i, s["step"]) is None
            for i, s in enumerate(states)
        ):
            self.values(states)

    def advance(self, states: Sequence[Mapping[str, Any]]) -> None:
        """After PyTorch's update (with every step known before it, see :meth:`ensure`):
        a known step whose version moved by one was incremented; an unknown one is a fresh
        state's, created and incremented once, when its version is 1."""
        for i, s in enumerate(states):
            step = s.get("step") if s else None
            if step is None or not self._mirrored(step):
                continue
            now = _version(step)
            entry = self._known.get(i)
            if entry is None or entry[0] is not step:
                if now == 1:
                    self._known[i] = (step, now, 1.0)
                else:
                    self._known.pop(i, None)
            elif now is not None and now == entry[1] + 1:
                self._known[i] = (step, now, rounded_scalar(entry[2] + 1.0, step.dtype))
            elif now != entry[1]:
                del self._known[i]

    def moved(self, states: Sequence[Mapping[str, Any]], fresh: set[int]) -> bool | None:
        """Whether an update has begun (every implementation increments a parameter's step
        before it touches anything else of it): a known step changed since it was known, or
        a step created for a ``fresh`` state (one without state before) was incremented;
        None when that cannot be told (a step not mirrored, or not known)."""
        for i, s in enumerate(states):
            step = s.get("step") if s else None
            if step is None:
                continue
            if i in fresh:
                version = _version(step)
                if version is None:
                    return None
                if version:
                    return True
                continue
            if not self._mirrored(step):
                return None
            entry = self._known.get(i)
            if entry is None:
                return None
            if entry[0] is not step or entry[1] != _version(step):
                return True
        return False

    def forget(self) -> None:
        self._known.clear()
