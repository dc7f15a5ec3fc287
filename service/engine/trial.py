"""A trial step: what a step with given gradients would do, on copies.

:meth:`Stepper.trial` clones, under the stepper's lock, the parameters and Adam state a
step with these gradients would touch (validating the gradients and option changes exactly
as :meth:`Stepper.step` does), and puts the clones under a throwaway optimizer of the same
class with every param group's options. Running it steps the clones; the stepper itself is
never touched. Same implementation, device, dtypes and values as the real step, so the
result is bit for bit what the real step would produce.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .buffers import out_of_memory
from .memory import is_out_of_memory
from .options import OPTIMIZERS, quiet_capturable

__all__ = ["Trial"]


def _clone_leaf(p: torch.Tensor) -> torch.Tensor:
    return p.detach().clone().requires_grad_(p.requires_grad)


@dataclass
class Trial:
    """The would-be step ``step`` of stepper ``stepper``: ``names`` would step, ``skipped``
    would not. ``before`` holds their values now; ``params`` the clones that :meth:`run`
    steps with ``grads`` (each on its parameter's device)."""

    stepper: str
    step: int
    names: list[str]
    skipped: list[str]
    before: dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Each clone's param group in the throwaway optimizer.
    groups: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None

    @staticmethod
    def build(
        stepper: str,
        kind: str,
        step: int,
        skipped: list[str],
        live: Mapping[str, torch.Tensor],
        states: Mapping[str, Mapping[str, Any]],
        group_of: Mapping[str, int],
        options: list[dict[str, Any]],
        grads: Mapping[str, torch.Tensor],
    ) -> Trial:
        """Clones of ``live`` (the parameters that would step) and their ``states``, under
        an optimizer of ``kind`` with ``options`` per group (call under the lock)."""
        names = list(live)
        trial = Trial(stepper, step, names, skipped)
        if not names:
            return trial
        trial.params = {n: _clone_leaf(p) for n, p in live.items()}
        trial.before = {n: p.detach().clone() for n, p in live.items()}
        copies = {
            n: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for n, s in states.items()
        }
        groups = [
            {**opts, "params": [trial.params[n] for n in names if group_of[n] == gi]}
            for gi, opts in enumerate(options)
        ]
        trial.optimizer = quiet_capturable(OPTIMIZERS[kind]([g for g in groups if g["params"]]))
        for n in names:
            clone = trial.params[n]
            if copies[n]:
                trial.optimizer.state[clone] = copies[n]
            g = grads[n].to(clone.device)
            trial.grads[n] = clone.grad = g if g.is_contiguous() else g.contiguous()
        by_id = {id(p): g for g in trial.optimizer.param_groups for p in g["params"]}
        trial.groups = {n: by_id[id(trial.params[n])] for n in names}
        return trial

    def state(self, name: str) -> Mapping[str, Any]:
        """The clone's Adam state as the throwaway optimizer holds it (empty before a
        first step)."""
        assert self.optimizer is not None
        found: Mapping[str, Any] = self.optimizer.state.get(self.params[name], {})
        return found

    def run(self) -> None:
        """Step the clones (a device out of memory is a 507 that changed nothing)."""
        if self.optimizer is None:
            return
        try:
            self.optimizer.step()
        except Exception as e:  # the clones are the trial's own: nothing else changed
            if not is_out_of_memory(e):
                raise
            raise out_of_memory(e, f"for a dry run of {self.stepper!r}", partial=False) from None

    def after(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.params.items()}
