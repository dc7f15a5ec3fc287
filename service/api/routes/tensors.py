"""Routes that move tensors: parameter values and Adam state, read and written."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from adamscope.client import codec
from adamscope.client.constants import META_GROUPS

from ...engine import STATE_KEYS, Stepper
from ...engine.errors import InvalidState
from ...errors import ApiError, problems
from ..access import require
from ..deps import NAME_PROBLEMS, Names, registry, serving
from ..durability import persist_after
from ..http.body import meta_json, read_json_object
from ..http.ingest import ingest_tensors
from ..http.media import OCTET, TensorFormat, binary_body_doc, media_type, wants_json
from ..http.reply import json_tensors, tensor_response
from ..options import group_updates_from_json

__all__ = ["BODY_PROBLEMS", "TENSOR_PROBLEMS", "router", "split_state_key"]

router = APIRouter(tags=["tensors"])

BODY_PROBLEMS = ("malformed_body", "payload_too_large", "unsupported_media_type", "request_timeout")
TENSOR_PROBLEMS = ("unknown_parameter", "shape_mismatch", "dtype_mismatch")

Format = Annotated[
    TensorFormat | None,
    Query(
        description="safetensors (default) or json; JSON is also chosen by Accept: application/json"
    ),
]


def split_state_key(key: str) -> tuple[str, str]:
    """``"layer.0.weight.exp_avg"`` -> ``("layer.0.weight", "exp_avg")``."""
    name, sep, which = key.rpartition(".")
    if not sep or not name:
        raise InvalidState(
            f"state tensor {key!r} must be named '<parameter>.<key>' with key one of "
            + ", ".join(STATE_KEYS)
        )
    return name, which


def _json_tensor_in(value: Any, dtype: torch.dtype, shape: list[int] | None) -> torch.Tensor:
    """Nested lists, or ``{"data", "dtype"?, "shape"?}``, as a tensor.

    Only a declared ``shape`` is checked here (against the data); a tensor whose shape
    differs from the parameter's (``shape``) is left to the engine, which rejects it as
    shape_mismatch exactly as it does for a safetensors body.
    """
    declared = None
    if isinstance(value, dict):
        if "data" not in value:
            raise ApiError("malformed_body", "a JSON tensor object needs 'data'")
        if "dtype" in value:
            dtype = codec.dtype_from_name(str(value["dtype"]))
        if "shape" in value:
            declared = value["shape"]
            if not isinstance(declared, list):
                raise ApiError(
                    "malformed_body", f"a JSON tensor's shape must be a list, got {declared!r}"
                )
        value = value["data"]
    t = codec.tensor_from_json(value, dtype, declared)
    if declared is None and shape is not None and t.numel() == 0 and math.prod(shape) == 0:
        t = t.reshape(shape)  # [] is how nested lists spell any empty tensor
    return t


def _value_destination(stepper: Stepper) -> Callable[[codec.Entry], torch.Tensor]:
    """Where a parameter value is received: checked against the parameter first, so a body
    can never make the service hold more than the stepper's own size."""

    def destination(entry: codec.Entry) -> torch.Tensor:
        stepper.check_value(entry.name, entry.shape, entry.dtype)
        return torch.empty(entry.shape, dtype=entry.dtype)

    return destination


def _state_destination(stepper: Stepper) -> Callable[[codec.Entry], torch.Tensor]:
    """Where a state tensor ``<param>.<key>`` is received: its key and shape checked first."""

    def destination(entry: codec.Entry) -> torch.Tensor:
        pname, which = split_state_key(entry.name)
        stepper.check_state_shape(pname, which, entry.shape)
        return torch.empty(entry.shape, dtype=entry.dtype)

    return destination


@router.get(
    "/steppers/{name}/params",
    summary="Read parameter values",
    dependencies=[Depends(require("read"))],
    responses={
        200: {
            "content": {OCTET: {}, "application/json": {}},
            "description": "safetensors (metadata adamscope.step) or JSON",
        },
        **problems(*NAME_PROBLEMS, "unknown_parameter", "json_too_large"),
    },
)
async def get_params(
    name: str, request: Request, names: Names = None, format: Format = None
) -> Response:
    stepper = registry(request).get(name)
    # Off the event loop: the copy waits for the stepper's lock, which a long step holds.
    step_count, tensors = await serving(request).off_loop(
        stepper, lambda: stepper.get_params(names)
    )
    if wants_json(request, format):
        return JSONResponse(
            {"stepper": name, "step": step_count, "params": json_tensors(request, tensors)}
        )
    return tensor_response(tensors, name, step_count)


@router.put(
    "/steppers/{name}/params",
    summary="Overwrite some or all parameter values",
    dependencies=[Depends(require("write"))],
    responses=problems(
        *NAME_PROBLEMS, *BODY_PROBLEMS, *TENSOR_PROBLEMS, "device_out_of_memory", "stepper_watched"
    ),
    openapi_extra=binary_body_doc(
        'safetensors of values by parameter name, or JSON {"params": {name: nested list}}',
        {"type": "object", "properties": {"params": {"type": "object"}}},
    ),
)
async def put_params(name: str, request: Request) -> dict[str, Any]:
    stepper = registry(request).get(name)
    if media_type(request) == "application/json":
        raw = (await read_json_object(request)).get("params")
        if not isinstance(raw, dict):
            raise ApiError("malformed_body", 'JSON body must be {"params": {name: values}}')
        tensors = {}
        for pname, value in raw.items():
            shape, dtype = stepper.param_meta(pname)
            tensors[pname] = _json_tensor_in(value, dtype, shape)
    else:
        tensors, _ = await ingest_tensors(
            request, serving(request).of(stepper).header_limit, _value_destination(stepper)
        )
    async with serving(request).hold(stepper):
        await run_in_threadpool(stepper.put_params, tensors)
        await persist_after(request, stepper)
    return {"stepper": name, "step": stepper.step_count, "updated": list(tensors)}


