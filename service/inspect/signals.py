"""The signals of every step of a stepper, computed by an observer after the step.

:class:`SignalObserver` is a step observer (see :mod:`adamscope.service.engine.observers`)
that runs the signal kernels (:mod:`.kernels`) around each step and keeps the last step's
signals (:func:`signals_of`). It never raises into the step: a failure is logged and
leaves signals with an ``"error"``. Off (``ADAMSCOPE_SIGNALS=false``), steps are recorded
without signals, at no cost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .kernels import (
    SIGNALS,
    Entry,
    Layout,
    Pending,
    SignalCache,
    begin,
    empty_signals,
    finish,
)
from .kernels.sampling import build_layout, layout_key
from .optimizer import ObservedOptimizer, entries, known_steps

__all__ = ["SIGNALS", "SignalObserver", "attach_signals", "observer_of", "signals_of"]

log = logging.getLogger("adamscope.signals")


class SignalObserver:
    """Computes the signals of every step of the optimizer it observes (see the module
    docstring); ``latest`` is the last step's."""

    def __init__(self) -> None:
        self.cache = SignalCache()
        #: The last observed step's signals (replaced whole by every step, never changed in
        #: place: the same dict object is the same signals).
        self.latest: dict[str, Any] = empty_signals()
        self._layout: Layout | None = None
        self._pending: Pending | None = None
        self._params: list[torch.Tensor] = []  # the parameters self._layout was made for
        self._entries: list[Entry] = []  # the step's, from before_step to after_step
        #: Off (``ADAMSCOPE_SIGNALS=false``): steps are recorded without signals, at no cost.
        self.enabled = True

    def layout_for(self, found: Sequence[Entry]) -> Layout:
        params = [e.param for e in found]
        # The same parameter tensors (whose shape, dtype and device a stepper never
        # changes) need no key comparison.
        if (
            self._layout is not None
            and len(params) == len(self._params)
            and all(a is b for a, b in zip(params, self._params, strict=True))
        ):
            return self._layout
        key = layout_key(found)
        if self._layout is None or self._layout.key != key:
            self._layout = build_layout(found)
        self._params = params
        return self._layout

    def before_step(self, opt: ObservedOptimizer, grads: Mapping[str, torch.Tensor]) -> None:
        self._pending = None
        if not self.enabled:
            return
        try:
            found = self._entries = entries(opt, grads)
            if found:
                with torch.no_grad():
                    self._pending = begin(
                        found, self.cache, self.layout_for(found), steps=known_steps(opt, found)
                    )
        except Exception as e:  # noqa: BLE001 - signals must never break a step
            self._fail(opt, e)

    def after_step(self, opt: ObservedOptimizer, grads: Mapping[str, torch.Tensor]) -> None:
        step = opt.observed_step
        pending, self._pending = self._pending, None
        found, self._entries = self._entries, []
        try:
            if pending is None:
                if "error" not in self.latest:
                    self.latest = {**empty_signals(), "step": step, "time": time.time()}
                return
            with torch.no_grad():
                if not all(e.state for e in found):  # states the step created
                    found = entries(opt, grads)
                self.latest, self.cache = finish(pending, found, step, known_steps(opt, found))
        except Exception as e:  # noqa: BLE001 - signals must never break a step
            self._fail(opt, e, step)

    def _fail(self, opt: ObservedOptimizer, error: Exception, step: int | None = None) -> None:
        log.exception("signals of stepper %r failed", opt.name)
        self.cache = SignalCache()
        self.latest = {
            **empty_signals(),
            "step": step,
            "time": time.time(),
            "error": f"{type(error).__name__}: {error}",
        }


def observer_of(opt: ObservedOptimizer) -> SignalObserver | None:
    for o in opt.observers:
        if isinstance(o, SignalObserver):
            return o
    return None


def signals_of(opt: ObservedOptimizer) -> dict[str, Any]:
    """The last observed step's signals (empty ones without an observer or a step yet)."""
    found = observer_of(opt)
    return found.latest if found is not None else empty_signals()


def attach_signals(opt: ObservedOptimizer) -> SignalObserver:
    """Give ``opt`` its :class:`SignalObserver` (once: calling again is a no-op)."""
    found = observer_of(opt)
    if found is not None:
        return found
    observer = SignalObserver()
    opt.observers.insert(0, observer)  # first: later observers read its signals
    return observer
