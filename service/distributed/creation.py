"""Creating a stepper on the cluster: placed on the slot with the most room, or split by
parameter tensors over several slots (a sharded stepper) when it is larger than one slot's
room or created with ``?shards=N``. What the ingress cannot place it says itself; anything
else wrong with the request, a slot's service says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from adamscope.client import codec
from adamscope.client.constants import API_PREFIX, META_SPEC

from ..engine.footprint import Footprint, footprint
from ..engine.options import default_options
from ..errors import problem_response
from . import merge
from .cluster import Shard, ShardedRecord
from .ingress import Ingress, first_error
from .shards import Body, parse, split

__all__ = ["create"]


async def create(ingress: Ingress, request: Request) -> Response:
    """``POST /v1/steppers`` on the cluster."""
    body = await request.body()
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        name, sizes, spec, tensors = _creation(kind, body)
    except (ValueError, KeyError, TypeError, AttributeError, codec.CodecError):
        name, sizes, spec, tensors = None, [], {}, None
    if name is None or not sizes:  # let a slot's service say what is wrong
        return await ingress.anywhere(request)
    path = request.url.path
    raw_shards = request.query_params.get("shards")
    try:
        shards = int(raw_shards) if raw_shards is not None else None
        if shards is not None and shards < 1:
            raise ValueError
    except ValueError:
        return problem_response(
            "invalid_spec", f"shards must be a positive integer, not {raw_shards!r}", path
        )
    if ingress.cluster.slot_of(name) is not None or name in ingress.cluster.sharded:
        return problem_response(
            "stepper_exists", f"a stepper named {name!r} already exists", path, stepper=name
        )
    need = _need(spec)
    try:
        plan = ingress.cluster.plan(sizes, need, shards)
    except MemoryError as e:
        return problem_response("memory_budget_exceeded", str(e), path)
    except RuntimeError as e:
        return problem_response("slot_unavailable", str(e), path)
    ingress.cluster.reserve(name, plan, sizes, need)
    if len(plan) == 1:
        return await _create_on_one(ingress, request, name, plan[0], body)
    if len(spec.get("groups") or []) > 1:
        return problem_response(
            "invalid_spec",
            "a sharded stepper has one parameter group "
            "(its options apply to every shard); create it with one group",
            path,
        )
    async with ingress.lock(name):
        return await _create_sharded(ingress, request, name, plan, sizes, spec, tensors)


async def _create_on_one(
    ingress: Ingress, request: Request, name: str, shard: Shard, body: bytes
) -> Response:
    status, headers, content = await ingress.call(
        shard.slot,
        request,
        "POST",
        request.url.path,
        request.query_params.multi_items(),
        body,
        retry=False,
    )
    await ingress.cluster.refresh(shard.slot)
    if status != 201:
        return Response(content, status_code=status, media_type=headers.get("content-type"))
    created = json.loads(content)
    created["placement"] = ingress.cluster.placement(name)
    return JSONResponse(created, status_code=201)


async def _create_sharded(
    ingress: Ingress,
    request: Request,
    name: str,
    plan: list[Shard],
    sizes: list[tuple[str, int]],
    spec: dict[str, Any],
    tensors: Body | None,
) -> Response:
    bodies = [_shard_create_body(spec, tensors, sh.params) for sh in plan]
    replies = await asyncio.gather(
        *(
            ingress.call(sh.slot, request, "POST", f"{API_PREFIX}/steppers", [], b, retry=False)
            for sh, b in zip(plan, bodies, strict=True)
        )
    )
    error = first_error(replies)
    if error is not None:  # undo the shards that were created
        await asyncio.gather(
            *(
                ingress.call(sh.slot, request, "DELETE", f"{API_PREFIX}/steppers/{name}", [], None)
                for sh, (status, _, _) in zip(plan, replies, strict=True)
                if status < 300
            )
        )
        return error
    shapes, dtypes = _meta(spec, tensors)
    record = ShardedRecord(name, [n for n, _ in sizes], shapes, dtypes, plan)
    ingress.cluster.save_sharded(record)
    for sh in plan:
        await ingress.cluster.refresh(sh.slot)
    merged = merge.summaries(record, [json.loads(c) for _, _, c in replies])
    merged["placement"] = ingress.cluster.placement(name)
    return JSONResponse(merged, status_code=201)


def _creation(
    kind: str, body: bytes
) -> tuple[str | None, list[tuple[str, int]], dict[str, Any], Body | None]:
    """(name, [(param, bytes)], spec, parsed tensor body) of a create request."""
    if kind == "application/json":
        spec = codec.load_json(body, "body")
        sizes = []
        for p in spec.get("params") or []:
            dtype = codec.dtype_from_name(p.get("dtype") or "float32")
            numel = 1
            for d in p.get("shape") or []:
                numel *= int(d)
            sizes.append((p["name"], numel * dtype.itemsize))
        return spec.get("name"), sizes, spec, None
    parsed = parse(body)
    spec = codec.load_json(parsed.metadata[META_SPEC], f"metadata {META_SPEC!r}")
    sizes = [(e.name, e.nbytes) for e in parsed.entries]
    order = [p["name"] for p in spec.get("params") or []]
    if order:
        rank = {n: i for i, n in enumerate(order)}
        sizes.sort(key=lambda x: rank.get(x[0], len(rank)))
    return spec.get("name"), sizes, spec, parsed


def _meta(
    spec: dict[str, Any], tensors: Body | None
) -> tuple[dict[str, list[int]], dict[str, str]]:
    shapes, dtypes = {}, {}
    if tensors is not None:
        for e in tensors.entries:
            shapes[e.name] = list(e.shape)
            dtypes[e.name] = codec.dtype_name(e.dtype)
    for p in spec.get("params") or []:
        shapes.setdefault(p["name"], list(p.get("shape") or []))
        dtypes.setdefault(p["name"], p.get("dtype") or "float32")
    return shapes, dtypes


def _shard_create_body(spec: dict[str, Any], tensors: Body | None, params: list[str]) -> bytes:
    """One shard's create body: the spec narrowed to ``params``, with their initial values
    when the request carried tensors (``tensors``), else as JSON."""
    keep = set(params)
    sub = dict(spec)
    sub["params"] = [p for p in spec.get("params") or [] if p["name"] in keep]
    if spec.get("groups"):  # the one group, narrowed to the shard's tensors
        sub["groups"] = [
            {
                **spec["groups"][0],
                "params": [n for n in spec["groups"][0].get("params", []) if n in keep],
            }
        ]
    if tensors is None:
        return json.dumps(sub).encode()
    order = [n for n in (p["name"] for p in spec.get("params") or []) if n in keep] or params
    return split(tensors, [order], {**tensors.metadata, META_SPEC: json.dumps(sub)})[0]


def _need(spec: dict[str, Any]) -> Callable[[list[int], str], Footprint]:
    """The footprint of (part of) the stepper ``spec`` describes, by parameter bytes and
    device type: its options as the spec sets them over PyTorch's defaults (for several
    groups, the options of any group that needs more: amsgrad, an L2 decay, maximize)."""
    kind = spec.get("optimizer") if spec.get("optimizer") in ("adam", "adamw") else "adam"
    options = default_options(str(kind))
    options.update({k: v for k, v in (spec.get("hyperparameters") or {}).items() if v is not None})
    for g in spec.get("groups") or []:
        for k, v in g.items():
            if k != "params" and v is not None and (k not in options or not options[k]):
                options[k] = v
    return lambda sizes, device: footprint([(sizes, options)], device)