@router.get(
    "/steppers/{name}/state",
    summary="Read Adam state (step, exp_avg, exp_avg_sq, max_exp_avg_sq)",
    dependencies=[Depends(require("read"))],
    responses={
        200: {
            "content": {OCTET: {}, "application/json": {}},
            "description": "safetensors named '<param>.<key>' (with with_params=true "
            "also '<param>.param') or JSON; metadata adamscope.step "
            "is the step every tensor of the reply belongs to",
        },
        **problems(*NAME_PROBLEMS, "unknown_parameter", "invalid_state", "json_too_large"),
    },
)
async def get_state(
    name: str,
    request: Request,
    names: Names = None,
    keys: Annotated[
        list[str] | None, Query(alias="key", description="state keys; all if none")
    ] = None,
    format: Format = None,
    with_params: Annotated[
        bool,
        Query(
            description="also return each parameter's value, as '<param>.param' (JSON: key "
            "'param'), read together with the state: parameters and state are then "
            "one consistent snapshot of the reported step, never a mix of two steps"
        ),
    ] = False,
) -> Response:
    stepper = registry(request).get(name)
    step_count, state = await serving(request).off_loop(
        stepper, lambda: stepper.get_state(names, keys, with_params)
    )
    if wants_json(request, format):
        flat = [t for s in state.values() for t in s.values()]
        json_tensors(request, {str(i): t for i, t in enumerate(flat)})  # size check only
        return JSONResponse(
            {
                "stepper": name,
                "step": step_count,
                "state": {
                    p: {k: codec.tensor_to_json(t) for k, t in s.items()} for p, s in state.items()
                },
            }
        )
    flat_named = {f"{p}.{k}": t for p, s in state.items() for k, t in s.items()}
    return tensor_response(flat_named, name, step_count)


@router.put(
    "/steppers/{name}/state",
    summary="Load Adam state (all, some parameters, or single tensors) and options",
    dependencies=[Depends(require("write"))],
    responses=problems(
        *NAME_PROBLEMS,
        *BODY_PROBLEMS,
        *TENSOR_PROBLEMS,
        "invalid_state",
        "invalid_hyperparameter",
        "device_out_of_memory",
        "stepper_watched",
    ),
    openapi_extra=binary_body_doc(
        "safetensors named '<param>.<key>' (key: step, exp_avg, exp_avg_sq, max_exp_avg_sq); "
        f"optional __metadata__['{META_GROUPS}'] with every group's options (as in a PyTorch "
        'state_dict). Or JSON {"state": {param: {key: values}}, "param_groups": [...]}.',
        {
            "type": "object",
            "properties": {"state": {"type": "object"}, "param_groups": {"type": "array"}},
        },
    ),
)
async def put_state(
    name: str,
    request: Request,
    replace: Annotated[bool, Query(description="drop state not in the body (a full load)")] = False,
) -> dict[str, Any]:
    stepper = registry(request).get(name)
    nested: dict[str, dict[str, torch.Tensor]] = {}
    if media_type(request) == "application/json":
        body = await read_json_object(request)
        raw_state = body.get("state", {})
        if not isinstance(raw_state, dict):
            raise ApiError("malformed_body", "'state' must map parameter names to objects")
        for pname, entries in raw_state.items():
            if not isinstance(entries, dict):
                raise ApiError("malformed_body", f"state of {pname!r} must be an object")
            shape, dtype = stepper.param_meta(pname)
            nested[pname] = {
                k: _json_tensor_in(
                    v, torch.float32 if k == "step" else dtype, None if k == "step" else shape
                )
                for k, v in entries.items()
            }
        groups = group_updates_from_json(body.get("param_groups"))
    else:
        tensors, metadata = await ingest_tensors(
            request, serving(request).of(stepper).header_limit, _state_destination(stepper)
        )
        for key, t in tensors.items():
            pname, which = split_state_key(key)
            nested.setdefault(pname, {})[which] = t
        groups = group_updates_from_json(meta_json(metadata, META_GROUPS))
    async with serving(request).hold(stepper):
        await run_in_threadpool(stepper.put_state, nested, groups, replace)
        await persist_after(request, stepper)
    return {"stepper": name, "step": stepper.step_count, "updated": sorted(nested)}


@router.delete(
    "/steppers/{name}/state",
    summary="Forget Adam state of some or all parameters (they restart at step 0)",
    dependencies=[Depends(require("write"))],
    responses=problems(*NAME_PROBLEMS, "unknown_parameter"),
)
async def reset_state(name: str, request: Request, names: Names = None) -> dict[str, Any]:
    stepper = registry(request).get(name)
    async with serving(request).hold(stepper):
        await run_in_threadpool(stepper.reset_state, names)
        await persist_after(request, stepper)
    return {
        "stepper": name,
        "step": stepper.step_count,
        "reset": names if names is not None else stepper.names,
    }
