"""``GET /v1/steppers/{name}/histograms``: a tensor's histograms over time, the columns
of a heat map (TensorBoard's histograms, as counts per fixed log10|x| bin per step).

Recorded every ``HISTOGRAM_EVERY`` steps by the signals pass (see
:mod:`adamscope.service.inspect.kernels.histogram` for the bins and the bound of a sampled
tensor's counts) and kept, bounded, beside the history
(:mod:`adamscope.service.inspect.histogram_store`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from adamscope.client.protocol import INT64_MAX

from ...engine.errors import UnknownParameter
from ...errors import problems
from ...inspect.kernels.histogram import HISTOGRAM_EVERY, SAMPLE
from ..access import require
from ..deps import NAME_PROBLEMS, registry, serving
from ..http.reply import json_response
from .history import observer

__all__ = ["TENSOR_QUERY", "get_histograms", "router"]

router = APIRouter(tags=["history"])

#: The query parameter naming the tensor (the distributed ingress forwards by it).
TENSOR_QUERY = "tensor"
Key = Literal["grad", "exp_avg", "exp_avg_sq", "lr_eff"]


@router.get(
    "/steppers/{name}/histograms",
    summary="A tensor's histograms over time: counts of log10|x| in fixed bins, one column "
    f"every {HISTOGRAM_EVERY} steps (exact for tensors of at most {SAMPLE} elements, else "
    "estimated from a uniform sample with the stated rank_error)",
    dependencies=[Depends(require("read"))],
    responses=problems(*NAME_PROBLEMS, "unknown_parameter"),
)
async def get_histograms(
    name: str,
    request: Request,
    tensor: Annotated[str, Query(alias=TENSOR_QUERY, description="the parameter tensor")],
    key: Annotated[Key, Query(description="the quantity binned")] = "exp_avg",
    first: Annotated[
        int, Query(alias="from", ge=0, le=INT64_MAX, description="from this step")
    ] = 0,
    last: Annotated[
        int, Query(alias="to", ge=0, le=INT64_MAX, description="up to this step")
    ] = INT64_MAX,
    max_columns: Annotated[
        int, Query(ge=1, le=10_000, description="most columns (steps), evenly picked")
    ] = 500,
) -> Response:
    stepper = await serving(request).settled(registry(request).get(name))
    if tensor not in stepper.index:
        raise UnknownParameter(f"stepper {name!r} has no parameter {tensor!r}", parameter=tensor)
    store = observer(stepper).histograms
    found = await run_in_threadpool(store.span, tensor, key, first, last, max_columns)
    return json_response(
        {
            "stepper": name,
            "tensor": tensor,
            "key": key,
            "every": HISTOGRAM_EVERY,
            "sample": SAMPLE,
            "scale": "log10|x|",
            **found,
        }
    )
