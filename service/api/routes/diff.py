"""``GET /diff?a=..&b=..``: name-keyed diff of two steppers or snapshots (``stepper`` or
``stepper/snapshot``; naming a snapshot needs the ``admin`` scope, as reading snapshots
does), see :mod:`adamscope.service.inspect.diff`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from adamscope.client.constants import SNAPSHOT_NAME_PATTERN, STEPPER_NAME_PATTERN

from ...engine import Stepper
from ...engine import checkpoint as checkpoints
from ...errors import problems
from ...inspect.diff import Operand, diff
from ..access import AccessDenied, authorize_name, principal, require
from ..deps import persistence, registry
from ..http.reply import json_response
from .stats import invalid

__all__ = ["router"]

router = APIRouter(tags=["inspection"])

_STEPPER = re.compile(STEPPER_NAME_PATTERN)
_SNAP = re.compile(SNAPSHOT_NAME_PATTERN)


def _operand_name(raw: str, what: str) -> tuple[str, str | None]:
    stepper, _, snap = raw.partition("/")
    if not _STEPPER.fullmatch(stepper) or (snap and not _SNAP.fullmatch(snap)):
        raise invalid(f"{what} must be 'stepper' or 'stepper/snapshot', got {raw!r}")
    return stepper, snap or None


def _stepper_operand(stepper: Stepper) -> Operand:
    with stepper.lock:
        step, state = stepper.get_state(with_params=True)
        groups = stepper.group_options()
    tensors = {n: {"param": s.pop("param"), **s} for n, s in state.items()}
    return Operand(
        {"stepper": stepper.name, "snapshot": None, "step": step},
        tensors,
        [_jsonable(g) for g in groups],
    )


def _snapshot_operand(request: Request, stepper: Stepper, snap: str) -> Operand:
    f, _ = persistence(request).open_snapshot(stepper, snap)
    with f:
        ckpt = checkpoints.decode(f.read())
    tensors = {n: {"param": t, **ckpt.state.get(n, {})} for n, t in ckpt.params}
    groups = [_jsonable(dict(g["options"])) for g in ckpt.header["groups"]]
    return Operand({"stepper": stepper.name, "snapshot": snap, "step": ckpt.step}, tensors, groups)


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        if torch.is_tensor(v):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = [float(x) if torch.is_tensor(x) else x for x in v]
        out[k] = v
    return out


@router.get(
    "/diff",
    summary="Name-keyed diff of two steppers or snapshots ('stepper' or 'stepper/snapshot')",
    dependencies=[Depends(require("read"))],
    responses=problems(
        "stepper_not_found", "snapshot_not_found", "request_validation_error", "invalid_checkpoint"
    ),
)
async def diff_route(
    request: Request,
    a: Annotated[str, Query(description="'stepper' or 'stepper/snapshot'")],
    b: Annotated[str, Query(description="'stepper' or 'stepper/snapshot'")],
) -> Response:
    sides = [_operand_name(a, "a"), _operand_name(b, "b")]
    for stepper_name, snap in sides:
        authorize_name(request, stepper_name)
        if snap is not None and not principal(request).allows("admin"):
            raise AccessDenied(
                "forbidden",
                f"reading snapshot {snap!r} needs the admin scope",
                required_scope="admin",
            )
    steppers = [registry(request).get(n) for n, _ in sides]

    def operand(stepper: Stepper, snap: str | None) -> Callable[[], Operand]:
        if snap is None:
            return lambda: _stepper_operand(stepper)
        return lambda: _snapshot_operand(request, stepper, snap)

    ops = [
        await run_in_threadpool(operand(s, snap))
        for s, (_, snap) in zip(steppers, sides, strict=True)
    ]
    report = await run_in_threadpool(diff, ops[0], ops[1])
    return json_response(report)
