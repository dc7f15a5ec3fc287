"""Hyperparameter models -> the plain option dicts the engine takes."""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from adamscope.client.protocol import Hyperparameters

from ..engine.errors import InvalidHyperparameter

__all__ = ["options_from_model", "group_updates_from_json"]

_NULLABLE = frozenset({"foreach", "fused"})


def options_from_model(model: Hyperparameters, exclude: set[str] | None = None) -> dict[str, Any]:
    """The options a client set explicitly; ``null`` only where PyTorch allows None."""
    out = model.model_dump(exclude_unset=True, exclude=exclude)
    for k, v in out.items():
        if v is None and k not in _NULLABLE:
            raise InvalidHyperparameter(f"{k} may not be null")
        # PyTorch accepts lr/eps/weight_decay = inf (NaN it rejects itself), but JSON cannot
        # carry inf back: summaries would show null where the contract promises a number.
        if isinstance(v, float) and math.isinf(v):
            raise InvalidHyperparameter(f"{k} must be finite, got {v}")
    return out


def group_updates_from_json(value: Any) -> list[dict[str, Any]] | None:
    """Per-group option updates carried in body metadata (a JSON list of objects)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidHyperparameter("param_groups must be a list with one object per group")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidHyperparameter(f"param_groups[{i}] must be an object")
        # state_dict()["param_groups"] carries index lists and names; they are positional.
        item = {k: v for k, v in item.items() if k not in ("params", "param_names")}
        try:
            model = Hyperparameters.model_validate(item)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise InvalidHyperparameter(f"param_groups[{i}].{loc}: {first['msg']}") from None
        out.append(options_from_model(model))
    return out
