"""The state of one optimizer, as inspection reads it.

Inspection (signals, statistics, views, history, alerts) reads an optimizer through this
small protocol, not through the engine: a hosted :class:`~adamscope.service.engine.Stepper`
implements it today, and a watched training job's mirror can implement it tomorrow.
Everything is read under ``lock``, and nothing here changes a tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from .kernels import Entry

__all__ = ["ObservedOptimizer", "OptimizerState", "entries", "known_steps"]


class OptimizerState(Protocol):
    """One optimizer: named parameters, each with its Adam state and param group."""

    @property
    def name(self) -> str: ...

    @property
    def names(self) -> list[str]:
        """Parameter names, in the optimizer's order."""
        ...

    @property
    def step_count(self) -> int: ...

    @property
    def version(self) -> int:
        """Moves with every change: anything derived from (name, version) can be cached."""
        ...

    @property
    def lock(self) -> AbstractContextManager[Any]: ...

    @property
    def journal(self) -> Mapping[str, Any]:
        """JSON bookkeeping kept with the optimizer's checkpoints (alert rules live here)."""
        ...

    def select(self, names: Sequence[str] | None) -> list[str]:
        """``names`` checked (UnknownParameter) and without repeats; all when None."""
        ...

    def param(self, name: str) -> torch.Tensor: ...

    def param_state(self, name: str) -> Mapping[str, Any]:
        """Adam's state of the parameter (``step``, ``exp_avg``, ...; {} before a step)."""
        ...

    def param_group(self, name: str) -> Mapping[str, Any]:
        """The parameter's group options, by PyTorch's names."""
        ...

    def param_steps(self) -> list[float | None]:
        """Each parameter's state step (None without state), in parameter order."""
        ...

    def set_journal(self, key: str, value: Any) -> None:
        """Set (None: remove) a journal entry, as a change of the optimizer."""
        ...

    def settle(self) -> None:
        """Return once the observers have seen the last step."""
        ...


class ObservedOptimizer(OptimizerState, Protocol):
    """What an observer also sees while it observes a step."""

    @property
    def observed_step(self) -> int:
        """The step the observers are looking at."""
        ...

    @property
    def observers(self) -> list[Any]: ...

    def engine_seconds(self) -> float:
        """The observed step's engine time so far."""
        ...


def entries(opt: OptimizerState, grads: Mapping[str, torch.Tensor]) -> list[Entry]:
    """The tensors that step with ``grads`` (non-empty ones), as the signal kernels take
    them: parameter, gradient, Adam state and group, in the optimizer's order."""
    out = []
    for n in opt.names:
        g = grads.get(n)
        if g is None:
            continue
        p = opt.param(n)
        if p.numel():
            out.append(Entry(n, p, g, opt.param_state(n), opt.param_group(n)))
    return out


def known_steps(opt: OptimizerState, found: Sequence[Entry]) -> list[float | None]:
    """The state steps of ``found`` as the optimizer knows them (no device read)."""
    steps = dict(zip(opt.names, opt.param_steps(), strict=True))
    return [steps[e.name] for e in found]
