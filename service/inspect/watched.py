"""A watched run's signals: computed by its trainer, recorded here as if observed.

A watched stepper's trainer runs the signal kernels itself (where the state lives) and
sends their result with each report. :class:`ReportedSignals` takes the place of the
stepper's :class:`~.signals.SignalObserver`: it computes nothing, and hands the history
and alerts the reported signals of the step being recorded, with the first NaN/Inf kept
as a hosted stepper's observer keeps it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch

from .kernels import SIGNALS, empty_signals
from .optimizer import ObservedOptimizer
from .signals import SignalObserver, observer_of

__all__ = ["ReportedSignals", "clean_signals", "use_reported_signals"]


class ReportedSignals(SignalObserver):
    """The signals of a watched run's step, as its trainer reported them."""

    def __init__(self) -> None:
        super().__init__()
        #: The signals of the next step to record (set by the report, under the lock).
        self.incoming: dict[str, Any] | None = None

    def before_step(self, opt: ObservedOptimizer, grads: Mapping[str, torch.Tensor]) -> None:
        pass

    def after_step(self, opt: ObservedOptimizer, grads: Mapping[str, torch.Tensor]) -> None:
        step = opt.observed_step
        found, self.incoming = self.incoming, None
        if found is None or found.get("step") != step:
            self.latest = {**empty_signals(), "step": step, "time": time.time()}
            return
        self.latest = self._with_first_fault(found, step)


def clean_signals(raw: Any, step: int) -> dict[str, Any] | None:
    """The reported signals checked for shape (floats by name), or None."""
    if not isinstance(raw, dict) or raw.get("step") != step:
        return None
    tensors = raw.get("tensors")
    aggregate = raw.get("aggregate")
    if not isinstance(tensors, dict) or not isinstance(aggregate, dict):
        return None
    out = dict(raw)
    out["aggregate"] = {s: _float(aggregate.get(s)) for s in SIGNALS}
    out["tensors"] = {
        str(n): {str(k): _float(v) for k, v in t.items()}
        for n, t in tensors.items()
        if isinstance(t, dict)
    }
    out["time"] = _float(raw.get("time")) if raw.get("time") is not None else time.time()
    return out


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def use_reported_signals(opt: ObservedOptimizer) -> ReportedSignals:
    """Put a :class:`ReportedSignals` in place of ``opt``'s signal observer (once)."""
    found = observer_of(opt)
    if isinstance(found, ReportedSignals):
        return found
    reported = ReportedSignals()
    if found is not None:
        opt.observers[opt.observers.index(found)] = reported
    else:
        opt.observers.insert(0, reported)
    return reported
