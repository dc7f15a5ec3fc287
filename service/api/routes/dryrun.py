"""``POST /steppers/{name}/dry-run``: what a step with these gradients would do, without
doing it (:mod:`adamscope.service.inspect.dryrun`). It changes nothing, so it needs the
``read`` scope; its cost is a real step's (plus a copy of the stepped tensors' state),
bounded like a step's by the body limit and run off the event loop."""

from __future__ import annotations

from typing import Any

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import Field

from adamscope.client import codec
from adamscope.client.constants import META_DRY_RUN, META_GROUPS

from ...errors import problems
from ...inspect.dryrun import DryRun, dry_run
from ...inspect.stats import EXACT_LIMIT, Described, Source, StatsSpec, aggregate, describe
from ..access import require
from ..deps import NAME_PROBLEMS, registry, serving
from ..http.body import meta_json
from ..http.ingest import ingest_tensors
from ..http.media import OCTET, binary_body_doc
from ..http.query import parse_query, query_doc
from ..http.reply import TensorStreamResponse, json_response, render_json
from ..options import group_updates_from_json
from .stats import SpecQuery

__all__ = ["router"]

router = APIRouter(tags=["inspection"])


def _difference(after: torch.Tensor, before: torch.Tensor) -> Source:
    """``after - before`` elementwise, in float32 (float64 for float64 tensors)."""
    wide = torch.float64 if after.dtype in (torch.float64, torch.complex128) else torch.float32
    return Source.derived([after, before], lambda a, b: a.to(wide) - b.to(wide), wide)


def _report(run: DryRun, spec: StatsSpec) -> dict[str, Any]:
    tensors: dict[str, dict[str, Any]] = {}
    parts: dict[str, list[Described]] = {"update": [], "grad": []}
    kept = 0  # finite values kept for exact aggregates, at most EXACT_LIMIT per key
    for n in run.stepped:
        numel = run.grads[n].numel() * (2 if run.grads[n].is_complex() else 1)
        keep = kept + numel <= EXACT_LIMIT
        kept += numel if keep else 0
        described = {
            "update": describe(_difference(run.after[n], run.before[n]), spec, keep_values=keep),
            "grad": describe(Source.of(run.grads[n]), spec, keep_values=keep),
        }
        tensors[n] = {k: d.stats for k, d in described.items()}
        for k, d in described.items():
            parts[k].append(d)
    return {
        "step": run.step,
        "stepped": run.stepped,
        "skipped": run.skipped,
        "tensors": tensors,
        "aggregate": {k: aggregate(v, spec) for k, v in parts.items() if v},
        "signals": run.signals,
    }


class DryRunQuery(SpecQuery):
    return_update: bool = Field(
        False, description="answer with the would-be tensors as safetensors"
    )


@router.post(
    "/steppers/{name}/dry-run",
    summary="What a step with these gradients would do, without doing it",
    dependencies=[Depends(require("read"))],
    responses={
        200: {
            "content": {"application/json": {}, OCTET: {}},
            "description": "JSON report (per tensor: statistics of the update and the "
            "gradient; aggregate; the step's signals), or with "
            "return_update=true safetensors '<param>.update', "
            "'<param>.param' (the would-be value) and '<param>.<state key>' "
            f"(the would-be state), the report in __metadata__"
            f"['{META_DRY_RUN}']",
        },
        **problems(
            *NAME_PROBLEMS,
            "malformed_body",
            "payload_too_large",
            "unsupported_media_type",
            "request_timeout",
            "unknown_parameter",
            "shape_mismatch",
            "dtype_mismatch",
            "invalid_hyperparameter",
            "invalid_state",
            "device_out_of_memory",
        ),
    },
    openapi_extra={
        **binary_body_doc(
            "safetensors of gradients by parameter name, as for a step (optional "
            f"__metadata__['{META_GROUPS}'] option changes included)"
        ),
        "parameters": query_doc(DryRunQuery),
    },
)
async def dry_run_route(name: str, request: Request) -> Response:
    q = parse_query(request, DryRunQuery)
    spec, return_update = q.spec(), q.return_update
    stepper = registry(request).get(name)

    def destination(entry: codec.Entry) -> torch.Tensor:
        stepper.check_gradient(entry.name, entry.shape, entry.dtype)
        return torch.empty(entry.shape, dtype=entry.dtype)

    grads, metadata = await ingest_tensors(
        request, serving(request).of(stepper).header_limit, destination
    )
    groups = group_updates_from_json(meta_json(metadata, META_GROUPS))

    def run() -> tuple[DryRun, dict[str, Any]]:
        result = dry_run(stepper, grads, groups)
        return result, _report(result, spec)

    result, report = await serving(request).off_loop(stepper, run)
    body = {"stepper": name, **report}
    if not return_update:
        return json_response(body)
    tensors: dict[str, torch.Tensor] = {}
    for n in result.stepped:
        tensors[f"{n}.update"] = (result.after[n] - result.before[n]).cpu()
        tensors[f"{n}.param"] = result.after[n].cpu()
        for k, v in result.state[n].items():
            tensors[f"{n}.{k}"] = v.detach().cpu()
    return TensorStreamResponse(
        tensors, name, result.step, {META_DRY_RUN: render_json(body).decode()}
    )
