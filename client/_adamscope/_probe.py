"""The trainer's side of a watched run's signals: the service's own kernels, run where the
optimizer lives.

``adamscope.client`` never imports the service (the layer rules), while the signal kernels
(``adamscope.service.inspect.kernels``) import only torch and the client precisely so that
they can run in a training job. This module, in the root package that composes both, adapts
the kernels to :class:`adamscope.client.watching.Probe` and ``adamscope`` installs them
(:func:`adamscope.client.watching.set_probe_factory`): imported on the first ``watch()``.

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

from adamscope.service.inspect.kernels import Entry, Layout, Pending, SignalCache, begin, finish
from adamscope.service.inspect.kernels.sampling import build_layout, layout_key

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
        self._steps = [_step_of(e.state) for e in found]
        with torch.no_grad():
            self._pending = begin(found, self.cache, self._layout, steps=self._steps)

    def after(self, step: int) -> Callable[[], dict[str, Any]] | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        found = self._entries()  # the states the step created or updated
        steps = [None if t is None else t + 1 for t in self._steps]
        steps = [
            s if s is not None else _step_of(e.state) for s, e in zip(steps, found, strict=False)
        ]

        def run() -> dict[str, Any]:
            with torch.no_grad():
                signals, self.cache = finish(pending, found, step, steps)
            return signals

        return run


def _step_of(state: Mapping[str, Any]) -> float | None:
    s = state.get("step") if state else None
    if s is None:
        return None
    return float(s)
