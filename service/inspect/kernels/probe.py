"""The trainer's side of a watched run's signals: the service's own kernels, run where the
optimizer lives.

``adamscope.client`` never imports the service (the layer rules), while the signal kernels
import only torch and the client precisely so that they can run in a training job. This
module adapts them to :class:`adamscope.client.watching.Probe`; the client finds it through
the ``adamscope.watch_probes`` entry point (pyproject.toml), loaded on the first
``watch()``.

:func:`KernelProbe.before` runs the kernels' ``begin`` in the step's pre-hook (samples of
the gradients and parameters, on the optimizer's device); :func:`KernelProbe.after` returns
the kernels' ``finish``, which the watch runs on its worker thread while the training
thread goes on (it reads the parameters and state the step left, and the gradients it
stepped with, which the next step's pre-hook waits for before changing them). Each
parameter's state step is mirrored on the host so that a CUDA optimizer's step tensors are
read once, not at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .cache import SignalCache
from .sampling import Entry, Layout, build_layout, layout_key
from .step import Pending, begin, finish

__all__ = ["KernelProbe"]


class KernelProbe:
    """The signal kernels around one optimizer's steps (see the module docstring)."""

    def __init__(self) -> None:
        self.cache = SignalCache()
        self._layout: Layout | None = None
        self._pending: Pending | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._names: Mapping[torch.Tensor, str] = {}
        self._stepped: list[tuple[torch.Tensor, str, Mapping[str, Any]]] = []
        self._steps: list[float | None] = []
        self._grads: dict[str, torch.Tensor | None] = {}
        #: Each parameter's state step after the last step, where it lives on a device.
        self._mirror: dict[str, float] = {}
        self._side: torch.cuda.Stream | None = None

    def tick(self, opt: torch.optim.Optimizer, names: Mapping[torch.Tensor, str]) -> None:
        """After every step: the mirrored steps of the parameters that stepped move on."""
        if not self._mirror:
            return
        for g in opt.param_groups:
            for p in g["params"]:
                n = names[p]
                if p.grad is not None and n in self._mirror:
                    self._mirror[n] += 1

    def _entries(self) -> list[Entry]:
        assert self._opt is not None
        return [
            Entry(n, p, g, self._opt.state.get(p, {}), group)
            for p, n, group in self._stepped
            if (g := self._grads[n]) is not None
        ]

    def before(self, opt: torch.optim.Optimizer, names: Mapping[torch.Tensor, str]) -> None:
        self._opt, self._names, self._pending = opt, names, None
        self._stepped = [
            (p, names[p], g)
            for g in opt.param_groups
            for p in g["params"]
            if p.grad is not None and p.numel()
        ]
        self._grads = {n: p.grad for p, n, _ in self._stepped}
        found = self._entries()
        if not found:
            return
        key = layout_key(found)
        if self._layout is None or self._layout.key != key:
            self._layout = build_layout(found)
        self._steps = [self._step_of(e) for e in found]
        with torch.no_grad():
            self._pending = begin(found, self.cache, self._layout, steps=self._steps)

    def after(self, step: int) -> Callable[[], dict[str, Any]] | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        found = self._entries()  # the states the step created or updated
        steps = [None if t is None else t + 1 for t in self._steps]
        steps = [
            s if s is not None else self._step_of(e) for s, e in zip(steps, found, strict=True)
        ]
        for e, t in zip(found, steps, strict=True):
            if t is not None and e.state["step"].device.type != "cpu":
                self._mirror[e.name] = t  # the next ticks count the steps after it
        device = found[0].param.device
        side, ready = None, None
        if device.type == "cuda":  # the kernels follow the step on a stream of their own
            side = self._side = self._side or torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record()

        def run() -> dict[str, Any]:
            with torch.no_grad():
                if side is None or ready is None:
                    signals, self.cache = finish(pending, found, step, steps)
                    return signals
                with torch.cuda.stream(side):
                    side.wait_event(ready)
                    signals, self.cache = finish(pending, found, step, steps)
                return signals

        return run

    def _step_of(self, e: Entry) -> float | None:
        """A state's step, without reading a device (after its first read there)."""
        s = e.state.get("step") if e.state else None
        if s is None:
            return None
        if s.device.type == "cpu":
            return float(s)
        if e.name not in self._mirror:
            self._mirror[e.name] = float(s)  # once: a device read
        return self._mirror[e.name]
