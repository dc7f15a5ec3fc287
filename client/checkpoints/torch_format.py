"""A ``torch.save``-d optimizer ``state_dict`` plus the model's weights.

Reading: the optimizer file is loaded only with ``torch.load(weights_only=True)``. Names
come, first found wins, from

1. ``param_names`` in every param group (PyTorch saves them when the optimizer was built
   from ``model.named_parameters()``);
2. ``names``, the model's parameter names in the order the optimizer got them, matched by
   position and checked by shape;
3. the weights file: a ``torch.save``-d model state dict keeps the model's order and is
   matched by position (tied weights folded, integer buffers skipped); a safetensors file
   is sorted by name, so it is matched by shape only when every shape is unique.

Anything ambiguous raises :class:`~.errors.NameMappingError` saying what did not fit.

Writing: ``optimizer.pt`` in PyTorch's index format with ``param_names`` in each group,
loadable with ``opt.load_state_dict(torch.load(path, weights_only=True))``, and
``model.safetensors`` holding the parameter values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import OptimizerCheckpoint, OptimizerKind, Provenance
from .errors import NameMappingError
from .naming import match_by_position, match_by_unique_shape, optimizer_shapes
from .state_dicts import from_state_dict, group_layout, saved_param_names, to_state_dict
from .unpickling import load_torch_file
from .weights import Weights, read_weights, write_safetensors

__all__ = ["OPTIMIZER_FILE", "WEIGHTS_FILE", "read_torch", "resolve_names", "write_torch"]

OPTIMIZER_FILE = "optimizer.pt"
WEIGHTS_FILE = "model.safetensors"


def read_torch(
    path: str | Path,
    *,
    weights: str | Path | None = None,
    names: Sequence[str] | None = None,
    kind: OptimizerKind | None = None,
) -> OptimizerCheckpoint:
    """Read an optimizer ``state_dict`` file and, optionally, a weights file beside it."""
    path = Path(path)
    state_dict = load_torch_file(path)
    group_layout(state_dict, str(path))
    provenance = Provenance("torch", str(path))
    loaded = read_weights(Path(weights)) if weights is not None else None
    if loaded is not None:
        provenance.details["weights"] = loaded.source
        _note_weights(loaded, provenance)
    per_group = resolve_names(state_dict, names, loaded, provenance)
    values = loaded.tensors if loaded is not None else None
    if values is not None:
        values = {n: values[n] for g in per_group for n in g if n in values}
        missing = [n for g in per_group for n in g if n not in values]
        if missing:
            provenance.inferred.append(f"no value in the weights for {missing}")
    return from_state_dict(state_dict, per_group, provenance, values=values, kind=kind)


def _note_weights(weights: Weights, provenance: Provenance) -> None:
    if weights.aliases:
        provenance.details["tied_weights"] = dict(weights.aliases)
        provenance.inferred.append(f"tied weights folded into their first name: {weights.aliases}")
    if weights.skipped:
        provenance.inferred.append(f"non-floating tensors skipped as buffers: {weights.skipped}")


def resolve_names(
    state_dict: Mapping[str, Any],
    names: Sequence[str] | None,
    weights: Weights | None,
    provenance: Provenance,
) -> list[list[str]]:
    """Names per group by the rule of this module's docstring; note how they were found."""
    sizes = [len(g["params"]) for g in state_dict["param_groups"]]
    saved = saved_param_names(state_dict)
    if saved is not None:
        if names is not None and list(names) != [n for g in saved for n in g]:
            raise NameMappingError(
                "names= disagrees with the param_names saved in the optimizer state"
            )
        provenance.inferred.append("names: param_names saved in the param groups")
        return saved
    shapes = optimizer_shapes(state_dict)
    known = weights.shapes() if weights is not None else {}
    if names is not None:
        per_group, note = match_by_position(list(names), known, shapes, sizes, "names=")
    elif weights is None:
        raise NameMappingError(
            "the optimizer state saved no param_names and neither names= nor a weights file "
            "was given, so its parameters cannot be named"
        )
    elif weights.ordered:
        per_group, note = match_by_position(
            list(weights.tensors), known, shapes, sizes, weights.source
        )
    else:
        per_group, note = match_by_unique_shape(known, shapes, sizes, weights.source)
    provenance.inferred.append(note)
    return per_group


def write_torch(checkpoint: OptimizerCheckpoint, directory: str | Path) -> dict[str, Path]:
    """Write ``optimizer.pt`` and, when values are known, ``model.safetensors``.

    Returns the written paths by role (``"optimizer"``, ``"weights"``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = {"optimizer": directory / OPTIMIZER_FILE}
    torch.save(to_state_dict(checkpoint), written["optimizer"])
    values = {p.name: p.value for p in checkpoint if p.value is not None}
    if values:
        written["weights"] = directory / WEIGHTS_FILE
        write_safetensors(written["weights"], values)
    return written
