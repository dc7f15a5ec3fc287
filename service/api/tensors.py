"""Routes that move tensors: step, parameters, Adam state."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from client import codec
from client.protocol import META_GROUPS, StepResult

from ..engine import STATE_KEYS
from ..engine.errors import InvalidState
from ..errors import ApiError, problems
from .options import group_updates_from_json
from .steppers import NAME_PROBLEMS, registry
from .wire import (
    OCTET,
    TensorFormat,
    binary_body_doc,
    decode_tensors,
    json_object,
    json_tensors,
    media_type,
    meta_json,
    read_body,
    tensor_response,
    wants_json,
)

__all__ = ["router", "split_state_key"]

router = APIRouter(tags=["tensors"])

BODY_PROBLEMS = ("malformed_body", "payload_too_large", "unsupported_media_type")
TENSOR_PROBLEMS = ("unknown_parameter", "shape_mismatch", "dtype_mismatch")

Names = Annotated[list[str] | None, Query(alias="name", description="parameter names; all if none")]
Format = Annotated[TensorFormat | None, Query(
    description="safetensors (default) or json; JSON is also chosen by Accept: application/json"
)]


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
                raise ApiError("malformed_body", f"a JSON tensor's shape must be a list, "
                                                 f"got {declared!r}")
        value = value["data"]
    t = codec.tensor_from_json(value, dtype, declared)
    if declared is None and shape is not None and t.numel() == 0 and math.prod(shape) == 0:
        t = t.reshape(shape)  # [] is how nested lists spell any empty tensor
    return t


async def _body_tensors(request: Request) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    body = await read_body(request)
    kind = media_type(request)
    if kind not in (OCTET, ""):
        raise ApiError("unsupported_media_type", f"Content-Type {kind!r}: send {OCTET}")
    return decode_tensors(body)


@router.post(
    "/steppers/{name}/step",
    summary="Apply one Adam step",
    response_model=StepResult,
    responses={
        200: {"content": {OCTET: {"schema": {"type": "string", "format": "binary"}}},
              "description": "StepResult JSON, or with return_params=true the updated "
                             "parameters as safetensors (metadata: step, stepped)"},
        **problems(*NAME_PROBLEMS, *BODY_PROBLEMS, *TENSOR_PROBLEMS, "invalid_hyperparameter",
                   "invalid_state"),
    },
    openapi_extra=binary_body_doc(
        "safetensors of gradients by parameter name; a parameter without one does not step "
        f"(as with p.grad = None). Optional __metadata__['{META_GROUPS}']: a JSON list with "
        "one object of option changes per param group, applied atomically before the step."
    ),
)
async def step(
    name: str,
    request: Request,
    return_params: Annotated[bool, Query(description="answer with the updated parameters")] = False,
) -> Response:
    stepper = registry(request).get(name)
    grads, metadata = await _body_tensors(request)
    groups = group_updates_from_json(meta_json(metadata, META_GROUPS))
    outcome = await run_in_threadpool(stepper.step, grads, groups, return_params)
    if outcome.params is not None:
        return tensor_response(outcome.params, name, outcome.step,
                               {"adamscope.stepped": json.dumps(outcome.stepped)})
    result = StepResult(stepper=name, step=outcome.step, stepped=outcome.stepped,
                        skipped=outcome.skipped)
    return JSONResponse(result.model_dump())


@router.get(
    "/steppers/{name}/params",
    summary="Read parameter values",
    responses={200: {"content": {OCTET: {}, "application/json": {}},
                     "description": "safetensors (metadata adamscope.step) or JSON"},
               **problems(*NAME_PROBLEMS, "unknown_parameter", "json_too_large")},
)
async def get_params(name: str, request: Request, names: Names = None,
                     format: Format = None) -> Response:
    step_count, tensors = registry(request).get(name).get_params(names)
    if wants_json(request, format):
        return JSONResponse({"stepper": name, "step": step_count,
                             "params": json_tensors(request, tensors)})
    return tensor_response(tensors, name, step_count)


@router.put(
    "/steppers/{name}/params",
    summary="Overwrite some or all parameter values",
    responses=problems(*NAME_PROBLEMS, *BODY_PROBLEMS, *TENSOR_PROBLEMS),
    openapi_extra=binary_body_doc(
        "safetensors of values by parameter name, or JSON {\"params\": {name: nested list}}",
        {"type": "object", "properties": {"params": {"type": "object"}}},
    ),
)
async def put_params(name: str, request: Request) -> dict[str, Any]:
    stepper = registry(request).get(name)
    if media_type(request) == "application/json":
        raw = json_object(await read_body(request)).get("params")
        if not isinstance(raw, dict):
            raise ApiError("malformed_body", "JSON body must be {\"params\": {name: values}}")
        tensors = {}
        for pname, value in raw.items():
            shape, dtype = stepper.param_meta(pname)
            tensors[pname] = _json_tensor_in(value, dtype, shape)
    else:
        tensors, _ = await _body_tensors(request)
    await run_in_threadpool(stepper.put_params, tensors)
    return {"stepper": name, "step": stepper.step_count, "updated": list(tensors)}


@router.get(
    "/steppers/{name}/state",
    summary="Read Adam state (step, exp_avg, exp_avg_sq, max_exp_avg_sq)",
    responses={200: {"content": {OCTET: {}, "application/json": {}},
                     "description": "safetensors named '<param>.<key>' or JSON"},
               **problems(*NAME_PROBLEMS, "unknown_parameter", "invalid_state",
                          "json_too_large")},
)
async def get_state(
    name: str, request: Request, names: Names = None,
    keys: Annotated[list[str] | None, Query(alias="key", description="state keys; all if none")]
    = None,
    format: Format = None,
) -> Response:
    step_count, state = registry(request).get(name).get_state(names, keys)
    if wants_json(request, format):
        flat = [t for s in state.values() for t in s.values()]
        json_tensors(request, {str(i): t for i, t in enumerate(flat)})  # size check only
        return JSONResponse({
            "stepper": name, "step": step_count,
            "state": {p: {k: codec.tensor_to_json(t) for k, t in s.items()}
                      for p, s in state.items()},
        })
    flat_named = {f"{p}.{k}": t for p, s in state.items() for k, t in s.items()}
    return tensor_response(flat_named, name, step_count)


@router.put(
    "/steppers/{name}/state",
    summary="Load Adam state (all, some parameters, or single tensors) and options",
    responses=problems(*NAME_PROBLEMS, *BODY_PROBLEMS, *TENSOR_PROBLEMS, "invalid_state",
                       "invalid_hyperparameter"),
    openapi_extra=binary_body_doc(
        "safetensors named '<param>.<key>' (key: step, exp_avg, exp_avg_sq, max_exp_avg_sq); "
        f"optional __metadata__['{META_GROUPS}'] with every group's options (as in a PyTorch "
        "state_dict). Or JSON {\"state\": {param: {key: values}}, \"param_groups\": [...]}.",
        {"type": "object", "properties": {"state": {"type": "object"},
                                          "param_groups": {"type": "array"}}},
    ),
)
async def put_state(
    name: str, request: Request,
    replace: Annotated[bool, Query(description="drop state not in the body (a full load)")]
    = False,
) -> dict[str, Any]:
    stepper = registry(request).get(name)
    nested: dict[str, dict[str, torch.Tensor]] = {}
    if media_type(request) == "application/json":
        body = json_object(await read_body(request))
        raw_state = body.get("state", {})
        if not isinstance(raw_state, dict):
            raise ApiError("malformed_body", "'state' must map parameter names to objects")
        for pname, entries in raw_state.items():
            if not isinstance(entries, dict):
                raise ApiError("malformed_body", f"state of {pname!r} must be an object")
            shape, dtype = stepper.param_meta(pname)
            nested[pname] = {
                k: _json_tensor_in(v, torch.float32 if k == "step" else dtype,
                                   None if k == "step" else shape)
                for k, v in entries.items()
            }
        groups = group_updates_from_json(body.get("param_groups"))
    else:
        tensors, metadata = await _body_tensors(request)
        for key, t in tensors.items():
            pname, which = split_state_key(key)
            nested.setdefault(pname, {})[which] = t
        groups = group_updates_from_json(meta_json(metadata, META_GROUPS))
    await run_in_threadpool(stepper.put_state, nested, groups, replace)
    return {"stepper": name, "step": stepper.step_count, "updated": sorted(nested)}


@router.delete(
    "/steppers/{name}/state",
    summary="Forget Adam state of some or all parameters (they restart at step 0)",
    responses=problems(*NAME_PROBLEMS, "unknown_parameter"),
)
async def reset_state(name: str, request: Request, names: Names = None) -> dict[str, Any]:
    stepper = registry(request).get(name)
    await run_in_threadpool(stepper.reset_state, names)
    return {"stepper": name, "step": stepper.step_count,
            "reset": names if names is not None else stepper.names}
