"""What a stepper says about itself: its summary and its bias-correction factors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from adamscope.client.constants import OPTION_NAMES

from .errors import InvalidState
from .spec import dtype_name
from .state import STATE_KEYS

if TYPE_CHECKING:
    from .stepper import Stepper

__all__ = ["bias_correction", "factors", "summary"]


def factors(group: Mapping[str, Any], t: float) -> dict[str, float | None]:
    """Bias-correction factors at step ``t`` as ``_single_tensor_adam`` computes them."""
    lr = float(group["lr"])
    beta1, beta2 = (float(b) for b in group["betas"])
    bc1 = 1 - beta1**t
    bc2 = 1 - beta2**t
    return {
        "step": t,
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "bias_correction1": bc1,
        "bias_correction2": bc2,
        "step_size": lr / bc1 if bc1 != 0 else None,
        "bias_correction2_sqrt": bc2**0.5,
    }


def bias_correction(stepper: Stepper, step: float | None = None) -> dict[str, Any]:
    """Per group at ``step`` (default: the stepper's step count), and, when ``step`` is not
    given, per parameter at that parameter's own state step (Python floats)."""
    with stepper.lock:
        if step is not None and not (math.isfinite(step) and step >= 0):
            raise InvalidState(f"step must be finite and >= 0, got {step}")
        t_groups = float(stepper.step_count if step is None else step)
        groups = [factors(g, t_groups) for g in stepper.optimizer.param_groups]
        params: dict[str, Any] = {}
        if step is None:
            for n, t in zip(stepper.names, stepper.param_steps(), strict=True):
                if t is not None:
                    params[n] = factors(stepper.param_group(n), t)
        return {"step": stepper.step_count, "groups": groups, "params": params}


def _params(stepper: Stepper) -> tuple[list[dict[str, Any]], int]:
    params = []
    nbytes = 0
    steps = stepper.param_steps()
    for n, p, t in zip(stepper.names, stepper.params, steps, strict=True):
        s = stepper.optimizer.state.get(p, {})
        if not p.is_meta:  # a watched run's: a shape, no storage here
            nbytes += p.numel() * p.element_size()
        nbytes += sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v))
        params.append(
            {
                "name": n,
                "shape": list(p.shape),
                "dtype": dtype_name(p.dtype),
                "numel": p.numel(),
                "group": stepper.group_of[n],
                "step": t,
                "state": [k for k in STATE_KEYS if k in s],
            }
        )
    return params, nbytes


def summary(stepper: Stepper) -> dict[str, Any]:
    """The stepper's summary: its layout, options, step, memory and times."""
    with stepper.lock:
        params, nbytes = _params(stepper)
        groups = []
        for gi, g in enumerate(stepper.optimizer.param_groups):
            opts = {k: g[k] for k in OPTION_NAMES}
            opts["lr"] = float(opts["lr"])
            opts["betas"] = tuple(float(b) for b in opts["betas"])
            groups.append({"index": gi, "params": stepper.group_names[gi], **opts})
        return {
            "name": stepper.name,
            "kind": stepper.hosting,
            "optimizer": stepper.kind,
            "device": str(stepper.device),
            "step": stepper.step_count,
            "numel": sum(p.numel() for p in stepper.params),
            "state_bytes": nbytes,
            "footprint": stepper.footprint().as_dict(),
            "params": params,
            "groups": groups,
            "created_at": stepper.created_at,
            "updated_at": stepper.updated_at,
        }
