"""Routes for the stepper resource: create, list, read, delete, options, bias correction."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from adamscope.client import codec
from adamscope.client.protocol import (
    META_SPEC,
    BiasCorrectionReport,
    CreateStepper,
    HyperparametersPatch,
    StepperList,
    StepperPatch,
    StepperSummary,
)

from ...engine import GroupDef, Stepper
from ...engine.checkpoint import check_header_room
from ...engine.errors import (
    DtypeMismatch,
    DuplicateName,
    InvalidSpec,
    ShapeMismatch,
    StepperNotFound,
)
from ...engine.options import resolve_device
from ...errors import ApiError, problems
from ...inspect.recorder import close_history, summary_fields
from .. import budget, quota
from ..access import authorize_name, require, visible
from ..deps import NAME_PROBLEMS, persistence, registry, serving, settings
from ..durability import persist_after, summary
from ..http.body import INLINE_JSON_BYTES, decode_tensors, json_object, meta_json, read_body
from ..http.media import OCTET, binary_body_doc, media_type
from ..http.reply import render_json
from ..options import options_from_model

__all__ = ["router"]

router = APIRouter(tags=["steppers"])


def _validate(model: type[Any], value: Any) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def _params_from_json(spec: CreateStepper, max_bytes: int) -> list[tuple[str, torch.Tensor]]:
    out = []
    total = 0
    for p in spec.params:
        if p.shape is None:
            raise InvalidSpec(f"parameter {p.name!r} needs a shape in a JSON create body")
        if any(d < 0 for d in p.shape):
            raise InvalidSpec(f"parameter {p.name!r} has a negative dimension: {p.shape}")
        dtype = codec.dtype_from_name(p.dtype or "float32")
        total += math.prod(p.shape) * dtype.itemsize
        if total > max_bytes:
            raise ApiError(
                "payload_too_large",
                f"parameters of {total} bytes exceed the body limit of {max_bytes}",
            )
        if p.data is None:
            t = torch.zeros(p.shape, dtype=dtype)
        else:
            t = codec.tensor_from_json(p.data, dtype, p.shape)
        out.append((p.name, t))
    return out


def _params_from_body(
    spec: CreateStepper, tensors: dict[str, torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    names = [p.name for p in spec.params]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DuplicateName(f"parameter name(s) listed more than once: {dup}")
    missing = [n for n in names if n not in tensors]
    extra = [n for n in tensors if n not in set(names)]
    if missing or extra:
        raise InvalidSpec(
            "the spec's params and the body's tensors must name the same parameters"
            + (f"; no tensor for {missing}" if missing else "")
            + (f"; not in spec: {extra}" if extra else "")
        )
    for p in spec.params:
        t = tensors[p.name]
        if p.shape is not None and list(t.shape) != p.shape:
            raise ShapeMismatch(f"tensor {p.name!r} has shape {list(t.shape)}, spec says {p.shape}")
        if p.dtype is not None and codec.dtype_name(t.dtype) != p.dtype:
            raise DtypeMismatch(
                f"tensor {p.name!r} has dtype {codec.dtype_name(t.dtype)}, spec says {p.dtype}"
            )
        if p.data is not None:
            raise InvalidSpec("initial values travel as tensors in a safetensors body, not 'data'")
    return [(n, tensors[n]) for n in names]


@router.post(
    "/steppers",
    status_code=201,
    response_model=StepperSummary,
    summary="Create a stepper",
    dependencies=[Depends(require("admin"))],
    openapi_extra=binary_body_doc(
        "safetensors of the initial parameter values, with the CreateStepper spec as JSON in "
        f"__metadata__['{META_SPEC}']; or a CreateStepper JSON body (zeros or small 'data').",
        {"$ref": "#/components/schemas/CreateStepper"},
    ),
    responses=problems(
        "malformed_body",
        "stepper_exists",
        "payload_too_large",
        "request_timeout",
        "unsupported_media_type",
        "request_validation_error",
        "invalid_hyperparameter",
        "invalid_spec",
        "duplicate_name",
        "unknown_parameter",
        "shape_mismatch",
        "dtype_mismatch",
        "device_unavailable",
        "forbidden",
        "tensor_too_large",
        "stepper_limit",
        "memory_budget_exceeded",
        "device_out_of_memory",
    ),
)
async def create_stepper(request: Request) -> dict[str, Any]:
    config = settings(request)
    body = await read_body(request)
    kind = media_type(request)
    if kind == "application/json":
        spec = _validate(
            CreateStepper,
            await run_in_threadpool(json_object, body)
            if len(body) > INLINE_JSON_BYTES
            else json_object(body),
        )
        authorize_name(request, spec.name)
        check_header_room([(p.name, p.shape or []) for p in spec.params], len(spec.groups or [0]))
        device = resolve_device(spec.device, config.default_device())
        sizes = quota.json_spec_sizes(config, spec)  # before zeros are allocated
        planned = quota.spec_bytes(spec, sizes, device.type)
        quota.admit(config, registry(request), spec.name, planned, precheck=True)
        budget.check_room(registry(request), spec.name, device, planned)
        params = _params_from_json(spec, config.max_body_bytes)
    elif kind == OCTET:
        tensors, metadata = await run_in_threadpool(decode_tensors, body)
        raw = meta_json(metadata, META_SPEC)
        if raw is None:
            raise InvalidSpec(f"safetensors body lacks __metadata__['{META_SPEC}']")
        spec = _validate(CreateStepper, raw)
        authorize_name(request, spec.name)
        params = _params_from_body(spec, tensors)
        check_header_room([(n, list(t.shape)) for n, t in params], len(spec.groups or [0]))
        for pname, t in params:
            quota.check_tensor_elements(config, pname, list(t.shape))
    else:
        raise ApiError(
            "unsupported_media_type", f"Content-Type {kind!r}: use application/json or {OCTET}"
        )
    hyper = options_from_model(spec.hyperparameters)
    groups = None
    if spec.groups is not None:
        groups = [
            GroupDef(list(g.params), options_from_model(g, exclude={"params"})) for g in spec.groups
        ]
    device = resolve_device(spec.device, config.default_device())
    new_bytes = quota.spec_bytes(
        spec, [(n, t.numel() * t.element_size()) for n, t in params], device.type
    )

    def build() -> Stepper:
        quota.admit(config, registry(request), spec.name, new_bytes)  # under the lock
        budget.check_room(registry(request), spec.name, device, new_bytes)
        return Stepper(
            spec.name,
            spec.optimizer,
            device,
            params,
            hyper,
            groups,
            step=spec.step,
            hosting=spec.kind,
        )

    stepper = await run_in_threadpool(
        persistence(request).create, spec.name, build, spec.durability
    )
    return summary(request, stepper)


@router.get(
    "/steppers",
    response_model=StepperList,
    summary="List steppers",
    dependencies=[Depends(require("read"))],
)
async def list_steppers(request: Request) -> dict[str, Any]:
    serve = serving(request)
    return {
        "steppers": [
            summary(request, await serve.settled(s))
            for s in registry(request).list()
            if visible(request, s.name)
        ]
    }


@router.get(
    "/steppers/{name}",
    response_model=StepperSummary,
    summary="A stepper's summary",
    responses=problems(*NAME_PROBLEMS),
    dependencies=[Depends(require("read"))],
)
async def get_stepper(name: str, request: Request) -> Response:
    serve = serving(request)
    stepper = await serve.settled(registry(request).get(name))
    durable = persistence(request).describe(stepper)
    token = (stepper.version, json.dumps(durable, sort_keys=True, default=str))
    body = serve.of(stepper).replies.body(
        "summary",
        token,
        lambda: render_json({**stepper.summary(), **durable, **summary_fields(stepper)}),
    )
    return Response(body, media_type="application/json")


@router.delete(
    "/steppers/{name}",
    status_code=204,
    summary="Delete a stepper",
    responses=problems(*NAME_PROBLEMS),
    dependencies=[Depends(require("admin"))],
)
async def delete_stepper(name: str, request: Request) -> Response:
    try:
        stepper: Stepper | None = registry(request).get(name)
    except StepperNotFound:
        stepper = None  # a stored stepper that could not be restored: its files go
    await run_in_threadpool(persistence(request).delete, name)
    if stepper is not None:
        # Its buffers go now, and PyTorch's caches hand the memory back: page-locked host
        # memory would otherwise stay cached in this process for good.
        serving(request).forget(stepper)
        await run_in_threadpool(stepper.release_buffers)
        close_history(stepper)  # its database file is gone with its directory
    return Response(status_code=204)


@router.patch(
    "/steppers/{name}",
    response_model=StepperSummary,
    summary="Freeze or unfreeze a stepper",
    description="Set the stepper's kind: 'frozen' refuses steps (409 stepper_frozen) while "
    "reads, statistics, snapshots, diffs and edits of state and options keep working, which "
    "is how an imported checkpoint is kept as evidence (`adamscope import-checkpoint "
    "--step-into frozen`); 'hosted' makes it steppable again (RemoteAdam, the step "
    "endpoint), e.g. to replay the steps that led to a crash. The kind is saved with the "
    "stepper's checkpoints and snapshots (restoring a snapshot restores the kind it had).",
    dependencies=[Depends(require("admin"))],
    responses=problems(*NAME_PROBLEMS, "malformed_body", "request_validation_error"),
)
async def patch_stepper(name: str, patch: StepperPatch, request: Request) -> dict[str, Any]:
    stepper = registry(request).get(name)
    async with serving(request).hold(stepper):
        await run_in_threadpool(stepper.set_hosting, patch.kind)
        await persist_after(request, stepper)
    return summary(request, stepper)


@router.patch(
    "/steppers/{name}/hyperparameters",
    response_model=StepperSummary,
    summary="Change options between steps (lr for schedulers, ...)",
    dependencies=[Depends(require("write"))],
    responses=problems(
        *NAME_PROBLEMS,
        "malformed_body",
        "invalid_hyperparameter",
        "invalid_state",
        "stepper_watched",
        "device_out_of_memory",
    ),
)
async def patch_hyperparameters(
    name: str, patch: HyperparametersPatch, request: Request
) -> dict[str, Any]:
    stepper = registry(request).get(name)
    updates = options_from_model(patch, exclude={"group"})
    async with serving(request).hold(stepper):
        await run_in_threadpool(stepper.set_hyperparameters, updates, patch.group)
        await persist_after(request, stepper)
    return summary(request, stepper)


@router.get(
    "/steppers/{name}/bias-correction",
    response_model=BiasCorrectionReport,
    summary="Bias-correction factors at the current or a given step",
    dependencies=[Depends(require("read"))],
    responses=problems(*NAME_PROBLEMS, "invalid_state"),
)
async def bias_correction(
    name: str,
    request: Request,
    step: Annotated[float | None, Query(ge=0, description="t; default: current")] = None,
) -> Response:
    stepper = registry(request).get(name)
    body = (
        serving(request)
        .of(stepper)
        .replies.body(
            ("bias-correction", step),
            stepper.version,
            lambda: render_json({"stepper": name, **stepper.bias_correction(step)}),
        )
    )
    return Response(body, media_type="application/json")
