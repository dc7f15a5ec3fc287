"""A watched stepper's steps: taken by its training job, recorded here.

A stepper of kind ``watched`` mirrors an optimizer that lives in a user's training job
(``adamscope.watch``): it has the job's parameter layout and options but no state of its
own, refuses steps and edits (:class:`~.errors.StepperWatched`), and moves only when its
trainer reports a step: :func:`record_step` sets the step count and the groups' options as
the trainer had them, and runs the stepper's observers around it as a hosted step would
(so history, alerts and events see it; the signals come with the report).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidSpec
from .stepper import WATCHED, Stepper

__all__ = ["SETTABLE", "record_step"]

#: The group options a report carries and the mirror takes.
SETTABLE = ("lr", "betas", "eps", "weight_decay")


def record_step(
    stepper: Stepper, step: int, groups: Sequence[Mapping[str, Any]], seconds: float = 0.0
) -> bool:
    """Record the trainer's step ``step`` (the observers see it, unless it is the step
    the stepper is at already: a report resent, or the run's first). Returns whether it
    was a new step."""
    if stepper.hosting != WATCHED:
        raise InvalidSpec(f"stepper {stepper.name!r} is not watched")
    with stepper.lock:
        stepper.settle()
        if len(groups) == len(stepper.optimizer.param_groups):
            for g, new in zip(stepper.optimizer.param_groups, groups, strict=True):
                for k in SETTABLE:
                    if k in new:
                        g[k] = tuple(new[k]) if k == "betas" else float(new[k])
        if step == stepper.step_count:
            stepper._touch()
            return False
        observers = stepper._observers
        observers.before(stepper, step, {})
        stepper.step_count = step
        stepper._touch()
        observers.after(stepper, step, {}, seconds)
        return True
