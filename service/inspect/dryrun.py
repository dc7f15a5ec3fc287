"""A dry-run step: what a step with given gradients would do, without doing it.

The stepper's parameters and Adam state are cloned under its lock (with the gradients
validated exactly as :meth:`Stepper.step` validates them), and a throwaway optimizer of the
same class with every param group's options steps the clones; the stepper itself is never
touched. Same implementation, device, dtypes and values as the real step, so the result
is bit for bit what the real step would produce (the tests hold it to ``torch.equal``).
The signals of :mod:`.signals` come with it, computed as the real step's would be
(against the stepper's own previous effective LR where its signal cache is valid).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.errors import DeviceOutOfMemory
from ..engine.memory import is_out_of_memory
from ..engine.options import OPTIMIZERS, quiet_capturable
from .signals import Entry, begin, empty_signals, finish, observer_of
from ..engine.stepper import Stepper

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


def _clone_leaf(p: torch.Tensor) -> torch.Tensor:
    return p.detach().clone().requires_grad_(p.requires_grad)


def dry_run(stepper: Stepper, grads: Mapping[str, torch.Tensor],
            group_updates: Sequence[Mapping[str, Any]] | None = None) -> DryRun:
    """Step clones of the stepper's tensors with ``grads`` (and optional per-group option
    changes, as a step's metadata carries them); raises what :meth:`Stepper.step` would."""
    with stepper.lock:
        stepper.settle()  # the signals' cache must be the last step's
        for name, g in grads.items():
            stepper._check_tensor(name, g, "gradient")
        options = stepper._validated_group_updates(group_updates)
        if options is not None:
            stepper._check_state_complete(dict(enumerate(stepper._state_by_index())), options)
        else:
            options = [{k: v for k, v in g.items() if k != "params"}
                       for g in stepper.optimizer.param_groups]
        names = [n for n in stepper.names if n in grads]
        live = {n: stepper.params[stepper.index[n]] for n in names}
        clones = {n: _clone_leaf(p) for n, p in live.items()}
        before = {n: p.detach().clone() for n, p in live.items()}
        states = {n: {k: v.clone() if torch.is_tensor(v) else v
                      for k, v in stepper.optimizer.state.get(p, {}).items()}
                  for n, p in live.items()}
        observer = observer_of(stepper)
        cache, valid = None, None
        real = [Entry(n, live[n], grads[n], stepper.optimizer.state.get(live[n], {}),
                      stepper.optimizer.param_groups[stepper.group_of[n]])
                for n in names if live[n].numel()]
        if observer is not None and real:
            cache = observer.cache
            valid = cache.valid(observer.layout_for(real), [e.state for e in real])
        step = stepper.step_count + 1
        group_of = dict(stepper.group_of)
        skipped = [n for n in stepper.names if n not in grads]
    if not names:  # no gradient: nothing would step (as for a real step)
        return DryRun(step, [], skipped, {}, {}, {}, {}, {**empty_signals(), "step": step})
    groups = [{**opts, "params": [clones[n] for n in names if group_of[n] == gi]}
              for gi, opts in enumerate(options)]
    optimizer = quiet_capturable(OPTIMIZERS[stepper.kind]([g for g in groups if g["params"]]))
    on_device: dict[str, torch.Tensor] = {}
    for n in names:
        if states[n]:
            optimizer.state[clones[n]] = states[n]
        g = grads[n].to(clones[n].device)
        on_device[n] = clones[n].grad = g if g.is_contiguous() else g.contiguous()
    group_dicts = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    def entries() -> list[Entry]:
        return [Entry(n, clones[n], on_device[n], optimizer.state.get(clones[n], {}),
                      group_dicts[id(clones[n])]) for n in names if clones[n].numel()]

    signals = {**empty_signals(), "step": step}
    with torch.no_grad():
        pending = begin(entries(), cache, None, valid) if entries() else None
    try:
        optimizer.step()
    except Exception as e:  # the clones are the dry run's own: nothing else changed
        if not is_out_of_memory(e):
            raise
        raise DeviceOutOfMemory(f"out of device memory for a dry run of {stepper.name!r} "
                                f"({e})", partial=False) from None
    if pending is not None:
        with torch.no_grad():
            signals, _ = finish(pending, entries(), step)
    after = {n: clones[n].detach() for n in names}
    state = {n: dict(optimizer.state.get(clones[n], {})) for n in names}
    return DryRun(step, names, skipped, before, after, state, on_device, signals)
