"""A dry-run step: what a step with given gradients would do, without doing it.

The stepper lends copies of what the step would touch (:meth:`Stepper.trial`: validated
exactly as a step is, stepped by a throwaway optimizer of the same class and options); the
stepper itself is never touched, and the result is bit for bit what the real step would
produce (the tests hold it to ``torch.equal``). The signals come with it, computed as the
real step's would be (against the stepper's own previous effective LR where its signal
cache is valid).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..engine import Stepper
from ..engine.trial import Trial
from .kernels import Entry, begin, empty_signals, finish
from .optimizer import entries
from .schedule import group_order, with_groups
from .signals import observer_of

__all__ = ["DryRun", "dry_run"]


@dataclass
class DryRun:
    """The would-be step ``step``: per stepped parameter its value before and after, its
    state after, and the gradient; plus that step's signals."""

    step: int
    stepped: list[str]
    skipped: list[str]
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    state: dict[str, dict[str, torch.Tensor]]
    grads: dict[str, torch.Tensor]
    signals: dict[str, Any]


def _trial_entries(trial: Trial) -> list[Entry]:
    return [
        Entry(n, p, trial.grads[n], trial.state(n), trial.groups[n])
        for n, p in trial.params.items()
        if p.numel()
    ]


def dry_run(
    stepper: Stepper,
    grads: Mapping[str, torch.Tensor],
    group_updates: Sequence[Mapping[str, Any]] | None = None,
) -> DryRun:
    """Step copies of the stepper's tensors with ``grads`` (and optional per-group option
    changes, as a step's metadata carries them); raises what :meth:`Stepper.step` would."""
    with stepper.lock:
        trial = stepper.trial(grads, group_updates)  # settled: the signal cache is current
        observer = observer_of(stepper)
        order = observer.group_order(stepper) if observer is not None else group_order(stepper)
        real = entries(stepper, {n: grads[n] for n in trial.names})
        cache = observer.cache if observer is not None and real else None
        valid = (
            cache.valid(observer.layout_for(real), [e.state for e in real])
            if observer is not None and cache is not None
            else None
        )
        local = cache.local_for(real) if cache is not None else None
    signals = {**empty_signals(), "step": trial.step}
    if not trial.names:  # no gradient: nothing would step (as for a real step)
        return DryRun(trial.step, [], trial.skipped, {}, {}, {}, {}, signals)
    with torch.no_grad():
        found = _trial_entries(trial)
        pending = begin(found, cache, None, valid, local=local) if found else None
    trial.run()
    if pending is not None:
        with torch.no_grad():
            after = _trial_entries(trial)
            signals, _ = finish(pending, after, trial.step)
            signals = with_groups(signals, order, after)
    return DryRun(
        trial.step,
        trial.names,
        trial.skipped,
        trial.before,
        trial.after(),
        {n: dict(trial.state(n)) for n in trial.names},
        trial.grads,
        signals,
    )
