"""Routes that move tensors: step, parameters, Adam state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from adamscope.client import codec
from adamscope.client.protocol import INT64_MAX, META_GROUPS, StepResult

from ...engine import STATE_KEYS, StepOutcome, Stepper
from ...engine.errors import InvalidSpec, InvalidState, StepConflict
from ...errors import ApiError, problems
from ..access import require
from ..durability import persist_after
from ..options import group_updates_from_json
from ..http.query import parse_query, query_doc
from .steppers import NAME_PROBLEMS, registry
from ..http.stream import (
    TensorStreamResponse,
    WireLayout,
    gate,
    header_limit,
    ingest_layout,
    ingest_tensors,
    off_loop,
    settle_and_release,
    settled,
    step_applied,
    step_applied_event,
    step_layouts,
)
from ..http.body import (
    OCTET,
    TensorFormat,
    binary_body_doc,
    json_tensors,
    media_type,
    meta_json,
    read_json_object,
    tensor_response,
    wants_json,
)

__all__ = ["router", "split_state_key"]

router = APIRouter(tags=["tensors"])

BODY_PROBLEMS = ("malformed_body", "payload_too_large", "unsupported_media_type",
                 "request_timeout")
TENSOR_PROBLEMS = ("unknown_parameter", "shape_mismatch", "dtype_mismatch")

Names = Annotated[list[str] | None, Query(alias="name", description="parameter names; all if none")]
Format = Annotated[TensorFormat | None, Query(
    description="safetensors (default) or json; JSON is also chosen by Accept: application/json"
)]


WireDtype = Literal["bfloat16", "float16"]


def widen(stepper: Stepper, name: str, g: torch.Tensor) -> torch.Tensor:
    """A gradient received in a lossy wire dtype, copied into the parameter-dtype buffer."""
    buf = stepper.grad_buffer(name)
    return g if g.dtype == buf.dtype else buf.copy_(g)


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


class StepQuery(BaseModel):
    """A step's query parameters (validated in one pass: a step is the hot path)."""

    return_params: bool = Field(False, description="answer with the updated parameters")
    only_stepped: bool = Field(
        False, description="with return_params: only the parameters this step changed")
    wire_dtype: WireDtype | None = Field(
        None, description="LOSSY: gradients may arrive, and parameters are returned, in this "
                          "16-bit dtype (half the bytes); the stepper itself keeps full precision")
    expected_step: int | None = Field(
        None, ge=0, le=INT64_MAX,
        description="the step the stepper must be at, else 409 step_conflict")
    contributors: int | None = Field(
        None, ge=1, le=1024, description="accumulate mode: apply the step once this many "
                                         "workers contributed, with the mean of their gradients")
    worker: int | None = Field(None, ge=0, le=INT64_MAX,
                               description="accumulate mode: this worker's id")
    wait: float = Field(0.0, ge=0, le=600, description="accumulate mode: seconds to wait for "
                                                       "the step to be applied before "
                                                       "answering 202 (pending)")


