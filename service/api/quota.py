"""Quotas on what steppers may hold: tensor elements, number of steppers, memory budget.

* ``max_tensor_elements``: no parameter may have more elements (413 ``tensor_too_large``),
  checked from the spec's shapes before anything is allocated.
* ``max_steppers``: creating one more stepper than this is refused (507 ``stepper_limit``).
* ``memory_budget_bytes``: the memory all steppers hold *once every parameter has stepped*
  may not exceed this (507 ``memory_budget_exceeded``): each stepper's footprint total
  (:mod:`adamscope.service.engine.footprint`): parameters and Adam state (3x or 4x the parameter
  bytes, ``max_exp_avg_sq`` where the group has ``amsgrad``, plus a 4-byte ``step`` per
  parameter), the gradient buffer (1x), the workspace PyTorch's step allocates (by
  implementation) and, on a GPU, the page-locked host buffers (2x). The summary's
  ``footprint`` shows the same figures.

The admission check runs twice at creation: once before the parameters are allocated (so an
over-budget JSON spec of zeros never allocates them), and once inside the registry's
creation lock (so racing creates cannot both pass). A refused create registers nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from adamscope.client import codec
from adamscope.client.protocol import CreateStepper

from ..engine import Registry, Stepper
from ..engine.errors import InvalidSpec, StepperNotFound
from ..engine.footprint import STEP_BYTES, footprint, state_bytes
from ..engine.options import default_options
from ..errors import ApiError
from ..settings import Settings

__all__ = [
    "STEP_BYTES",
    "admit",
    "amsgrad_by_param",
    "check_tensor_elements",
    "checkpoint_bytes",
    "json_spec_sizes",
    "projected_bytes",
    "spec_bytes",
    "spec_groups",
    "stepper_bytes",
]


def check_tensor_elements(settings: Settings, name: str, shape: Sequence[int]) -> None:
    """413 ``tensor_too_large`` when a parameter of ``shape`` is over the element limit."""
    numel = math.prod(shape)
    limit = settings.max_tensor_elements
    if numel > limit:
        raise ApiError(
            "tensor_too_large",
            f"parameter {name!r} has {numel} elements; the limit (max_tensor_elements) is {limit}",
            parameter=name,
            limit=limit,
        )


def projected_bytes(sizes: Iterable[tuple[int, bool]]) -> int:
    """Parameters plus Adam state after the first step, from (parameter bytes, amsgrad):
    the ``state`` part of a footprint."""
    return sum(state_bytes([nbytes], amsgrad) for nbytes, amsgrad in sizes)


def amsgrad_by_param(spec: CreateStepper) -> Callable[[str], bool]:
    """Whether each parameter's group will have ``amsgrad`` (as the spec asks)."""
    base = bool(spec.hyperparameters.amsgrad)
    per_param = {
        n: bool(g.amsgrad if g.amsgrad is not None else base)
        for g in spec.groups or []
        for n in g.params
    }
    return lambda name: per_param.get(name, base)


def spec_groups(spec: CreateStepper) -> list[tuple[list[str], dict[str, Any]]]:
    """The spec's param groups as (parameter names, options by PyTorch's names), each
    option the group's, else the spec's, else PyTorch's default."""
    base = default_options(spec.optimizer)
    base.update(spec.hyperparameters.model_dump(exclude_none=True))
    if not spec.groups:
        return [([p.name for p in spec.params], base)]
    return [
        (list(g.params), {**base, **g.model_dump(exclude_none=True, exclude={"params"})})
        for g in spec.groups
    ]


def spec_bytes(spec: CreateStepper, sizes: Iterable[tuple[str, int]], device: str) -> int:
    """Footprint total of a new stepper on ``device`` from (parameter name, bytes)."""
    nbytes = dict(sizes)
    return footprint(
        (
            ([nbytes[n] for n in names if n in nbytes], options)
            for names, options in spec_groups(spec)
        ),
        device,
    ).total


def checkpoint_bytes(
    params: Iterable[tuple[str, int]],
    groups: Iterable[tuple[Iterable[str], Mapping[str, Any]]],
    device: str,
) -> int:
    """Footprint total of a stepper rebuilt from a checkpoint on ``device``: its parameters'
    (name, bytes) and its groups' (names, options)."""
    nbytes = dict(params)
    return footprint(
        (([nbytes[n] for n in names if n in nbytes], options) for names, options in groups), device
    ).total


def json_spec_sizes(settings: Settings, spec: CreateStepper) -> list[tuple[str, int]]:
    """(name, bytes) of a JSON spec's parameters, element limits checked; parameters the
    engine will reject anyway (no or negative shape) are left to it."""
    out = []
    for p in spec.params:
        if p.shape is None or any(d < 0 for d in p.shape):
            continue
        check_tensor_elements(settings, p.name, p.shape)
        try:  # e.g. [2**64, 0]: no elements, yet more than PyTorch can lay out
            codec.check_shape(p.shape, f"parameter {p.name!r}")
        except codec.CodecError as e:
            raise InvalidSpec(str(e), parameter=p.name) from None
        itemsize = codec.dtype_from_name(p.dtype or "float32").itemsize
        out.append((p.name, math.prod(p.shape) * itemsize))
    return out


def stepper_bytes(stepper: Stepper) -> int:
    """A hosted stepper's footprint total under its current options."""
    return stepper.footprint().total


def _exists(registry: Registry, name: str) -> bool:
    try:
        registry.get(name)
    except StepperNotFound:
        return False
    return True


def admit(
    settings: Settings, registry: Registry, name: str, new_bytes: int, *, precheck: bool = False
) -> None:
    """507 unless one more stepper of ``new_bytes`` fits the stepper limit and the budget.

    Inside the registry's creation lock this is authoritative; with ``precheck`` (before
    allocating, outside the lock) a name that is already taken is left to the registry's
    409.
    """
    if precheck and _exists(registry, name):
        return
    limit = settings.max_steppers
    if limit is not None and len(registry) >= limit:
        raise ApiError(
            "stepper_limit",
            f"the service already holds {len(registry)} steppers, its limit "
            f"(max_steppers); delete one to create {name!r}",
            limit=limit,
        )
    budget = settings.memory_budget_bytes
    if budget is not None:
        used = sum(stepper_bytes(s) for s in registry.list())
        if used + new_bytes > budget:
            raise ApiError(
                "memory_budget_exceeded",
                f"stepper {name!r} needs {new_bytes} bytes (parameters, Adam state, "
                f"gradient buffer and step workspace); {used} of the {budget}-byte budget "
                f"(memory_budget_bytes) are in use",
                needed=new_bytes,
                used=used,
                budget=budget,
            )
