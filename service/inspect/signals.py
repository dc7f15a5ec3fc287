"""The signals of every step of a stepper, computed by an observer after the step.

:class:`SignalObserver` is a step observer (see :mod:`adamscope.service.engine.observers`)
that runs the signal kernels (:mod:`.kernels`) around each step and keeps the last step's
signals (:func:`signals_of`). It never raises into the step: a failure is logged and
leaves signals with an ``"error"``. Off (``ADAMSCOPE_SIGNALS=false``), steps are recorded
without signals, at no cost.

Besides the kernels' signals, every step's signals carry ``groups`` (each stepped param
group's lr, betas, bias corrections and step size, also as aggregate signals
``group<i>.<field>``: :mod:`.schedule`) and, from the step at which a NaN/Inf first entered
a gradient, parameter or moment on, ``first_nonfinite``: ``{step, tensor, role, nan, inf}``
(the role it was first seen in, in the order grad, param, exp_avg, exp_avg_sq,
max_exp_avg_sq, with that role's exact counts), also as the aggregate signal
``first_nonfinite_step``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .kernels import (
    FAULT_ROLES,
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
from .schedule import group_order, with_groups

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
        #: ``{step, tensor, role, nan, inf}``: where and when a NaN/Inf first entered.
        self.first_nonfinite: dict[str, Any] | None = None
        self._groups: tuple[tuple[str, ...], dict[str, int]] | None = None

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

    def group_order(self, opt: ObservedOptimizer) -> dict[str, int]:
        """Each parameter's group number (kept while the optimizer's names are the same)."""
        names = tuple(opt.names)
        if self._groups is None or self._groups[0] != names:
            self._groups = (names, group_order(opt))
        return self._groups[1]

    def before_step(self, opt: ObservedOptimizer, grads: Mapping[str, torch.Tensor]) -> None:
        self._pending = None
        if not self.enabled:
            return
        try:
            found = self._entries = entries(opt, grads)
            if found:
                with torch.no_grad(), one_thread(found[0].param.device):
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
            with torch.no_grad(), one_thread(found[0].param.device if found else None):
                if not all(e.state for e in found):  # states the step created
                    found = entries(opt, grads)
                steps = known_steps(opt, found)
                latest, self.cache = finish(pending, found, step, steps)
            latest = with_groups(latest, self.group_order(opt), found, steps)
            self.latest = self._with_first_fault(latest, step)
        except Exception as e:  # noqa: BLE001 - signals must never break a step
            self._fail(opt, e, step)

    def _with_first_fault(self, latest: dict[str, Any], step: int) -> dict[str, Any]:
        """``latest`` with the first step at which a NaN/Inf entered a tensor (kept until
        the stepper goes back before it), and ``first_nonfinite_step`` in its aggregate."""
        first = self.first_nonfinite
        if first is not None and step <= first["step"]:
            first = None  # back in time before it (a snapshot restored)
        faults = latest.get("faults")
        if first is None and faults:
            name = next(iter(faults))  # in the optimizer's order
            role = next(r for r in FAULT_ROLES if r in faults[name])
            first = {"step": step, "tensor": name, "role": role, **faults[name][role]}
        self.first_nonfinite = first
        if first is not None:
            latest["first_nonfinite"] = first
            latest["aggregate"]["first_nonfinite_step"] = float(first["step"])
        return latest

    def _fail(self, opt: ObservedOptimizer, error: Exception, step: int | None = None) -> None:
        log.exception("signals of stepper %r failed", opt.name)
        self.cache = SignalCache()
        self.latest = {
            **empty_signals(),
            "step": step,
            "time": time.time(),
            "error": f"{type(error).__name__}: {error}",
        }


@contextlib.contextmanager
def one_thread(device: torch.device | None) -> Iterator[None]:
    """PyTorch on one thread while the signals run on a CPU stepper: their few passes are
    bound by memory bandwidth, which a second thread hardly adds to, and each of their many
    small operations would otherwise open a parallel region, which costs a wake-up of every
    pool thread (milliseconds each on a machine whose cores are busy)."""
    n = torch.get_num_threads()
    if device is None or device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


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