@router.post(
    "/steppers/{name}/step",
    summary="Apply one Adam step (or contribute to one)",
    dependencies=[Depends(require("write"))],
    response_model=StepResult,
    responses={
        200: {"content": {OCTET: {"schema": {"type": "string", "format": "binary"}}},
              "description": "StepResult JSON, or with return_params=true the updated "
                             "parameters as safetensors (metadata: step, stepped, skipped)"},
        202: {"model": StepResult,
              "description": "a contribution was recorded; the step waits for the others"},
        **problems(*NAME_PROBLEMS, *BODY_PROBLEMS, *TENSOR_PROBLEMS, "invalid_hyperparameter",
                   "invalid_state", "invalid_spec", "step_conflict", "persistence_failed",
                   "device_out_of_memory"),
    },
    openapi_extra={**binary_body_doc(
        "safetensors of gradients by parameter name; a parameter without one does not step "
        f"(as with p.grad = None). Optional __metadata__['{META_GROUPS}']: a JSON list with "
        "one object of option changes per param group, applied atomically before the step."
    ), "parameters": query_doc(StepQuery)},
)
async def step(
    name: str,
    request: Request,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", min_length=1, max_length=200,
        description="a retried request with the same key is not applied again: the "
                    "original result is returned",
    )] = None,
) -> Response:
    query = parse_query(request, StepQuery)
    return_params, only_stepped, wire_dtype = (query.return_params, query.only_stepped,
                                               query.wire_dtype)
    expected_step, contributors, worker, wait = (query.expected_step, query.contributors,
                                                 query.worker, query.wait)
    stepper = registry(request).get(name)
    if (contributors is None) != (worker is None):
        raise InvalidSpec("accumulate mode needs both 'contributors' and 'worker'")
    lock: asyncio.Lock | None = gate(stepper)
    assert lock is not None
    await lock.acquire()
    try:
        lossy = codec.dtype_from_name(wire_dtype) if wire_dtype else None
        got = await ingest_layout(
            request, step_layouts.get(stepper), lossy,
            lambda e: stepper.check_gradient(e.name, e.shape, e.dtype, lossy),
            lambda e: stepper.grad_buffer(e.name, e.dtype), pin=stepper.device.type == "cuda",
            header_bytes=header_limit(stepper))
        if isinstance(got, WireLayout):
            step_layouts[stepper] = got
            received, metadata = got.tensors, dict(got.metadata)
        else:
            received, metadata = got
        groups = group_updates_from_json(meta_json(metadata, META_GROUPS))
        target = stepper.step_count + 1

        def apply() -> StepOutcome | None:
            grads = (received if lossy is None else
                     {n: widen(stepper, n, g) for n, g in received.items()})
            if contributors is not None and worker is not None:
                if groups is not None:
                    raise InvalidSpec("contributions cannot change options; use PATCH")
                return stepper.contribute(worker, contributors, grads, idempotency_key,
                                          expected_step)
            return stepper.step(grads, groups, key=idempotency_key, expected_step=expected_step)

        outcome = await off_loop(stepper, apply)
        await persist_after(request, stepper, "step")
        if outcome is not None and not outcome.replayed:
            step_applied(stepper)
        if outcome is None:
            if wait <= 0:
                return _pending(stepper)
            applied = step_applied_event(stepper)
            lock.release()
            lock = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(applied.wait(), wait)
            lock = gate(stepper)
            await lock.acquire()
            if stepper.step_count < target:
                return _pending(stepper)
            recorded = stepper.recorded(idempotency_key) if idempotency_key else None
            outcome = recorded or StepOutcome(target, [], [])
        if not return_params:
            held = lock
            lock = None  # released once the reply has left, as below
            return JSONResponse(_result(name, outcome).model_dump(), background=BackgroundTask(
                settle_and_release, stepper, held))
        if outcome.step != stepper.step_count:
            raise StepConflict(
                f"step {outcome.step} was applied, but stepper {name!r} has moved on to step "
                f"{stepper.step_count}: the parameters of step {outcome.step} are gone",
                current_step=stepper.step_count)

        def reply_params() -> dict[str, torch.Tensor]:
            names = outcome.stepped if only_stepped else stepper.names
            params = stepper.host_params(names)
            if lossy is not None:
                params = {n: t.to(lossy) if t.is_floating_point() and t.dtype != lossy else t
                          for n, t in params.items()}
            return params

        params = await off_loop(stepper, reply_params)
        held = lock
        response = TensorStreamResponse(
            params, name, outcome.step, {"adamscope.stepped": json.dumps(outcome.stepped),
                                         "adamscope.skipped": json.dumps(outcome.skipped),
                                         "adamscope.replayed": json.dumps(outcome.replayed)},
            release=lambda: settle_and_release(stepper, held),
        )
        # The response opens the gate once its bytes have left and the step's signals and
        # history (deferred off the reply path) are recorded.
        lock = None
        return response
    finally:
        if lock is not None:
            await settle_and_release(stepper, lock)




def _result(name: str, outcome: StepOutcome) -> StepResult:
    return StepResult(stepper=name, step=outcome.step, stepped=outcome.stepped,
                      skipped=outcome.skipped, replayed=outcome.replayed)


def _pending(stepper: Stepper) -> JSONResponse:
    result = StepResult(stepper=stepper.name, step=stepper.step_count, stepped=[], skipped=[],
                        applied=False, pending=stepper.pending_contributions())
    return JSONResponse(result.model_dump(), status_code=202)


@router.post(
    "/steppers/{name}/commit",
    summary="Accumulate mode: apply the pending step with the contributions so far",
    dependencies=[Depends(require("write"))],
    response_model=StepResult,
    responses=problems(*NAME_PROBLEMS, "step_conflict", "persistence_failed",
                       "device_out_of_memory"),
)
async def commit(name: str, request: Request) -> dict[str, Any]:
    stepper = registry(request).get(name)
    async with gate(stepper):
        outcome = await off_loop(stepper, stepper.commit)
        await persist_after(request, stepper, "step")
        step_applied(stepper)
        await settled(stepper)
    return _result(name, outcome).model_dump()


