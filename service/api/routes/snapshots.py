"""Routes for durability: explicit checkpoints, the durability policy, named snapshots
(take, list, download, restore, delete) and importing a checkpoint file as a new stepper.

A snapshot file and a downloaded one are the same self-describing safetensors checkpoint
as the stepper's current one on disk (see :mod:`adamscope.service.engine.checkpoint`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from adamscope.client.protocol import (
    SNAPSHOT_NAME_PATTERN,
    STEPPER_NAME_PATTERN,
    CheckpointInfo,
    Durability,
    SnapshotInfo,
    SnapshotList,
    SnapshotRequest,
    StepperSummary,
)

from ...engine import checkpoint as checkpoints
from ...engine.errors import InvalidCheckpoint, InvalidSpec
from ...engine.options import resolve_device
from ...errors import ApiError, problems
from .. import budget, quota
from ..access import authorize_name, require
from ..deps import NAME_PROBLEMS, persistence, registry, serving, settings
from ..durability import summary
from ..http.body import read_body
from ..http.media import OCTET, binary_body_doc, media_type

__all__ = ["router"]

router = APIRouter(tags=["durability"])

#: Download chunk size.
CHUNK = 1 << 20

Snap = Annotated[str, Path(pattern=SNAPSHOT_NAME_PATTERN, description="snapshot name")]
SNAP_PROBLEMS = (*NAME_PROBLEMS, "snapshot_not_found")


@router.post(
    "/steppers/{name}/checkpoint",
    response_model=CheckpointInfo,
    summary="Write the stepper's checkpoint to disk now (whatever its durability policy)",
    dependencies=[Depends(require("write"))],
    responses=problems(*NAME_PROBLEMS, "persistence_failed", "stepper_watched"),
)
async def checkpoint(name: str, request: Request) -> dict[str, Any]:
    stepper = registry(request).get(name)
    return await run_in_threadpool(persistence(request).checkpoint, stepper)


@router.put(
    "/steppers/{name}/durability",
    response_model=StepperSummary,
    summary="Change when the stepper is written to disk (writes its checkpoint now)",
    dependencies=[Depends(require("admin"))],
    responses=problems(*NAME_PROBLEMS, "malformed_body", "persistence_failed", "stepper_watched"),
)
async def set_durability(name: str, policy: Durability, request: Request) -> dict[str, Any]:
    stepper = registry(request).get(name)
    await run_in_threadpool(persistence(request).set_policy, stepper, policy)
    return summary(request, stepper)


@router.post(
    "/steppers/{name}/snapshots",
    status_code=201,
    response_model=SnapshotInfo,
    summary="Take a named snapshot of the stepper's current state",
    dependencies=[Depends(require("admin"))],
    responses=problems(
        *NAME_PROBLEMS, "malformed_body", "snapshot_exists", "persistence_failed", "stepper_watched"
    ),
)
async def take_snapshot(
    name: str, request: Request, body: Annotated[SnapshotRequest | None, Body()] = None
) -> dict[str, Any]:
    stepper = registry(request).get(name)
    snap = body.name if body is not None else None
    return await run_in_threadpool(persistence(request).take_snapshot, stepper, snap)


@router.get(
    "/steppers/{name}/snapshots",
    response_model=SnapshotList,
    summary="List the stepper's snapshots, oldest first",
    dependencies=[Depends(require("admin"))],
    responses=problems(*NAME_PROBLEMS),
)
async def list_snapshots(name: str, request: Request) -> dict[str, Any]:
    stepper = registry(request).get(name)
    found = await run_in_threadpool(persistence(request).list_snapshots, stepper)
    return {"stepper": name, "snapshots": found}


@router.get(
    "/steppers/{name}/snapshots/{snap}",
    summary="Download a snapshot (a self-describing safetensors checkpoint file)",
    dependencies=[Depends(require("admin"))],
    responses={
        200: {
            "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}},
            "description": "the snapshot file",
        },
        **problems(*SNAP_PROBLEMS),
    },
)
async def download_snapshot(name: str, snap: Snap, request: Request) -> Response:
    stepper = registry(request).get(name)
    f, size = await run_in_threadpool(persistence(request).open_snapshot, stepper, snap)

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while chunk := await run_in_threadpool(f.read, CHUNK):
                yield chunk
        finally:
            f.close()

    return StreamingResponse(
        chunks(),
        media_type=OCTET,
        headers={
            "content-length": str(size),
            "content-disposition": f'attachment; filename="{name}-{snap}.safetensors"',
        },
    )


@router.post(
    "/steppers/{name}/snapshots/{snap}/restore",
    response_model=StepperSummary,
    summary="Roll the stepper back to a snapshot (parameters, state, options, step)",
    dependencies=[Depends(require("admin"))],
    responses=problems(
        *SNAP_PROBLEMS, "invalid_checkpoint", "persistence_failed", "stepper_watched"
    ),
)
async def restore_snapshot(name: str, snap: Snap, request: Request) -> dict[str, Any]:
    stepper = registry(request).get(name)
    async with serving(request).hold(stepper):
        await run_in_threadpool(persistence(request).restore_snapshot, stepper, snap)
    return summary(request, stepper)


@router.delete(
    "/steppers/{name}/snapshots/{snap}",
    status_code=204,
    summary="Delete a snapshot",
    dependencies=[Depends(require("admin"))],
    responses=problems(*SNAP_PROBLEMS),
)
async def delete_snapshot(name: str, snap: Snap, request: Request) -> Response:
    stepper = registry(request).get(name)
    await run_in_threadpool(persistence(request).delete_snapshot, stepper, snap)
    return Response(status_code=204)


@router.post(
    "/steppers/import",
    status_code=201,
    response_model=StepperSummary,
    summary="Create a stepper from a checkpoint or snapshot file",
    dependencies=[Depends(require("admin"))],
    openapi_extra=binary_body_doc(
        "a checkpoint file as downloaded from GET /v1/steppers/{name}/snapshots/{snap} "
        "(safetensors with the adamscope.checkpoint header)"
    ),
    responses=problems(
        "malformed_body",
        "payload_too_large",
        "unsupported_media_type",
        "request_timeout",
        "request_validation_error",
        "invalid_checkpoint",
        "stepper_exists",
        "device_unavailable",
        "forbidden",
        "tensor_too_large",
        "stepper_limit",
        "memory_budget_exceeded",
        "persistence_failed",
    ),
)
async def import_stepper(
    request: Request,
    name: Annotated[
        str | None,
        Query(
            pattern=STEPPER_NAME_PATTERN, description="the new stepper's name; default: the file's"
        ),
    ] = None,
    device: Annotated[
        str | None,
        Query(
            description="device for the new stepper; default: the file's if available here, "
            "else the service default"
        ),
    ] = None,
) -> dict[str, Any]:
    config = settings(request)
    kind = media_type(request)
    if kind not in (OCTET, ""):
        raise ApiError("unsupported_media_type", f"Content-Type {kind!r}: send {OCTET}")
    body = await read_body(request)
    if not body:
        raise ApiError("malformed_body", "empty body: expected a checkpoint file")
    ckpt = await run_in_threadpool(checkpoints.decode, body)
    del body
    new_name = name or ckpt.name
    authorize_name(request, new_name)
    if device is not None:
        resolve_device(device, config.default_device())  # 422 before anything is built
    for pname, t in ckpt.params:
        quota.check_tensor_elements(config, pname, list(t.shape))
    try:
        checkpoints.check_header_room(
            [(n, list(t.shape)) for n, t in ckpt.params], len(ckpt.groups)
        )
    except InvalidSpec as e:
        raise InvalidCheckpoint(e.detail) from None
    needed = quota.checkpoint_bytes(
        [(n, t.numel() * t.element_size()) for n, t in ckpt.params],
        [(g.params, g.options) for g in ckpt.groups],
        device or ckpt.device,
    )

    target = resolve_device(device, config.default_device()) if device is not None else None

    def admit(new: str) -> None:
        quota.admit(config, registry(request), new, needed)
        where = target or persistence(request).restore_device(ckpt.device)
        budget.check_room(registry(request), new, where, needed)

    stepper = await run_in_threadpool(
        persistence(request).import_checkpoint, ckpt, new_name, device, admit
    )
    return summary(request, stepper)
