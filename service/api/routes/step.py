"""Routes that step: one Adam step (or a worker's contribution to one), and committing the
contributions that have arrived. The work is :class:`~..stepping.Step`'s."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response

from adamscope.client.constants import META_GROUPS
from adamscope.client.protocol import StepResult

from ...errors import problems
from ..access import require
from ..deps import NAME_PROBLEMS, registry, serving
from ..durability import persist_after
from ..http.media import OCTET, binary_body_doc
from ..http.query import parse_query, query_doc
from ..stepping import Step, StepQuery, result
from .tensors import BODY_PROBLEMS, TENSOR_PROBLEMS

__all__ = ["router"]

router = APIRouter(tags=["tensors"])


@router.post(
    "/steppers/{name}/step",
    summary="Apply one Adam step (or contribute to one)",
    dependencies=[Depends(require("write"))],
    response_model=StepResult,
    responses={
        200: {
            "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}},
            "description": "StepResult JSON, or with return_params=true the updated "
            "parameters as safetensors (metadata: step, stepped, skipped)",
        },
        202: {
            "model": StepResult,
            "description": "a contribution was recorded; the step waits for the others",
        },
        **problems(
            *NAME_PROBLEMS,
            *BODY_PROBLEMS,
            *TENSOR_PROBLEMS,
            "invalid_hyperparameter",
            "invalid_state",
            "invalid_spec",
            "step_conflict",
            "stepper_frozen",
            "stepper_watched",
            "persistence_failed",
            "device_out_of_memory",
        ),
    },
    openapi_extra={
        **binary_body_doc(
            "safetensors of gradients by parameter name; a parameter without one does not step "
            f"(as with p.grad = None). Optional __metadata__['{META_GROUPS}']: a JSON list with "
            "one object of option changes per param group, applied atomically before the step."
        ),
        "parameters": query_doc(StepQuery),
    },
)
async def step(
    name: str,
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="a retried request with the same key is not applied again: the "
            "original result is returned",
        ),
    ] = None,
) -> Response:
    query = parse_query(request, StepQuery)
    return await Step(request, registry(request).get(name), query, idempotency_key).run()


@router.post(
    "/steppers/{name}/commit",
    summary="Accumulate mode: apply the pending step with the contributions so far",
    dependencies=[Depends(require("write"))],
    response_model=StepResult,
    responses=problems(
        *NAME_PROBLEMS,
        "step_conflict",
        "stepper_frozen",
        "stepper_watched",
        "persistence_failed",
        "device_out_of_memory",
    ),
)
async def commit(name: str, request: Request) -> dict[str, Any]:
    stepper = registry(request).get(name)
    serve = serving(request)
    async with serve.hold(stepper):
        outcome = await serve.off_loop(stepper, stepper.commit)
        await persist_after(request, stepper, "step")
        serve.step_applied(stepper)
        await serve.settled(stepper)
    return result(name, outcome).model_dump()
