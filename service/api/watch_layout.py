"""A watched run's stepper, built from its trainer's first report: metadata only.

The trainer's tensors never live in the service, so a watched stepper holds its layout
(names, shapes, dtypes, groups, options) over tensors on PyTorch's ``meta`` device, which
have a shape and a dtype and no storage: a watched 7B model costs the service its names,
not 28 GB of zeros. Anything that would read a value of such a tensor fails loudly instead
of answering with zeros, and the routes that would (stats, slices, tensor reads) answer 409
``stepper_watched`` before they try.

A watched create is admitted as a hosted one is, where the limit means something for a run
whose tensors are elsewhere:

* its name follows the stepper name rules (the report route's path pattern, 422);
* each declared parameter is a shape PyTorch can hold (422 ``invalid_spec``) of at most
  ``max_tensor_elements`` elements (413 ``tensor_too_large``): a snapshot of the run
  uploads all of it;
* the checkpoint header of its snapshots stays readable (422 ``invalid_spec``);
* it counts towards ``max_steppers`` (507 ``stepper_limit``), but not towards the memory
  budget: it holds no tensor memory (its footprint is zero).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from adamscope.client import codec

from ..engine import GroupDef, Registry, Stepper
from ..engine.checkpoint import check_header_room
from ..engine.errors import InvalidSpec, StepperExists
from ..engine.stepper import WATCHED
from ..settings import Settings
from . import quota

__all__ = ["META", "builder"]

#: Where a watched run's parameters "are" here: shapes and dtypes, no storage.
META = torch.device("meta")
_OPTIONS = ("lr", "betas", "eps", "weight_decay", "amsgrad")


def _layout(
    report: dict[str, Any], settings: Settings
) -> tuple[list[tuple[str, torch.Tensor]], list[GroupDef], str]:
    try:
        declared = [(str(p["name"]), p["shape"], str(p["dtype"])) for p in report["params"]]
        groups = [
            GroupDef(
                list(g["params"]),
                {k: (tuple(g[k]) if k == "betas" else g[k]) for k in _OPTIONS if k in g},
            )
            for g in report["groups"]
        ]
        optimizer = str(report["optimizer"])
        params = []
        for pname, shape, dtype in declared:
            checked = codec.check_shape(shape, f"parameter {pname!r}")
            quota.check_tensor_elements(settings, pname, checked)
            params.append(
                (pname, torch.empty(checked, dtype=codec.dtype_from_name(dtype), device=META))
            )
    except (KeyError, TypeError, ValueError, codec.CodecError) as e:
        raise InvalidSpec(f"a watched run's first report needs its layout: {e}") from None
    check_header_room([(n, list(t.shape)) for n, t in params], len(groups))
    return params, groups, optimizer


def builder(
    name: str,
    report: dict[str, Any],
    settings: Settings,
    registry: Registry,
    failed: dict[str, str],
) -> Callable[[], Stepper]:
    """What the registry runs (under its lock) to create the watched run ``name`` from its
    first ``report``; ``failed``: stored steppers that could not be restored (their names
    stay taken until deleted, as for a hosted create)."""
    params, groups, optimizer = _layout(report, settings)
    step = report.get("step")
    if not isinstance(step, int) or step < 0:
        raise InvalidSpec(f"report's step must be an integer >= 0, got {step!r}")

    def build() -> Stepper:
        if name in failed:
            raise StepperExists(
                f"stepper {name!r} is stored in the data directory but could not be restored "
                f"({failed[name]}); DELETE it to discard the stored files",
                stepper=name,
            )
        quota.admit(settings, registry, name, 0)
        return Stepper(name, optimizer, META, params, {}, groups, step=step, hosting=WATCHED)

    return build
