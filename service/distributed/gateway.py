"""Routes the ingress answers across slots (``(ingress, request) -> Response``), and what
it adds when one slot answers about its stepper.

The ingress answers ``/healthz`` itself (with the slots), lists steppers across slots,
joins the slots' ``/v1/events`` streams (adding ``recovered`` events) and their
``/metrics``, and places new steppers (:mod:`.creation`). A stepper's summary gets its
placement; a step without an idempotency key gets one, so that it can be sent again after
a recovery.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import problem_response
from . import merge
from .ingress import Ingress, first_error

__all__ = [
    "ClusterHandler",
    "SingleHandler",
    "anywhere",
    "delete_stepper",
    "diff",
    "events",
    "forward",
    "healthz",
    "import_checkpoint",
    "list_steppers",
    "metrics",
    "step",
    "summary",
]

ClusterHandler = Callable[[Ingress, Request], Awaitable[Response]]
#: Serves a request about an unsharded stepper held by slot ``slot``.
SingleHandler = Callable[[Ingress, int, Request], Awaitable[Response]]


async def anywhere(ingress: Ingress, request: Request) -> Response:
    """What no one stepper is about (the dashboard's files, the API document, identity):
    any live slot answers."""
    return await ingress.anywhere(request)


async def healthz(ingress: Ingress, request: Request) -> Response:
    slots = ingress.cluster.describe()
    ok = all(s["state"] == "ok" for s in slots)
    # Public: counts only, never stepper names (a caller without a token could not list them).
    return JSONResponse(
        {
            "status": "ok" if ok else "degraded",
            "mode": "ray",
            "slots": slots,
            "sharded": len(ingress.cluster.sharded),
        }
    )


async def list_steppers(ingress: Ingress, request: Request) -> Response:
    replies = await asyncio.gather(
        *(
            ingress.call(
                s.index, request, "GET", request.url.path, request.query_params.multi_items(), None
            )
            for s in ingress.cluster.slots
            if s.state == "ok"
        )
    )
    error = first_error(replies)
    if error is not None:
        return error
    by_name: dict[str, list[dict[str, Any]]] = {}
    for _, _, content in replies:
        for found in json.loads(content)["steppers"]:
            by_name.setdefault(found["name"], []).append(found)
    out = []
    for name in sorted(by_name):
        record = ingress.record(name)
        parts = by_name[name]
        merged = merge.summaries(record, parts) if record else parts[0]
        merged["placement"] = ingress.cluster.placement(name)
        out.append(merged)
    return JSONResponse({"steppers": out})


async def events(ingress: Ingress, request: Request) -> Response:
    return StreamingResponse(
        ingress.events(request),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache"},
    )


async def metrics(ingress: Ingress, request: Request) -> Response:
    replies = await asyncio.gather(
        *(
            ingress.call(s.index, request, "GET", request.url.path, [], None)
            for s in ingress.cluster.slots
            if s.state == "ok"
        )
    )
    error = first_error(replies)
    if error is not None:
        return error
    media = replies[0][1].get("content-type", "text/plain") if replies else "text/plain"
    return Response(merge.join_metrics([c for _, _, c in replies]), media_type=media)


async def import_checkpoint(ingress: Ingress, request: Request) -> Response:
    """A checkpoint file becomes a stepper on any slot; the cluster then learns where."""
    response = await ingress.anywhere(request)
    await ingress.cluster.refresh()
    return response


async def diff(ingress: Ingress, request: Request) -> Response:
    """A diff of two steppers is answered by the slot holding both."""
    names = [request.query_params.get(side, "").partition("/")[0] for side in ("a", "b")]
    if any(n in ingress.cluster.sharded for n in names):
        return problem_response(
            "not_supported_sharded",
            "a diff of a sharded stepper is not "
            "merged; compare its shards' tensors by name instead",
            request.url.path,
        )
    held = {slot for n in names if n and (slot := await ingress.slot_for(n)) is not None}
    if len(held) > 1:
        return problem_response(
            "not_supported_sharded",
            f"steppers {names} are on different slots: a diff needs both on one",
            request.url.path,
        )
    if not held:
        return await ingress.anywhere(request)  # a slot's service says what is missing
    return await ingress.forward(request, held.pop())


async def forward(ingress: Ingress, slot: int, request: Request) -> Response:
    return await ingress.forward(request, slot)


async def summary(ingress: Ingress, slot: int, request: Request) -> Response:
    status, headers, content = await ingress.call(slot, request, "GET", request.url.path, [], None)
    if status != 200:
        return Response(content, status_code=status, media_type=headers.get("content-type"))
    found = json.loads(content)
    found["placement"] = ingress.cluster.placement(found.get("name", ""))
    return JSONResponse(found)


async def delete_stepper(ingress: Ingress, slot: int, request: Request) -> Response:
    response = await ingress.forward(request, slot)
    await ingress.cluster.refresh(slot)
    return response


async def step(ingress: Ingress, slot: int, request: Request) -> Response:
    extra = None
    if "idempotency-key" not in request.headers:
        # A key of its own makes the step safe to send again after a recovery.
        extra = {"idempotency-key": f"ingress-{uuid.uuid4().hex}"}
    return await ingress.forward(request, slot, extra_headers=extra)
