"""A stepper's state in PyTorch's ``state_dict`` format (index-keyed, param groups with
their options), and back: what ``RemoteAdam.state_dict()`` and the clients' loads use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .constants import OPTION_NAMES
from .protocol import StepperSummary

__all__ = ["from_state_dict", "to_state_dict"]


def to_state_dict(
    summary: StepperSummary, state: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, Any]:
    """Name-keyed remote state -> a PyTorch ``Optimizer.state_dict()`` (index-keyed).

    Indices follow PyTorch's rule: parameters numbered in param-group order.
    """
    order = [n for g in summary.groups for n in g.params]
    index = {n: i for i, n in enumerate(order)}
    packed_state = {
        index[n]: {
            k: state[n][k]
            for k in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
            if k in state[n]
        }
        for n in order
        if state.get(n)
    }
    groups = []
    for g in summary.groups:
        opts = g.model_dump(include=set(OPTION_NAMES))
        opts["betas"] = tuple(opts["betas"])
        groups.append({**opts, "params": [index[n] for n in g.params]})
    return {"state": packed_state, "param_groups": groups}


def from_state_dict(
    summary: StepperSummary, state_dict: Mapping[str, Any]
) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """A PyTorch ``state_dict`` -> (name-keyed state, per-group options) for this stepper.

    Saved parameter ids are matched to the stepper's parameters positionally, group by group,
    exactly as ``Optimizer.load_state_dict`` does.
    """
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(summary.groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    id_to_name: dict[Any, str] = {}
    options = []
    for saved, g in zip(saved_groups, summary.groups, strict=True):
        if len(saved["params"]) != len(g.params):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of "
                "optimizer's group"
            )
        id_to_name.update(zip(saved["params"], g.params, strict=True))
        options.append({k: saved[k] for k in OPTION_NAMES if k in saved})
    state: dict[str, dict[str, torch.Tensor]] = {}
    for pid, entries in state_dict.get("state", {}).items():
        if pid not in id_to_name:
            continue  # PyTorch ignores state for ids no group names
        state[id_to_name[pid]] = {
            k: (v if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float32))
            for k, v in entries.items()
        }
    return state, options
