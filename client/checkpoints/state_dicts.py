"""PyTorch's optimizer ``state_dict`` (index format) to and from :class:`OptimizerCheckpoint`.

``Optimizer.state_dict()`` numbers parameters 0, 1, 2... across its groups in order and keys
``state`` by those numbers; names appear only as ``param_names`` in each group when the
optimizer was built from ``named_parameters()``. Converting needs the names from somewhere
else, so :func:`from_state_dict` takes them per group, already resolved (see ``naming``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch

from .checkpoint import (
    STATE_KEYS,
    OptimizerCheckpoint,
    OptimizerKind,
    ParamGroup,
    ParamState,
    Provenance,
    infer_kind,
)
from .errors import CheckpointFormatError, NameMappingError

__all__ = [
    "from_optimizer",
    "from_state_dict",
    "group_layout",
    "saved_param_names",
    "to_state_dict",
]

_NOT_OPTIONS = ("params", "param_names")


def group_layout(state_dict: Any, what: str) -> list[list[Any]]:
    """Check the index-format shape of ``state_dict``; return each group's parameter ids."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise CheckpointFormatError(
            f"{what}: not an optimizer state_dict (expected a dict with 'state' and 'param_groups')"
        )
    groups = state_dict["param_groups"]
    if not isinstance(state_dict["state"], Mapping) or not isinstance(groups, list):
        raise CheckpointFormatError(f"{what}: 'state' must be a dict and 'param_groups' a list")
    layout = []
    for index, group in enumerate(groups):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), list):
            raise CheckpointFormatError(f"{what}: param group {index} has no 'params' list")
        layout.append(list(group["params"]))
    return layout


def saved_param_names(state_dict: Mapping[str, Any]) -> list[list[str]] | None:
    """The ``param_names`` of every group when all groups carry them, else None."""
    groups = state_dict["param_groups"]
    if not groups or not all("param_names" in g for g in groups):
        return None
    names = [list(g["param_names"]) for g in groups]
    for group, group_names in zip(groups, names, strict=True):
        if len(group_names) != len(group["params"]):
            raise NameMappingError(
                f"a group saved {len(group_names)} param_names for {len(group['params'])} params"
            )
    return names


def from_state_dict(
    state_dict: Mapping[str, Any],
    names: Sequence[Sequence[str]],
    provenance: Provenance,
    *,
    values: Mapping[str, torch.Tensor] | None = None,
    kind: OptimizerKind | None = None,
    global_step: int | None = None,
) -> OptimizerCheckpoint:
    """Build the neutral form from an index-format state dict and per-group names.

    ``values`` maps names to parameter values where known. ``global_step`` defaults to the
    optimizer step shared by every parameter, and provenance says so when it is used.
    """
    layout = group_layout(state_dict, provenance.path)
    if [len(g) for g in layout] != [len(g) for g in names]:
        raise NameMappingError(
            f"names per group {[len(g) for g in names]} do not match the optimizer's "
            f"params per group {[len(g) for g in layout]}"
        )
    saved_state = cast(Mapping[Any, Mapping[str, Any]], state_dict["state"])
    params: dict[str, ParamState] = {}
    groups: list[ParamGroup] = []
    for group, ids, group_names in zip(state_dict["param_groups"], layout, names, strict=True):
        for pid, name in zip(ids, group_names, strict=True):
            if name in params:
                raise NameMappingError(f"parameter name {name!r} is given twice")
            state = _read_state(saved_state.get(pid, {}), name, provenance)
            value = None if values is None else values.get(name)
            params[name] = ParamState(name=name, value=value, state=state)
        options = {k: v for k, v in group.items() if k not in _NOT_OPTIONS}
        groups.append(ParamGroup(names=list(group_names), options=options))
    resolved_kind, why = infer_kind(groups, kind)
    provenance.inferred.append(why)
    checkpoint = OptimizerCheckpoint(resolved_kind, params, groups, global_step, provenance)
    if global_step is None:
        checkpoint.global_step = checkpoint.optimizer_step()
        if checkpoint.global_step is not None:
            provenance.inferred.append("global_step: the optimizer step shared by every parameter")
    checkpoint.validate()
    return checkpoint


def _read_state(
    saved: Mapping[str, Any], name: str, provenance: Provenance
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, value in saved.items():
        if key == "step" and not isinstance(value, torch.Tensor):
            # PyTorch before 1.12 kept step as a number; Adam's load_state_dict turns it into
            # this same float32 scalar, so storing it this way changes no later step.
            value = torch.tensor(float(value), dtype=torch.float32)
            note = "step saved as a number; stored as a float32 tensor as Adam would load it"
            if note not in provenance.inferred:
                provenance.inferred.append(note)
        if not isinstance(value, torch.Tensor):
            raise CheckpointFormatError(f"{name!r}: state {key!r} is {type(value).__name__}")
        state[key] = value
    return state


def to_state_dict(checkpoint: OptimizerCheckpoint, *, with_names: bool = True) -> dict[str, Any]:
    """The PyTorch index-format state dict, ready for ``Optimizer.load_state_dict``.

    Parameters are numbered in group order, as ``Optimizer.state_dict()`` does, so the
    target optimizer must list the same parameters in the same groups and order; with
    ``with_names`` each group carries ``param_names`` to make that checkable. The tensors
    are shared with ``checkpoint``, not copied.
    """
    checkpoint.validate()
    state: dict[int, dict[str, torch.Tensor]] = {}
    groups: list[dict[str, Any]] = []
    pid = 0
    for group in checkpoint.groups:
        ids = []
        for name in group.names:
            saved = checkpoint.params[name].state
            if saved:
                state[pid] = {k: saved[k] for k in STATE_KEYS if k in saved}
            ids.append(pid)
            pid += 1
        entry: dict[str, Any] = dict(group.options)
        entry["params"] = ids
        if with_names:
            entry["param_names"] = list(group.names)
        groups.append(entry)
    return {"state": state, "param_groups": groups}


def from_optimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
    *,
    path: str = "<optimizer>",
    kind: OptimizerKind | None = None,
) -> OptimizerCheckpoint:
    """Snapshot a live ``Adam``/``AdamW`` (tensors copied, values included).

    Names come from the optimizer's own ``param_names`` when it was built from
    ``named_parameters()``, else from ``named_parameters`` (e.g. ``model.named_parameters()``),
    matched by tensor identity, so the optimizer's order and groups do not matter.
    """
    saved: dict[str, Any] = optimizer.state_dict()
    tensors = [p for g in optimizer.param_groups for p in g["params"]]
    per_group = saved_param_names(saved)
    if per_group is None:
        if named_parameters is None:
            raise NameMappingError("the optimizer has no param_names: pass named_parameters=")
        by_id = {id(p): n for n, p in named_parameters}
        unnamed = sum(id(p) not in by_id for p in tensors)
        if unnamed:
            raise NameMappingError(f"{unnamed} optimizer parameters are not in named_parameters")
        flat = [by_id[id(p)] for p in tensors]
        sizes = [len(g["params"]) for g in saved["param_groups"]]
        per_group = [flat[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]
    flat = [n for g in per_group for n in g]
    values = {n: p.detach().clone() for n, p in zip(flat, tensors, strict=True)}
    copied = {
        "state": {k: {s: t.clone() for s, t in v.items()} for k, v in saved["state"].items()},
        "param_groups": saved["param_groups"],
    }
    return from_state_dict(
        copied, per_group, Provenance("optimizer", path), values=values, kind=kind
    )
