"""How a route behaves for a sharded stepper: a stepper of the same name on each of its
shards' slots.

Handlers for :mod:`.routing`'s table, each ``(ingress, record, request) -> Response``:
forward to one shard (:func:`to_first`, :func:`to_owner`), fan out to the shards and merge
their replies (:func:`fan_out`; with a ``by`` filter only to the shards holding the named
parameters, each asked only about its own), or refuse with 501 ``not_supported_sharded``
(:func:`unsupported`). Steps, tensor loads, snapshots and deletion have handlers of their
own. A request that names a parameter the stepper does not have gets 422
``unknown_parameter``, as it would from one process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from adamscope.client import codec
from adamscope.client.constants import API_PREFIX, OCTET

from ..api.http.reply import render_json
from ..errors import problem_response
from . import merge
from .cluster import ShardedRecord
from .ingress import TRANSPORT_ERRORS, Ingress, Reply, first_error
from .shards import owner, parse, split

__all__ = [
    "Handler",
    "delete",
    "fan_out",
    "history",
    "put_tensors",
    "step",
    "take_snapshot",
    "to_first",
    "to_owner",
    "unsupported",
]

log = logging.getLogger("adamscope.distributed")

Handler = Callable[[Ingress, ShardedRecord, Request], Awaitable[Response]]
#: A fan-out's merge: (ingress, record, the shards asked, their JSON replies, the request)
#: -> reply.
JsonMerge = Callable[
    [Ingress, ShardedRecord, Sequence[int], Sequence[dict[str, Any]], Request], dict[str, Any]
]


def _unknown(record: ShardedRecord, param: str, request: Request) -> Response:
    return problem_response(
        "unknown_parameter",
        f"stepper {record.name!r} has no parameter {param!r}",
        request.url.path,
        stepper=record.name,
        parameter=param,
    )


def _json(reply: Reply) -> Response:
    status, headers, content = reply
    return Response(content, status_code=status, media_type=headers.get("content-type"))


def _targets(
    record: ShardedRecord, request: Request, by: str | None
) -> tuple[list[int], list[list[tuple[str, str]]]] | Response:
    """The shards a request is for and each one's query: with the filter ``by``, only the
    shards holding the parameters it names, each asked about its own ("*": all)."""
    query = request.query_params.multi_items()
    if by is None:
        return list(range(len(record.shards))), [query] * len(record.shards)
    asked = [v for k, v in query if k == by]
    unknown = [a for a in asked if a != "*" and a not in record.params]
    if unknown:
        return _unknown(record, unknown[0], request)
    if not asked or "*" in asked:
        return list(range(len(record.shards))), [query] * len(record.shards)
    shards, queries = [], []
    for i, sh in enumerate(record.shards):
        mine = [a for a in asked if a in sh.params]
        if mine:
            shards.append(i)
            queries.append([(k, v) for k, v in query if k != by] + [(by, n) for n in mine])
    return shards, queries


async def _ask(
    ingress: Ingress,
    record: ShardedRecord,
    request: Request,
    shards: Sequence[int],
    queries: Sequence[Sequence[tuple[str, str]]],
    body: bytes | None = None,
) -> list[Reply]:
    return list(
        await asyncio.gather(
            *(
                ingress.call(
                    record.shards[i].slot, request, request.method, request.url.path, q, body
                )
                for i, q in zip(shards, queries, strict=True)
            )
        )
    )


async def to_first(ingress: Ingress, record: ShardedRecord, request: Request) -> Response:
    """What every shard knows alike (the options, the snapshots' list, the losses): the
    first shard answers."""
    return await ingress.forward(request, record.shards[0].slot)


def to_owner(by: str) -> Handler:
    """The shard holding the one parameter the query names with ``by`` answers."""

    async def owned(ingress: Ingress, record: ShardedRecord, request: Request) -> Response:
        param = request.query_params.get(by)
        if param is None or param not in record.params:
            if param is None:  # let a shard's service say what is missing
                return await to_first(ingress, record, request)
            return _unknown(record, param, request)
        return await ingress.forward(request, record.shards[record.shard_of(param)].slot)

    return owned


def unsupported(why: str) -> Handler:
    async def refused(ingress: Ingress, record: ShardedRecord, request: Request) -> Response:
        return problem_response(
            "not_supported_sharded",
            f"{request.method} {request.url.path} is not available for sharded stepper "
            f"{record.name!r} (its tensors are on slots {[s.slot for s in record.shards]}): "
            f"{why}",
            request.url.path,
            stepper=record.name,
        )

    return refused


def fan_out(
    merge_json: JsonMerge | None = None, *, by: str | None = None, tensors: str | None = None
) -> Handler:
    """Send the request to the shards (see :func:`_targets`) and merge their replies: as
    JSON with ``merge_json``, as tensor reads with ``tensors`` (the reply's key), else the
    first shard's reply (what every shard said alike)."""

    async def fanned(ingress: Ingress, record: ShardedRecord, request: Request) -> Response:
        targets = _targets(record, request, by)
        if isinstance(targets, Response):
            return targets
        shards, queries = targets
        body = await request.body() if request.method != "GET" else None
        replies = await _ask(ingress, record, request, shards, queries, body)
        error = first_error(replies)
        if error is not None:
            return error
        if tensors is not None:
            media, content = merge.tensors(record, tensors, replies)
            return Response(content, media_type=media)
        if merge_json is None:
            return _json(replies[0])
        parts = [json.loads(c) for _, _, c in replies]
        return Response(
            render_json(merge_json(ingress, record, shards, parts, request)),
            status_code=replies[0][0],
            media_type="application/json",
        )

    return fanned


async def history(ingress: Ingress, record: ShardedRecord, request: Request) -> Response:
    """The JSON history (its CSV is not merged), its ``tensor`` filter as a fan-out's."""
    if request.query_params.get("format") == "csv" or request.headers.get("accept", "").startswith(
        "text/csv"
    ):
        return problem_response(
            "not_supported_sharded",
            f"the CSV history of sharded stepper {record.name!r} is not merged; ask for JSON",
            request.url.path,
            stepper=record.name,
        )
    return await fan_out(lambda i, r, s, p, q: merge.history(r, s, p), by="tensor")(
        ingress, record, request
    )


async def delete(ingress: Ingress, record: ShardedRecord, request: Request) -> Response:
    """Every shard deleted (one already gone counts as deleted), then the record."""
    n = len(record.shards)
    replies = await ingress.fan_out(
        record, request, "DELETE", request.url.path, [[]] * n, [None] * n
    )
    if all(s in (204, 404) for s, _, _ in replies):
        ingress.cluster.drop_sharded(record.name)
        for sh in record.shards:
            await ingress.cluster.refresh(sh.slot)
        return Response(status_code=204)
    return first_error(replies) or Response(status_code=204)


def _split_put(
    record: ShardedRecord, request: Request, kind: str, raw: bytes, key: str
) -> list[bytes] | Response:
    if kind == "application/json":
        data = codec.load_json(raw, "body")
        values = data.get(key)
        if not isinstance(values, dict):
            raise ValueError(f"JSON body must be {{{key!r}: {{name: ...}}}}")
        unknown = [k for k in values if k not in record.params]
        if unknown:
            return _unknown(record, unknown[0], request)
        return [
            json.dumps({**data, key: {k: v for k, v in values.items() if k in sh.params}}).encode()
            for sh in record.shards
        ]
    body = parse(raw)
    groups: list[list[str]] = [[] for _ in record.shards]
    for e in body.entries:
        param = e.name if key == "params" else owner(e.name, set(record.params))
        if param is None or param not in record.params:
            return problem_response(
                "unknown_parameter",
                f"stepper {record.name!r} has no parameter for tensor {e.name!r}",
                request.url.path,
                stepper=record.name,
            )
        groups[record.shard_of(param)].append(e.name)
    return split(body, groups)


def put_tensors(key: str) -> Handler:
    """A load of params or state (``key``): the body split by shard, sent to each."""

    async def put(ingress: Ingress, record: ShardedRecord, request: Request) -> Response:
        raw = await request.body()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            bodies = _split_put(record, request, kind, raw, key)
        except (ValueError, KeyError, codec.CodecError) as e:
            return problem_response(
                "malformed_body", f"cannot split this body by shard: {e}", request.url.path
            )
        if isinstance(bodies, Response):
            return bodies
        n = len(record.shards)
        replies = await ingress.fan_out(
            record,
            request,
            "PUT",
            request.url.path,
            [request.query_params.multi_items()] * n,
            bodies,
        )
        return first_error(replies) or _json(replies[0])

    return put


async def take_snapshot(ingress: Ingress, record: ShardedRecord, request: Request) -> Response:
    """One snapshot name on every shard: the caller's, or one chosen here."""
    raw = await request.body()
    try:
        asked = codec.load_json(raw, "body").get("name") if raw else None
    except (ValueError, AttributeError):
        return problem_response(
            "malformed_body", 'the body must be JSON {"name": ...}', request.url.path
        )
    snap = asked or time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime()) + f"-{uuid.uuid4().hex[:6]}"
    n = len(record.shards)
    replies = await ingress.fan_out(
        record,
        request,
        "POST",
        request.url.path,
        [request.query_params.multi_items()] * n,
        [json.dumps({"name": snap}).encode()] * n,
        {"content-type": "application/json"},
        retry=False,
    )
    return first_error(replies) or _json(replies[0])


def _check_gradients(
    record: ShardedRecord, request: Request, body: Any, wire: str | None
) -> Response | None:
    for entry in body.entries:
        if entry.name not in record.params:
            return _unknown(record, entry.name, request)
        if list(entry.shape) != record.shapes[entry.name]:
            return problem_response(
                "shape_mismatch",
                f"gradient {entry.name!r} has shape {list(entry.shape)}, "
                f"the parameter {record.shapes[entry.name]}",
                request.url.path,
                stepper=record.name,
            )
        got = codec.dtype_name(entry.dtype)
        if got != record.dtypes[entry.name] and got != wire:
            return problem_response(
                "dtype_mismatch",
                f"gradient {entry.name!r} has dtype {got}, the parameter "
                f"{record.dtypes[entry.name]}",
                request.url.path,
                stepper=record.name,
            )
    return None


async def _current_steps(
    ingress: Ingress, record: ShardedRecord, request: Request
) -> list[int] | Response:
    """The step every shard is at (known from the last step, else asked)."""
    steps = ingress.steps.get(record.name)
    if steps is not None:
        return steps
    n = len(record.shards)
    states = await ingress.fan_out(
        record, request, "GET", f"{API_PREFIX}/steppers/{record.name}", [[]] * n, [None] * n
    )
    return first_error(states) or [int(json.loads(c)["step"]) for _, _, c in states]


async def step(ingress: Ingress, record: ShardedRecord, request: Request) -> Response:
    """A step split by tensor, sent to every shard at once with one idempotency key and
    ``expected_step``, checked whole first (no shard sees a request that is refused)."""
    keys = {k for k, _ in request.query_params.multi_items()}
    if "contributors" in keys or "worker" in keys:
        return problem_response(
            "not_supported_sharded",
            "accumulate mode is not available "
            f"for sharded stepper {record.name!r}; sum the workers' "
            "gradients before stepping",
            request.url.path,
        )
    raw = await request.body()
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != OCTET:
        return problem_response(
            "unsupported_media_type",
            f"a sharded stepper steps with a safetensors body, not {kind!r}",
            request.url.path,
        )
    try:
        body = parse(raw)
    except codec.CodecError as e:
        return problem_response("malformed_body", str(e), request.url.path)
    refused = _check_gradients(record, request, body, request.query_params.get("wire_dtype"))
    if refused is not None:
        return refused
    steps = await _current_steps(ingress, record, request)
    if isinstance(steps, Response):
        return steps
    # Shards at different steps: the last step reached some but not all (an actor died
    # mid-step and its slot came back without it). The lowest is the stepper's step; that
    # step's key completes it on the others and replays on those that have it.
    current = min(steps)
    expected = request.query_params.get("expected_step")
    if expected is not None and int(expected) != current:
        return problem_response(
            "step_conflict",
            f"expected step {expected}, but stepper {record.name!r} is at step {current}",
            request.url.path,
            stepper=record.name,
            current_step=current,
        )
    base = int(expected) if expected is not None else current
    return await _step_shards(ingress, record, request, body, base)


async def _step_shards(
    ingress: Ingress, record: ShardedRecord, request: Request, body: Any, base: int
) -> Response:
    key = request.headers.get("idempotency-key") or f"ingress-{uuid.uuid4().hex}"
    query = [(k, v) for k, v in request.query_params.multi_items() if k != "expected_step"]
    query.append(("expected_step", str(base)))
    bodies = split(body, [sh.params for sh in record.shards])
    ingress.steps.pop(record.name, None)  # unknown until every shard has answered
    try:
        replies = await ingress.fan_out(
            record,
            request,
            "POST",
            request.url.path,
            [query] * len(record.shards),
            bodies,
            {"idempotency-key": key},
        )
    except TRANSPORT_ERRORS as e:
        return problem_response(
            "slot_unavailable",
            f"a shard of {record.name!r} did not answer "
            f"({type(e).__name__}) and its slot could not be restored in time; send the same "
            "request again (same Idempotency-Key) to complete the step",
            request.url.path,
            stepper=record.name,
        )
    failed = [(i, r) for i, r in enumerate(replies) if r[0] >= 400]
    if failed and len(failed) < len(replies):
        log.error(
            "sharded stepper %r: shards %s refused step %d that others applied: %s",
            record.name,
            [i for i, _ in failed],
            base + 1,
            [r[2][:200] for _, r in failed],
        )
        return problem_response(
            "shards_diverged",
            f"shards {[record.shards[i].slot for i, _ in failed]} of "
            f"stepper {record.name!r} refused a step the others applied; send the same "
            "request again (same Idempotency-Key) to complete it",
            request.url.path,
            stepper=record.name,
        )
    if failed:
        return _json(failed[0][1])
    if all(r[0] == 200 for r in replies):
        ingress.steps[record.name] = [base + 1] * len(record.shards)
    return _merged_step(record, replies)


def _merged_step(record: ShardedRecord, replies: Sequence[Reply]) -> Response:
    kind = replies[0][1].get("content-type", "")
    if kind.startswith("application/json"):
        data = [json.loads(c) for _, _, c in replies]
        merged = dict(data[0])
        for field in ("stepped", "skipped"):
            joined = {n for d in data for n in d.get(field, [])}
            merged[field] = [n for n in record.params if n in joined]
        merged["replayed"] = all(bool(d.get("replayed")) for d in data)
        return JSONResponse(merged, status_code=replies[0][0])
    media, body = merge.tensors(record, "params", replies)
    return Response(
        body,
        media_type=media,
        headers={
            "x-adamscope-shards": str(len(record.shards)),
            "x-adamscope-time": f"{time.time():.3f}",
        },
    )
