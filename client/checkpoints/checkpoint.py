"""The neutral, in-memory form of an Adam/AdamW checkpoint, keyed by parameter name.

Every reader produces an :class:`OptimizerCheckpoint` and every writer consumes one, so each
format is converted once, to and from this form, instead of once per pair of formats.

It holds exactly what PyTorch's ``Adam``/``AdamW`` need to continue bit for bit: for each
parameter its state tensors (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
kept with their saved dtype and bits) and, when the checkpoint has them, its value; the
parameter groups with their options as saved (``lr``, ``betas``, ``eps``, ``weight_decay``,
``amsgrad``, ``maximize``, ``foreach``, ``fused``, ``capturable``, ``differentiable``,
``decoupled_weight_decay`` and any extra key such as a scheduler's ``initial_lr``); the
optimizer kind; the training step when known; and where it all came from.

The kind rule (:func:`infer_kind`), in order:

1. Groups that carry ``decoupled_weight_decay`` (every PyTorch since 2.6 saves it) decide:
   ``True`` is AdamW, ``False`` is Adam. Groups that disagree, or only some carrying it,
   are an error (one optimizer has one class).
2. Otherwise a kind named by the caller (or by the reader, e.g. from a framework's
   optimizer name) is taken.
3. Otherwise, when ``weight_decay`` is 0 in every group, Adam and AdamW take identical
   steps and the kind is recorded as ``"adam"``, saying so in ``provenance.inferred``.
4. Otherwise :class:`~.errors.OptimizerKindError`: the caller must say which it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .errors import CheckpointFormatError, OptimizerKindError

__all__ = [
    "STATE_KEYS",
    "CheckpointFormat",
    "OptimizerCheckpoint",
    "OptimizerKind",
    "ParamGroup",
    "ParamState",
    "Provenance",
    "infer_kind",
]

OptimizerKind = Literal["adam", "adamw"]
#: Where a checkpoint was read from: a file format, a live optimizer, or a stepper.
CheckpointFormat = Literal["dcp", "torch", "hf", "optimizer", "adamscope"]

#: The per-parameter state keys of ``torch.optim.Adam``/``AdamW``, in PyTorch's order.
STATE_KEYS: tuple[str, ...] = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass
class ParamState:
    """One parameter: its name, its value when the checkpoint has it, and its Adam state.

    ``state`` is empty for a parameter the optimizer never stepped (PyTorch saves no entry
    for it); otherwise it holds ``step`` and the moment tensors with their saved dtype.
    """

    name: str
    value: torch.Tensor | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The parameter's shape, from its value or else from its moments; None if neither."""
        if self.value is not None:
            return tuple(self.value.shape)
        if "exp_avg" in self.state:
            return tuple(self.state["exp_avg"].shape)
        return None


@dataclass
class ParamGroup:
    """A parameter group: the names of its parameters, in order, and its options as saved."""

    names: list[str]
    options: dict[str, Any]


@dataclass
class Provenance:
    """Where a checkpoint came from and what a reader had to infer rather than read.

    ``inferred`` holds one plain sentence per inference (how names were matched, how groups
    were rebuilt, which kind rule applied); ``details`` holds facts read on the side, such
    as a scheduler's last learning rates or the tied-weight aliases that were folded.
    """

    format: CheckpointFormat
    path: str
    inferred: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerCheckpoint:
    """An Adam/AdamW optimizer checkpoint keyed by parameter name.

    ``params`` maps each name to its :class:`ParamState`; ``groups`` say which names go
    together with which options, in the optimizer's order (the order PyTorch numbers
    parameters in, which a writer reproduces). ``global_step`` is the training step when the
    checkpoint says it (a trainer's state) or, failing that, the optimizer step shared by
    every parameter; None when neither is known.
    """

    kind: OptimizerKind
    params: dict[str, ParamState]
    groups: list[ParamGroup]
    global_step: int | None
    provenance: Provenance

    @property
    def names(self) -> list[str]:
        """Every parameter name, in optimizer order (group by group)."""
        return [name for group in self.groups for name in group.names]

    def __iter__(self) -> Iterator[ParamState]:
        return (self.params[name] for name in self.names)

    def optimizer_step(self) -> int | None:
        """The ``step`` shared by every stepped parameter, or None if none was or they differ."""
        steps = {int(p.state["step"].item()) for p in self.params.values() if "step" in p.state}
        return steps.pop() if len(steps) == 1 else None

    def validate(self) -> None:
        """Check that groups and params agree and that state shapes fit; raise if not."""
        seen: set[str] = set()
        for index, group in enumerate(self.groups):
            for name in group.names:
                if name in seen:
                    raise CheckpointFormatError(f"parameter {name!r} is in more than one group")
                if name not in self.params:
                    raise CheckpointFormatError(f"group {index} names {name!r}, which has no entry")
                seen.add(name)
        orphans = sorted(set(self.params) - seen)
        if orphans:
            raise CheckpointFormatError(f"parameters in no group: {orphans}")
        for param in self.params.values():
            _validate_param(param)


def _validate_param(param: ParamState) -> None:
    unknown = sorted(set(param.state) - set(STATE_KEYS))
    if unknown:
        raise CheckpointFormatError(
            f"{param.name!r} has state {unknown}, which Adam/AdamW do not keep: "
            "this is not an Adam checkpoint"
        )
    if param.state and "step" not in param.state:
        raise CheckpointFormatError(f"{param.name!r} has moments but no 'step'")
    if "step" in param.state and param.state["step"].numel() != 1:
        raise CheckpointFormatError(f"{param.name!r}: 'step' is not a scalar")
    shape = param.shape
    for key in STATE_KEYS[1:]:
        tensor = param.state.get(key)
        if tensor is not None and tuple(tensor.shape) != shape:
            raise CheckpointFormatError(
                f"{param.name!r}: {key} has shape {tuple(tensor.shape)}, the parameter {shape}"
            )


def infer_kind(
    groups: list[ParamGroup], hint: OptimizerKind | None = None
) -> tuple[OptimizerKind, str]:
    """Apply the kind rule of this module's docstring; return the kind and why."""
    flags = [g.options.get("decoupled_weight_decay") for g in groups]
    present = [f for f in flags if f is not None]
    if present:
        if len(present) != len(flags) or len(set(present)) != 1:
            raise OptimizerKindError(
                f"param groups disagree on decoupled_weight_decay ({flags}): one optimizer "
                "cannot be both Adam and AdamW"
            )
        kind: OptimizerKind = "adamw" if present[0] else "adam"
        if hint is not None and hint != kind:
            raise OptimizerKindError(
                f"kind {hint!r} was asked for, but the checkpoint saved "
                f"decoupled_weight_decay={present[0]}, which is {kind}"
            )
        return kind, f"kind {kind}: the groups saved decoupled_weight_decay={present[0]}"
    if hint is not None:
        return hint, f"kind {hint}: given by the caller (no decoupled_weight_decay saved)"
    if all(float(g.options.get("weight_decay", 0.0)) == 0.0 for g in groups):
        return "adam", (
            "kind adam: no decoupled_weight_decay saved and weight_decay is 0 in every group, "
            "where Adam and AdamW take identical steps"
        )
    raise OptimizerKindError(
        "the checkpoint does not say whether it is Adam or AdamW (no decoupled_weight_decay "
        "option, as before PyTorch 2.6) and weight_decay is not 0, where they differ: "
        "pass kind='adam' or kind='adamw'"
    )
