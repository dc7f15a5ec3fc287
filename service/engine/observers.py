"""Step observers: what sees every step (signals, history), and when.

An observer's ``before_step`` runs with the gradients set on the parameters (state not yet
updated), its ``after_step`` once ``optimizer.step()`` returned; both under the stepper's
lock, with ``stepper.observed_step`` the number of the step they see. An observer must not
modify parameters, gradients or state, and one that raises is logged: it never breaks a
step.

With ``defer`` set, the ``after_step`` calls wait until :meth:`Observers.settle` (the
service settles a stepper once the step's reply has left) or the stepper's next mutation,
whichever comes first: the parameters, state and gradients they read are unchanged until
then. The engine knows nothing of what observers compute; the service installs them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .stepper import Stepper

__all__ = ["Observers", "StepObserver"]

log = logging.getLogger("adamscope")


class StepObserver(Protocol):
    """Sees every step (see the module docstring)."""

    def before_step(self, stepper: Stepper, grads: Mapping[str, torch.Tensor]) -> None: ...

    def after_step(self, stepper: Stepper, grads: Mapping[str, torch.Tensor]) -> None: ...


class Observers:
    """A stepper's observers and its step awaiting their ``after_step`` (call every method
    with the stepper's lock held, but :attr:`unsettled`)."""

    def __init__(self) -> None:
        self.observers: list[StepObserver] = []
        #: Run ``after_step`` later, in :meth:`settle` (see the module docstring).
        self.defer = False
        #: The step the observers are looking at (set before their hooks run).
        self.observed_step = 0
        #: (step, gradients, seconds of the step so far) awaiting the after-step observers.
        self._pending: tuple[int, Mapping[str, torch.Tensor], float] | None = None
        self._settling = False
        self._step_seconds = 0.0
        self._after_started = 0.0

    def before(self, stepper: Stepper, step: int, grads: Mapping[str, torch.Tensor]) -> None:
        self.observed_step = step
        self._notify(stepper, "before_step", grads)

    def after(
        self, stepper: Stepper, step: int, grads: Mapping[str, torch.Tensor], seconds: float
    ) -> None:
        """Step ``step`` left PyTorch after ``seconds``: its after-step observers run now,
        or at :meth:`settle` when deferred."""
        self._pending = (step, grads, seconds)
        if not self.defer:
            self.settle(stepper)

    @property
    def unsettled(self) -> bool:
        """Whether the last step's after-step observers are pending or running."""
        return self._pending is not None or self._settling

    def settle(self, stepper: Stepper) -> None:
        """Run the pending after-step observers, so that they see the step exactly as it
        left PyTorch (every mutation calls this first); a no-op without one."""
        if self._pending is None:
            return
        self._settling = True  # before the pending work leaves _pending: see unsettled
        pending, self._pending = self._pending, None
        step, grads, self._step_seconds = pending
        self.observed_step = step
        self._after_started = time.perf_counter()
        try:
            with torch.no_grad():
                self._notify(stepper, "after_step", grads)
        finally:
            self._settling = False

    def engine_seconds(self) -> float:
        """For an ``after_step`` observer: the engine time of the observed step so far (its
        before-step observers, PyTorch's update, and the after-step observers until now;
        not the time a deferred step waited for :meth:`settle`)."""
        return self._step_seconds + (time.perf_counter() - self._after_started)

    def _notify(self, stepper: Stepper, hook: str, grads: Mapping[str, torch.Tensor]) -> None:
        for observer in self.observers:
            try:
                getattr(observer, hook)(stepper, grads)
            except Exception:
                log.exception("step observer %r failed in %s", observer, hook)
