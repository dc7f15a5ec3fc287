"""Accumulate mode: data-parallel workers' gradients collected into one step.

A step is applied once ``contributors`` workers (ids ``0 .. contributors-1``) have
contributed, with each parameter's gradient the mean of the contributions that carry one,
summed in worker order: ``(((g_0 + g_1) + g_2) + ...) / n``. The pending contributions live
in memory only (a restart drops them; the workers send again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import InvalidSpec, StepConflict

__all__ = ["MAX_CONTRIBUTORS", "Round"]

MAX_CONTRIBUTORS = 1024


@dataclass
class _Contribution:
    key: str | None
    grads: dict[str, torch.Tensor]


@dataclass
class Round:
    """The contributions collected for the next step of stepper ``stepper``."""

    stepper: str
    contributors: int | None = None
    workers: dict[int, _Contribution] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.workers)

    def pending(self) -> list[int]:
        return sorted(self.workers)

    def check(self, worker: int, contributors: int, step_count: int) -> None:
        """Raise unless ``worker`` may contribute to a round of ``contributors``."""
        if not 1 <= contributors <= MAX_CONTRIBUTORS:
            raise InvalidSpec(f"contributors must be 1..{MAX_CONTRIBUTORS}, got {contributors}")
        if not 0 <= worker < contributors:
            raise InvalidSpec(f"worker must be in 0..{contributors - 1}, got {worker}")
        if self.workers and self.contributors != contributors:
            raise StepConflict(
                f"the pending step of {self.stepper!r} collects {self.contributors} "
                f"contributions, not {contributors}",
                current_step=step_count,
            )

    def repeated(self, worker: int, key: str | None, step_count: int) -> bool:
        """Whether ``worker``'s contribution with ``key`` is already here (a retry); raise
        when the worker already sent another one."""
        found = self.workers.get(worker)
        if found is None:
            return False
        if key is not None and found.key == key:
            return True
        raise StepConflict(
            f"worker {worker} already contributed to step {step_count + 1} of {self.stepper!r}",
            current_step=step_count,
        )

    def add(
        self, worker: int, contributors: int, key: str | None, grads: Mapping[str, torch.Tensor]
    ) -> bool:
        """Keep a copy of ``grads``; True once every contributor has sent its part."""
        self.contributors = contributors
        self.workers[worker] = _Contribution(key, {n: g.detach().clone() for n, g in grads.items()})
        return len(self.workers) >= contributors

    def take(self, order: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The mean gradients (in parameter ``order``) and the contributions' keys; the
        round starts over."""
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for w in sorted(self.workers):
            for n, g in self.workers[w].grads.items():
                if n in sums:
                    sums[n].add_(g)
                else:
                    sums[n] = g.clone()
                counts[n] = counts.get(n, 0) + 1
        keys = [c.key for c in self.workers.values() if c.key is not None]
        self.contributors, self.workers = None, {}
        return {n: sums[n].div_(counts[n]) for n in order if n in sums}, keys