@router.get(
    "/steppers/{name}/params",
    summary="Read parameter values",
    dependencies=[Depends(require("read"))],
    responses={200: {"content": {OCTET: {}, "application/json": {}},
                     "description": "safetensors (metadata adamscope.step) or JSON"},
               **problems(*NAME_PROBLEMS, "unknown_parameter", "json_too_large")},
)
async def get_params(name: str, request: Request, names: Names = None,
                     format: Format = None) -> Response:
    stepper = registry(request).get(name)
    # Off the event loop: the copy waits for the stepper's lock, which a long step holds.
    step_count, tensors = await off_loop(stepper, lambda: stepper.get_params(names))
    if wants_json(request, format):
        return JSONResponse({"stepper": name, "step": step_count,
                             "params": json_tensors(request, tensors)})
    return tensor_response(tensors, name, step_count)


@router.put(
    "/steppers/{name}/params",
    summary="Overwrite some or all parameter values",
    dependencies=[Depends(require("write"))],
    responses=problems(*NAME_PROBLEMS, *BODY_PROBLEMS, *TENSOR_PROBLEMS,
                       "device_out_of_memory"),
    openapi_extra=binary_body_doc(
        "safetensors of values by parameter name, or JSON {\"params\": {name: nested list}}",
        {"type": "object", "properties": {"params": {"type": "object"}}},
    ),
)
async def put_params(name: str, request: Request) -> dict[str, Any]:
    stepper = registry(request).get(name)
    if media_type(request) == "application/json":
        raw = (await read_json_object(request)).get("params")
        if not isinstance(raw, dict):
            raise ApiError("malformed_body", "JSON body must be {\"params\": {name: values}}")
        tensors = {}
        for pname, value in raw.items():
            shape, dtype = stepper.param_meta(pname)
            tensors[pname] = _json_tensor_in(value, dtype, shape)
    else:
        tensors, _ = await ingest_tensors(request, stepper, _value_destination(stepper))
    async with gate(stepper):
        await run_in_threadpool(stepper.put_params, tensors)
        await persist_after(request, stepper)
    return {"stepper": name, "step": stepper.step_count, "updated": list(tensors)}


@router.get(
    "/steppers/{name}/state",
    summary="Read Adam state (step, exp_avg, exp_avg_sq, max_exp_avg_sq)",
    dependencies=[Depends(require("read"))],
    responses={200: {"content": {OCTET: {}, "application/json": {}},
                     "description": "safetensors named '<param>.<key>' (with with_params=true "
                                    "also '<param>.param') or JSON; metadata adamscope.step "
                                    "is the step every tensor of the reply belongs to"},
               **problems(*NAME_PROBLEMS, "unknown_parameter", "invalid_state",
                          "json_too_large")},
)
async def get_state(
    name: str, request: Request, names: Names = None,
    keys: Annotated[list[str] | None, Query(alias="key", description="state keys; all if none")]
    = None,
    format: Format = None,
    with_params: Annotated[bool, Query(
        description="also return each parameter's value, as '<param>.param' (JSON: key "
                    "'param'), read together with the state: parameters and state are then "
                    "one consistent snapshot of the reported step, never a mix of two steps"
    )] = False,
) -> Response:
    stepper = registry(request).get(name)
    step_count, state = await off_loop(
        stepper, lambda: stepper.get_state(names, keys, with_params))
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
    dependencies=[Depends(require("write"))],
    responses=problems(*NAME_PROBLEMS, *BODY_PROBLEMS, *TENSOR_PROBLEMS, "invalid_state",
                       "invalid_hyperparameter", "device_out_of_memory"),
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
        body = await read_json_object(request)
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
        tensors, metadata = await ingest_tensors(request, stepper, _state_destination(stepper))
        for key, t in tensors.items():
            pname, which = split_state_key(key)
            nested.setdefault(pname, {})[which] = t
        groups = group_updates_from_json(meta_json(metadata, META_GROUPS))
    async with gate(stepper):
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
    async with gate(stepper):
        await run_in_threadpool(stepper.reset_state, names)
        await persist_after(request, stepper)
    return {"stepper": name, "step": stepper.step_count,
            "reset": names if names is not None else stepper.names}
