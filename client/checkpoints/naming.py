"""Tie parameter names to an index-format optimizer state that saved none.

PyTorch numbers an optimizer's parameters in the order they were given to it. When that
order was the model's (``Adam(model.parameters())``, or groups that split it without
reordering), the k-th parameter is the k-th name of ``model.named_parameters()``. Nothing
in the file proves that, so every match is checked against what the file does prove: the
number of parameters, and the shape of each parameter's ``exp_avg``. Anything that does not
fit raises :class:`~.errors.NameMappingError` saying exactly what differed.

When the names come in an order that is not the model's (safetensors files are sorted by
name), position means nothing; the only safe match is then by shape, and only when every
shape occurs once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import NameMappingError

__all__ = ["Shape", "match_by_position", "match_by_unique_shape", "optimizer_shapes"]

Shape = tuple[int, ...]

_HINT = (
    "pass the names explicitly (names=[n for n, _ in model.named_parameters()] in the "
    "order the optimizer got them), or save the optimizer built from named_parameters() "
    "so its state_dict carries param_names"
)


def optimizer_shapes(state_dict: Mapping[str, Any]) -> list[Shape | None]:
    """Each parameter's shape in optimizer order, from its ``exp_avg``; None if unstepped."""
    shapes: list[Shape | None] = []
    for group in state_dict["param_groups"]:
        for pid in group["params"]:
            moment = state_dict["state"].get(pid, {}).get("exp_avg")
            shapes.append(tuple(moment.shape) if isinstance(moment, torch.Tensor) else None)
    return shapes


def _split(flat: list[str], sizes: Sequence[int]) -> list[list[str]]:
    out, start = [], 0
    for size in sizes:
        out.append(flat[start : start + size])
        start += size
    return out


def match_by_position(
    names: Sequence[str],
    name_shapes: Mapping[str, Shape],
    opt_shapes: Sequence[Shape | None],
    group_sizes: Sequence[int],
    source: str,
) -> tuple[list[list[str]], str]:
    """Give the k-th optimizer parameter the k-th name; check count and shapes.

    ``name_shapes`` may lack names whose shape is unknown (an explicit list without
    weights); those positions are then unchecked, and the returned note says how many
    positions were verified.
    """
    if len(names) != len(opt_shapes):
        raise NameMappingError(
            f"{source} gives {len(names)} parameter names but the optimizer has "
            f"{len(opt_shapes)} parameters, so they cannot be matched by position (buffers, "
            f"frozen parameters or tied weights differ between them); {_HINT}"
        )
    if len(set(names)) != len(names):
        twice = sorted(n for n, c in Counter(names).items() if c > 1)
        raise NameMappingError(f"{source} names {twice} more than once; {_HINT}")
    checked = 0
    for position, (name, expected) in enumerate(zip(names, opt_shapes, strict=True)):
        actual = name_shapes.get(name)
        if expected is None or actual is None:
            continue
        if actual != expected:
            raise NameMappingError(
                f"optimizer parameter {position} has state of shape {expected}, but the "
                f"{position}-th name in {source}, {name!r}, has shape {actual}: the optimizer "
                f"did not get the parameters in this order; {_HINT}"
            )
        checked += 1
    note = (
        f"names matched by position to {source}; shapes verified for {checked} of "
        f"{len(names)} parameters"
    )
    return _split(list(names), group_sizes), note


def match_by_unique_shape(
    name_shapes: Mapping[str, Shape],
    opt_shapes: Sequence[Shape | None],
    group_sizes: Sequence[int],
    source: str,
) -> tuple[list[list[str]], str]:
    """Match names to positions by shape, when every shape identifies one parameter."""
    if len(name_shapes) != len(opt_shapes):
        raise NameMappingError(
            f"{source} holds {len(name_shapes)} tensors but the optimizer has "
            f"{len(opt_shapes)} parameters, and its order is not the model's; {_HINT}"
        )
    if any(shape is None for shape in opt_shapes):
        raise NameMappingError(
            f"{source} does not keep the model's parameter order, and some parameters have "
            f"no optimizer state whose shape could identify them; {_HINT}"
        )
    by_shape: dict[Shape, list[str]] = {}
    for name, shape in name_shapes.items():
        by_shape.setdefault(shape, []).append(name)
    repeated = {s: n for s, n in by_shape.items() if len(n) > 1}
    if repeated:
        shape, clash = next(iter(repeated.items()))
        raise NameMappingError(
            f"{source} does not keep the model's parameter order, and {len(clash)} "
            f"parameters share shape {shape} ({', '.join(sorted(clash)[:4])}...), so which "
            f"optimizer entry is which cannot be told; {_HINT}"
        )
    flat = []
    for position, wanted in enumerate(opt_shapes):
        found = by_shape.get(wanted) if wanted is not None else None
        if not found:
            raise NameMappingError(
                f"optimizer parameter {position} has shape {wanted}, which no tensor in "
                f"{source} has; {_HINT}"
            )
        flat.append(found[0])
    note = f"names matched by shape to {source} (every shape occurs once)"
    return _split(flat, group_sizes), note
