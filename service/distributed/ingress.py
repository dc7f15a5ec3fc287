"""The distributed service's front door: a FastAPI app that Ray Serve runs as its ingress.

Every request about a stepper goes to the slot that holds it (:mod:`.cluster`): the slot's
service, the single-process app unchanged, answers it, and the reply streams back as it
came. So every endpoint, the dashboard and the Python client work as on one machine.
Requests about no stepper (the dashboard's files, the OpenAPI document, identity) go to
any live slot. The ingress itself answers ``/healthz`` (with the slots), lists steppers
across slots, merges the slots' ``/v1/events`` streams (adding ``recovered`` events), and
joins the slots' ``/metrics``.

A **sharded** stepper (its tensors over several slots) is a stepper of the same name on
each of those slots. Its step is split by tensor, sent to every shard at once, and the
replies merged; the ingress checks the whole request first (names, shapes, dtypes, the
expected step), so a request is refused before any shard sees it, and it holds the
stepper's lock for the whole step, so reads never see shards at different steps. Every
shard gets the same idempotency key and ``expected_step``: when a shard's actor dies
during a step, its slot is recovered from its files and the shard's part is sent again,
which applies it exactly once (or replays it when the shard had written it). The
parameters, state, options, durability, checkpoint, snapshot, statistics, signals,
history and alerts routes fan out and merge; routes that read one tensor go to its shard;
the rest answer 501 for a sharded stepper.

Authentication stays where it is: each slot's service checks the caller's token (the
ingress passes the Authorization header on), so scopes and prefixes hold unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from adamscope.client import codec
from adamscope.client.protocol import META_SPEC

from ..api.http.reply import render_json
from ..engine.footprint import Footprint, footprint
from ..engine.options import default_options
from .cluster import Cluster, ClusterConfig, ShardedRecord, SlotStartError
from .shards import Body, merge, owner, parse, split

__all__ = ["build_app"]

log = logging.getLogger("adamscope.distributed")

API = "/v1"
#: Request headers not passed on to a slot (hop by hop, or recomputed).
_DROP_REQUEST = {"host", "content-length", "connection", "keep-alive", "transfer-encoding",
                 "te", "upgrade", "proxy-authorization", "expect"}
_DROP_REPLY = {"content-length", "connection", "keep-alive", "transfer-encoding", "server",
               "date"}
_TRANSPORT_ERRORS = (httpx.TransportError,)


def problem(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"type": f"https://adamscope.dev/problems/{code}", "title": code,
                         "status": status, "detail": detail, "code": code, **extra},
                        status_code=status, media_type="application/problem+json")


class Ingress:
    """The routing logic (one per ingress replica)."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.cluster = Cluster(config)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                                      limits=httpx.Limits(max_connections=256,
                                                          max_keepalive_connections=64))
        self.locks: dict[str, asyncio.Lock] = {}
        #: Each sharded stepper's shards' steps as its last step left them (forgotten on
        #: any doubt: a failed step, a recovery, a change made through another route).
        self.steps: dict[str, list[int]] = {}
        self.subscribers: set[asyncio.Queue[bytes]] = set()
        self.cluster.listeners.append(self._on_cluster_event)
        self._started: asyncio.Task[None] | None = None
        #: Why the slots did not start (the service then answers 503 saying so).
        self.start_error: str | None = None

    async def ready(self) -> None:
        """Start the slots (once; again after a failed start)."""
        if self._started is None or (self._started.done() and (
                self._started.cancelled() or self._started.exception() is not None)):
            self._started = asyncio.get_running_loop().create_task(self.cluster.start())
        await asyncio.shield(self._started)
        self.cluster.start_monitor()

    def lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    # ------------------------------------------------------------------ forwarding

    def _headers(self, request: Request, extra: dict[str, str] | None = None
                 ) -> dict[str, str]:
        out = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        out.update(extra or {})
        return out

    async def send(self, slot: int, method: str, path: str, query: Sequence[tuple[str, str]],
                   headers: dict[str, str], body: bytes | None, *, retry: bool
                   ) -> httpx.Response:
        """One request to a slot's service (streamed reply); when the slot's actor is found
        dead, recover it and, if ``retry``, send again."""
        for attempt in (0, 1):
            if self.cluster.slots[slot].state != "ok":
                await self.cluster.check(slot)
            url = self.cluster.slots[slot].url + path
            req = self.http.build_request(method, url, params=list(query), headers=headers,
                                          content=body)
            try:
                return await self.http.send(req, stream=True)
            except _TRANSPORT_ERRORS:
                if await self.cluster.alive(slot):
                    raise
                recovered = await self.cluster.recover(slot)
                if not (retry and recovered) or attempt:
                    raise
        raise AssertionError("unreachable")

    async def forward(self, request: Request, slot: int, *, body: bytes | None = None,
                      path: str | None = None, extra_headers: dict[str, str] | None = None
                      ) -> Response:
        """Pass ``request`` on to ``slot`` and stream the reply back."""
        if body is None:
            body = await request.body()
        method = request.method
        headers = self._headers(request, extra_headers)
        retry = method in ("GET", "HEAD", "PUT", "PATCH", "DELETE") or (
            "idempotency-key" in {k.lower() for k in headers})
        try:
            reply = await self.send(slot, method, path or request.url.path,
                                    request.query_params.multi_items(), headers, body,
                                    retry=retry)
        except _TRANSPORT_ERRORS as e:
            return problem(503, "slot_unavailable",
                           f"slot {slot} did not answer ({type(e).__name__}); "
                           f"its steppers are being restored, retry the request",
                           slot=slot)
        return StreamingResponse(
            reply.aiter_raw(), status_code=reply.status_code,
            headers={k: v for k, v in reply.headers.items() if k.lower() not in _DROP_REPLY},
            background=BackgroundTask(reply.aclose))

    async def call(self, slot: int, request: Request, method: str, path: str,
                   query: Sequence[tuple[str, str]], body: bytes | None,
                   extra_headers: dict[str, str] | None = None, *, retry: bool = True
                   ) -> tuple[int, dict[str, str], bytes]:
        """A whole request to a slot: (status, headers, body)."""
        reply = await self.send(slot, method, path, query,
                                self._headers(request, extra_headers), body, retry=retry)
        try:
            content = await reply.aread()
        finally:
            await reply.aclose()
        return reply.status_code, dict(reply.headers), content

    # ------------------------------------------------------------------ events

    def _on_cluster_event(self, kind: str, event: dict[str, Any]) -> None:
        if "stepper" in event:
            self.steps.pop(str(event["stepper"]), None)
        else:
            self.steps.clear()
        frame = f"event: {kind}\ndata: {json.dumps(event, default=str)}\n\n".encode()
        for q in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(frame)

    async def events(self, request: Request) -> AsyncIterator[bytes]:
        """Every slot's event stream, and the cluster's own events, as one stream."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)
        self.subscribers.add(queue)
        headers = self._headers(request)
        query: list[tuple[str, str | int | float | bool | None]] = list(
            request.query_params.multi_items())

        async def pump(index: int) -> None:
            while True:
                slot = self.cluster.slots[index]
                if slot.state != "ok":
                    await asyncio.sleep(0.5)
                    continue
                try:
                    async with self.http.stream("GET", slot.url + f"{API}/events",
                                                params=query, headers=headers) as reply:
                        if reply.status_code != 200:
                            await queue.put(await reply.aread())
                            return
                        block = b""
                        async for chunk in reply.aiter_raw():
                            block += chunk
                            while b"\n\n" in block:
                                frame, block = block.split(b"\n\n", 1)
                                if frame.startswith(b":") and index:
                                    continue  # one heartbeat stream is enough
                                await queue.put(frame + b"\n\n")
                except _TRANSPORT_ERRORS:
                    await asyncio.sleep(0.5)

        pumps = [asyncio.create_task(pump(i)) for i in range(len(self.cluster.slots))]
        try:
            while True:
                if await request.is_disconnected():
                    return
                try:
                    yield await asyncio.wait_for(queue.get(), 1.0)
                except TimeoutError:
                    continue
        finally:
            self.subscribers.discard(queue)
            for p in pumps:
                p.cancel()

    # ------------------------------------------------------------------ sharded steppers

    def record(self, name: str) -> ShardedRecord | None:
        return self.cluster.sharded.get(name)

    async def fan_out(self, record: ShardedRecord, request: Request, method: str, path: str,
                      queries: Sequence[Sequence[tuple[str, str]]],
                      bodies: Sequence[bytes | None], extra: dict[str, str] | None = None,
                      retry: bool = True) -> list[tuple[int, dict[str, str], bytes]]:
        return list(await asyncio.gather(*(
            self.call(sh.slot, request, method, path, q, b, extra, retry=retry)
            for sh, q, b in zip(record.shards, queries, bodies, strict=True))))


def _unknown(record: ShardedRecord, param: str) -> JSONResponse:
    return problem(404, "unknown_parameter",
                   f"stepper {record.name!r} has no parameter {param!r}",
                   stepper=record.name, parameter=param)


def _first_error(replies: Sequence[tuple[int, dict[str, str], bytes]]) -> Response | None:
    for status, headers, content in replies:
        if status >= 400:
            return Response(content, status_code=status,
                            media_type=headers.get("content-type", "application/json"))
    return None


def _names_query(query: Sequence[tuple[str, str]], keep: set[str] | None
                 ) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in query if k != "names"]
    if keep is not None:
        out += [("names", n) for n in sorted(keep)]
    return out


def build_app(config: ClusterConfig) -> tuple[FastAPI, Ingress]:
    """The ingress app and its router state."""
    ingress = Ingress(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # At startup, not in a request: a request's cancellation (its client gave up)
        # would cancel the actor calls it started. A start that fails is reported by every
        # answer (and /healthz, which `adamscope serve --ray` waits on), not retried: the
        # slots' resources cannot be had, or their services do not start.
        try:
            await ingress.ready()
        except Exception as e:  # noqa: BLE001 - reported, see above
            ingress.start_error = str(e) if isinstance(e, SlotStartError) else \
                f"{type(e).__name__}: {e}"
            log.error("distributed: the slots did not start: %s", ingress.start_error)
        yield
        await ingress.http.aclose()

    app = FastAPI(title="adamscope (distributed)", openapi_url=None, docs_url=None,
                  redoc_url=None, lifespan=lifespan)
    app.state.ingress = ingress

    @app.middleware("http")
    async def started(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                      ) -> Response:
        if ingress.start_error is not None:
            if request.url.path == "/healthz":
                return JSONResponse({"status": "failed", "mode": "ray",
                                     "error": ingress.start_error,
                                     "slots": ingress.cluster.describe()}, status_code=503)
            return problem(503, "slot_unavailable",
                           f"the slots did not start: {ingress.start_error}")
        await ingress.ready()
        return await call_next(request)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        slots = ingress.cluster.describe()
        ok = all(s["state"] == "ok" for s in slots)
        # Public: counts only, never stepper names (a caller without a token could not list
        # them).
        return {"status": "ok" if ok else "degraded", "mode": "ray", "slots": slots,
                "sharded": len(ingress.cluster.sharded)}

    @app.get(f"{API}/steppers")
    async def list_steppers(request: Request) -> Response:
        replies = await asyncio.gather(*(
            ingress.call(s.index, request, "GET", f"{API}/steppers",
                         request.query_params.multi_items(), None)
            for s in ingress.cluster.slots if s.state == "ok"))
        error = _first_error(replies)
        if error is not None:
            return error
        by_name: dict[str, list[dict[str, Any]]] = {}
        for _, _, content in replies:
            for summary in json.loads(content)["steppers"]:
                by_name.setdefault(summary["name"], []).append(summary)
        out = []
        for name in sorted(by_name):
            record = ingress.record(name)
            parts = by_name[name]
            merged = _merge_summaries(record, parts) if record else parts[0]
            merged["placement"] = ingress.cluster.placement(name)
            out.append(merged)
        return JSONResponse({"steppers": out})

    @app.post(f"{API}/steppers")
    async def create(request: Request) -> Response:
        body = await request.body()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            name, sizes, spec, tensors = _creation(kind, body)
        except (ValueError, KeyError, TypeError, AttributeError, codec.CodecError):
            name, sizes, spec, tensors = None, [], {}, None
        if name is None or not sizes:  # let a slot's service say what is wrong
            target = ingress.cluster.ranked()
            if not target:
                return problem(503, "slot_unavailable", "no slot is serving")
            return await ingress.forward(request, target[0].index, body=body)
        raw_shards = request.query_params.get("shards")
        try:
            shards = int(raw_shards) if raw_shards is not None else None
            if shards is not None and shards < 1:
                raise ValueError
        except ValueError:
            return problem(422, "invalid_spec", f"shards must be a positive integer, not "
                           f"{raw_shards!r}")
        if ingress.cluster.slot_of(name) is not None or name in ingress.cluster.sharded:
            return problem(409, "stepper_exists", f"a stepper named {name!r} already exists",
                           stepper=name)
        need = _need(spec)
        try:
            plan = ingress.cluster.plan(sizes, need, shards)
        except MemoryError as e:
            return problem(507, "memory_budget_exceeded", str(e))
        except RuntimeError as e:
            return problem(503, "slot_unavailable", str(e))
        ingress.cluster.reserve(name, plan, sizes, need)
        if len(plan) == 1:
            status, headers, content = await ingress.call(
                plan[0].slot, request, "POST", request.url.path,
                request.query_params.multi_items(), body, retry=False)
            await ingress.cluster.refresh(plan[0].slot)
            if status != 201:
                return Response(content, status_code=status,
                                media_type=headers.get("content-type"))
            created = json.loads(content)
            created["placement"] = ingress.cluster.placement(name)
            return JSONResponse(created, status_code=201)
        if len(spec.get("groups") or []) > 1:
            return problem(422, "invalid_spec", "a sharded stepper has one parameter group "
                           "(its options apply to every shard); create it with one group")
        async with ingress.lock(name):
            bodies = [_shard_create_body(spec, tensors, sh.params) for sh in plan]
            replies = await asyncio.gather(*(
                ingress.call(sh.slot, request, "POST", f"{API}/steppers", [], b, retry=False)
                for sh, b in zip(plan, bodies, strict=True)))
            error = _first_error(replies)
            if error is not None:  # undo the shards that were created
                await asyncio.gather(*(
                    ingress.call(sh.slot, request, "DELETE", f"{API}/steppers/{name}", [],
                                 None) for sh, (status, _, _) in zip(plan, replies, strict=True)
                    if status < 300))
                return error
            names = [n for n, _ in sizes]
            shapes, dtypes = _meta(spec, tensors)
            record = ShardedRecord(name, names, shapes, dtypes, plan)
            ingress.cluster.save_sharded(record)
            for sh in plan:
                await ingress.cluster.refresh(sh.slot)
            merged = _merge_summaries(record, [json.loads(c) for _, _, c in replies])
            merged["placement"] = ingress.cluster.placement(name)
            return JSONResponse(merged, status_code=201)

    @app.get(f"{API}/events")
    async def events(request: Request) -> Response:
        return StreamingResponse(ingress.events(request), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        replies = await asyncio.gather(*(
            ingress.call(s.index, request, "GET", "/metrics", [], None)
            for s in ingress.cluster.slots if s.state == "ok"))
        error = _first_error(replies)
        if error is not None:
            return error
        return Response(_join_metrics([c for _, _, c in replies]),
                        media_type=replies[0][1].get("content-type", "text/plain")
                        if replies else "text/plain")

    @app.api_route(f"{API}/steppers/{{name}}", methods=["GET", "DELETE"])
    async def one(name: str, request: Request) -> Response:
        record = ingress.record(name)
        if record is None:
            slot = await _slot_for(ingress, name)
            if slot is None:
                return await _anywhere(ingress, request)
            if request.method == "GET":
                status, headers, content = await ingress.call(
                    slot, request, "GET", request.url.path, [], None)
                if status != 200:
                    return Response(content, status_code=status,
                                    media_type=headers.get("content-type"))
                summary = json.loads(content)
                summary["placement"] = ingress.cluster.placement(name)
                return JSONResponse(summary)
            response = await ingress.forward(request, slot)
            await ingress.cluster.refresh(slot)
            return response
        async with ingress.lock(name):
            if request.method == "GET":
                replies = await ingress.fan_out(record, request, "GET", request.url.path,
                                                [[]] * len(record.shards),
                                                [None] * len(record.shards))
                error = _first_error(replies)
                if error is not None:
                    return error
                merged = _merge_summaries(record, [json.loads(c) for _, _, c in replies])
                merged["placement"] = ingress.cluster.placement(name)
                return JSONResponse(merged)
            replies = await ingress.fan_out(record, request, "DELETE", request.url.path,
                                            [[]] * len(record.shards),
                                            [None] * len(record.shards))
            if all(s in (204, 404) for s, _, _ in replies):
                ingress.cluster.drop_sharded(name)
                for sh in record.shards:
                    await ingress.cluster.refresh(sh.slot)
                return Response(status_code=204)
            return _first_error(replies) or Response(status_code=204)

    @app.api_route(f"{API}/steppers/{{name}}/{{rest:path}}",
                   methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def stepper_route(name: str, rest: str, request: Request) -> Response:
        record = ingress.record(name)
        if record is None:
            slot = await _slot_for(ingress, name)
            if slot is None:
                return await _anywhere(ingress, request)
            extra = None
            if rest == "step" and "idempotency-key" not in request.headers:
                # A key of its own makes the step safe to send again after a recovery.
                extra = {"idempotency-key": f"ingress-{uuid.uuid4().hex}"}
            return await ingress.forward(request, slot, extra_headers=extra)
        async with ingress.lock(name):
            if rest != "step" and request.method != "GET":
                ingress.steps.pop(name, None)  # a state load or restore may move the step
            return await _sharded_route(ingress, record, rest, request)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def anything(path: str, request: Request) -> Response:
        response = await _anywhere(ingress, request)
        if request.method == "POST" and path.rstrip("/") == "v1/steppers/import":
            await ingress.cluster.refresh()
        return response

    return app, ingress


async def _slot_for(ingress: Ingress, name: str) -> int | None:
    slot = ingress.cluster.slot_of(name)
    if slot is None:
        await ingress.cluster.refresh()
        slot = ingress.cluster.slot_of(name)
    return slot


async def _anywhere(ingress: Ingress, request: Request) -> Response:
    live = ingress.cluster.ranked()
    if not live:
        return problem(503, "slot_unavailable", "no slot is serving")
    return await ingress.forward(request, live[0].index)


# ---------------------------------------------------------------------- creation


def _creation(kind: str, body: bytes) -> tuple[str | None, list[tuple[str, int]],
                                               dict[str, Any], Body | None]:
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


def _meta(spec: dict[str, Any], tensors: Body | None
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


def _shard_create_body(spec: dict[str, Any], tensors: Body | None, params: list[str]
                       ) -> bytes:
    """One shard's create body: the spec narrowed to ``params``, with their initial values
    when the request carried tensors (``tensors``), else as JSON."""
    keep = set(params)
    sub = dict(spec)
    sub["params"] = [p for p in spec.get("params") or [] if p["name"] in keep]
    if spec.get("groups"):  # the one group, narrowed to the shard's tensors
        sub["groups"] = [{**spec["groups"][0], "params": [
            n for n in spec["groups"][0].get("params", []) if n in keep]}]
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
    options.update({k: v for k, v in (spec.get("hyperparameters") or {}).items()
                    if v is not None})
    for g in spec.get("groups") or []:
        for k, v in g.items():
            if k != "params" and v is not None and (k not in options or not options[k]):
                options[k] = v
    return lambda sizes, device: footprint([(sizes, options)], device)


# ---------------------------------------------------------------------- summaries


def _merge_summaries(record: ShardedRecord | None, parts: list[dict[str, Any]]
                     ) -> dict[str, Any]:
    if record is None or len(parts) == 1:
        return dict(parts[0])
    out = dict(parts[0])
    by_param = {p["name"]: p for part in parts for p in part.get("params", [])}
    out["params"] = [by_param[n] for n in record.params if n in by_param]
    out["numel"] = sum(int(p.get("numel", 0)) for p in parts)
    out["state_bytes"] = sum(int(p.get("state_bytes", 0)) for p in parts)
    prints = [p["footprint"] for p in parts if p.get("footprint")]
    if prints:  # every shard is a stepper of its own, with its own buffers: they add up
        out["footprint"] = {k: sum(int(f.get(k, 0)) for f in prints) for k in prints[0]}
    out["step"] = min(int(p.get("step", 0)) for p in parts)
    out["updated_at"] = max(float(p.get("updated_at", 0)) for p in parts)
    groups = [dict(g) for g in parts[0].get("groups", [])]
    for g in groups:
        g["params"] = [n for n in record.params if n in by_param]
    out["groups"] = groups
    persisted = [p.get("persisted_step") for p in parts]
    out["persisted_step"] = None if None in persisted else min(persisted)  # type: ignore[type-var]
    out["dirty"] = any(bool(p.get("dirty")) for p in parts)
    briefs = [p["alerts"] for p in parts if p.get("alerts")]
    if briefs:
        latest = [b["latest"] for b in briefs if b.get("latest")]
        out["alerts"] = {"count": sum(int(b.get("count", 0)) for b in briefs),
                         "active": sum(int(b.get("active", 0)) for b in briefs),
                         "latest": max(latest, key=lambda e: (e.get("step") or 0))
                         if latest else None}
    return out


def _join_metrics(texts: Sequence[bytes]) -> bytes:
    """The slots' Prometheus texts as one: each family's HELP/TYPE once, samples of every
    slot (per-stepper series name their stepper; process-wide ones add up per slot)."""
    seen: set[bytes] = set()
    out: list[bytes] = []
    for text in texts:
        for line in text.splitlines():
            if line.startswith(b"# "):
                if line in seen:
                    continue
                seen.add(line)
            out.append(line)
    return b"\n".join(out) + b"\n"


# ---------------------------------------------------------------------- sharded routes


async def _sharded_route(ingress: Ingress, record: ShardedRecord, rest: str,
                         request: Request) -> Response:
    n = len(record.shards)
    query = request.query_params.multi_items()
    path = request.url.path
    method = request.method
    if rest == "step" and method == "POST":
        return await _sharded_step(ingress, record, request)
    if rest in ("params", "state") and method == "GET":
        asked = [v for k, v in query if k == "names"]
        unknown = [a for a in asked if a not in record.params]
        if unknown:
            return _unknown(record, unknown[0])
        wanted = set(asked) if asked else None
        shards = [i for i, sh in enumerate(record.shards)
                  if wanted is None or wanted & set(sh.params)]
        replies = await asyncio.gather(*(
            ingress.call(record.shards[i].slot, request, "GET", path,
                         _names_query(query, None if wanted is None
                                      else wanted & set(record.shards[i].params)), None)
            for i in shards))
        error = _first_error(replies)
        if error is not None:
            return error
        kind = replies[0][1].get("content-type", "")
        if kind.startswith("application/json"):
            data = [json.loads(c) for _, _, c in replies]
            merged = dict(data[0])
            key = "params" if rest == "params" else "state"
            joined: dict[str, Any] = {}
            for d in data:
                joined.update(d.get(key) or {})
            merged[key] = {k: joined[k] for k in record.params if k in joined}
            return JSONResponse(merged)
        body = merge([parse(c) for _, _, c in replies], record.params)
        return Response(body, media_type=codec_media(kind))
    if rest in ("params", "state") and method == "PUT":
        raw = await request.body()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            bodies = _split_put(record, kind, raw, "params" if rest == "params" else "state")
        except (ValueError, KeyError, codec.CodecError) as e:
            return problem(422 if not isinstance(e, codec.CodecError) else 400,
                           "malformed_body", f"cannot split this body by shard: {e}")
        if isinstance(bodies, Response):
            return bodies
        replies = await ingress.fan_out(record, request, "PUT", path, [query] * n, bodies)
        return _first_error(replies) or _json_reply(replies[0])
    if rest == "state" and method == "DELETE":
        asked = [v for k, v in query if k == "names"]
        replies = await asyncio.gather(*(
            ingress.call(sh.slot, request, "DELETE", path,
                         _names_query(query, None if not asked else set(asked) & set(sh.params)),
                         None)
            for sh in record.shards if not asked or set(asked) & set(sh.params)))
        return _first_error(replies) or _json_reply(replies[0])
    if (rest in ("hyperparameters", "checkpoint", "durability")
            and method in ("PATCH", "POST", "PUT")):
        raw = await request.body()
        replies = await ingress.fan_out(record, request, method, path, [query] * n, [raw] * n)
        error = _first_error(replies)
        if error is not None:
            return error
        if rest == "hyperparameters":
            merged = _merge_summaries(record, [json.loads(c) for _, _, c in replies])
            merged["placement"] = ingress.cluster.placement(record.name)
            return JSONResponse(merged)
        return _json_reply(replies[0])
    if rest == "bias-correction" and method == "GET":
        return await ingress.forward(request, record.shards[0].slot)
    if rest == "history" and method == "GET":
        return await _sharded_history(ingress, record, request)
    if rest == "signals" and method == "GET":
        return await _sharded_signals(ingress, record, request)
    if rest == "stats" and method == "GET" and not (
            {k for k, _ in query} & {"name", "tensor", "param"}):
        return await _sharded_stats(ingress, record, request)
    if rest == "alerts":
        return await _sharded_alerts(ingress, record, request)
    if rest == "loss" and method == "POST":  # losses are the stepper's: the first shard's
        return await ingress.forward(request, record.shards[0].slot)
    if rest == "snapshots" or (rest.startswith("snapshots/") and (
            method == "DELETE" or rest.endswith("/restore"))):
        return await _sharded_snapshots(ingress, record, rest, request)
    # Routes about some tensors go to the shard holding them.
    about = {v for k, v in query if k in ("names", "name", "tensor", "param")}
    holders = {record.shard_of(a) for a in about if a in record.params}
    if about and len(holders) == 1 and about <= set(record.params):
        return await ingress.forward(request, record.shards[holders.pop()].slot)
    return problem(501, "not_supported_sharded",
                   f"{method} /{rest} is not available for sharded stepper {record.name!r} "
                   f"(its tensors are on slots {[s.slot for s in record.shards]}); ask about "
                   f"tensors of one shard, or see the README's distributed mode section",
                   stepper=record.name)


def codec_media(kind: str) -> str:
    return kind.split(";")[0].strip() or "application/octet-stream"


def _json_reply(reply: tuple[int, dict[str, str], bytes]) -> Response:
    status, headers, content = reply
    return Response(content, status_code=status, media_type=headers.get("content-type"))


def _split_put(record: ShardedRecord, kind: str, raw: bytes, key: str
               ) -> list[bytes] | Response:
    if kind == "application/json":
        data = codec.load_json(raw, "body")
        values = data.get(key)
        if not isinstance(values, dict):
            raise ValueError(f"JSON body must be {{{key!r}: {{name: ...}}}}")
        unknown = [k for k in values if k not in record.params]
        if unknown:
            return _unknown(record, unknown[0])
        out = []
        for sh in record.shards:
            sub = dict(data)
            sub[key] = {k: v for k, v in values.items() if k in sh.params}
            out.append(json.dumps(sub).encode())
        return out
    body = parse(raw)
    owners = []
    for e in body.entries:
        param = e.name if key == "params" else owner(e.name, set(record.params))
        if param not in record.params:
            return problem(404, "unknown_parameter",
                           f"stepper {record.name!r} has no parameter for tensor {e.name!r}",
                           stepper=record.name)
        owners.append((e.name, record.shard_of(param)))
    groups: list[list[str]] = [[] for _ in record.shards]
    for name, shard in owners:
        groups[shard].append(name)
    return split(body, groups)


async def _sharded_step(ingress: Ingress, record: ShardedRecord, request: Request
                        ) -> Response:
    query = request.query_params.multi_items()
    keys = {k for k, _ in query}
    if "contributors" in keys or "worker" in keys:
        return problem(501, "not_supported_sharded",
                       f"accumulate mode is not available for sharded stepper "
                       f"{record.name!r}; sum the workers' gradients before stepping")
    raw = await request.body()
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/octet-stream":
        return problem(415, "unsupported_media_type",
                       f"a sharded stepper steps with a safetensors body, not {kind!r}")
    try:
        body = parse(raw)
    except codec.CodecError as e:
        return problem(400, "malformed_body", str(e))
    wire = request.query_params.get("wire_dtype")
    for entry in body.entries:
        if entry.name not in record.params:
            return _unknown(record, entry.name)
        if list(entry.shape) != record.shapes[entry.name]:
            return problem(422, "shape_mismatch",
                           f"gradient {entry.name!r} has shape {list(entry.shape)}, the parameter "
                           f"{record.shapes[entry.name]}", stepper=record.name)
        got = codec.dtype_name(entry.dtype)
        if got != record.dtypes[entry.name] and got != wire:
            return problem(422, "dtype_mismatch",
                           f"gradient {entry.name!r} has dtype {got}, the parameter "
                           f"{record.dtypes[entry.name]}", stepper=record.name)
    # The step every shard is at (known from the last step, else asked), checked before
    # any shard sees this one.
    steps = ingress.steps.get(record.name)
    if steps is None:
        states = await ingress.fan_out(record, request, "GET",
                                       f"{API}/steppers/{record.name}",
                                       [[]] * len(record.shards), [None] * len(record.shards))
        error = _first_error(states)
        if error is not None:
            return error
        steps = [int(json.loads(c)["step"]) for _, _, c in states]
    key = request.headers.get("idempotency-key") or f"ingress-{uuid.uuid4().hex}"
    expected = request.query_params.get("expected_step")
    # Shards at different steps: the last step reached some but not all (an actor died
    # mid-step and its slot came back without it). The lowest is the stepper's step; that
    # step's key completes it on the others and replays on those that have it.
    current = min(steps)
    if expected is not None and int(expected) != current:
        return problem(409, "step_conflict",
                       f"expected step {expected}, but stepper {record.name!r} is at step "
                       f"{current}", stepper=record.name, current_step=current)
    base = int(expected) if expected is not None else current
    sub_query = [(k, v) for k, v in query if k != "expected_step"]
    sub_query.append(("expected_step", str(base)))
    bodies = split(body, [sh.params for sh in record.shards])
    headers = {"idempotency-key": key}
    ingress.steps.pop(record.name, None)  # unknown until every shard has answered
    try:
        replies = await ingress.fan_out(record, request, "POST", request.url.path,
                                        [sub_query] * len(record.shards), bodies, headers)
    except _TRANSPORT_ERRORS as e:
        return problem(503, "slot_unavailable",
                       f"a shard of {record.name!r} did not answer ({type(e).__name__}) and "
                       f"its slot could not be restored in time; send the same request "
                       f"again (same Idempotency-Key) to complete the step",
                       stepper=record.name)
    failed = [(i, r) for i, r in enumerate(replies) if r[0] >= 400]
    if failed and len(failed) < len(replies):
        log.error("sharded stepper %r: shards %s refused step %d that others applied: %s",
                  record.name, [i for i, _ in failed], base + 1,
                  [r[2][:200] for _, r in failed])
        return problem(500, "shards_diverged",
                       f"shards {[record.shards[i].slot for i, _ in failed]} of stepper "
                       f"{record.name!r} refused a step the others applied; send the same "
                       f"request again (same Idempotency-Key) to complete it",
                       stepper=record.name)
    if failed:
        return _json_reply(failed[0][1])
    kind_out = replies[0][1].get("content-type", "")
    if all(r[0] == 200 for r in replies):
        ingress.steps[record.name] = [base + 1] * len(record.shards)
    if kind_out.startswith("application/json"):
        data = [json.loads(c) for _, _, c in replies]
        merged = dict(data[0])
        for field in ("stepped", "skipped"):
            joined = {n for d in data for n in d.get(field, [])}
            merged[field] = [n for n in record.params if n in joined]
        merged["replayed"] = all(bool(d.get("replayed")) for d in data)
        return JSONResponse(merged, status_code=replies[0][0])
    merged_body = merge([parse(c) for _, _, c in replies], record.params)
    return Response(merged_body, media_type=codec_media(kind_out),
                    headers={"x-adamscope-shards": str(len(record.shards)),
                             "x-adamscope-time": f"{time.time():.3f}"})



# ---------------------------------------------------------------------- sharded inspection

#: How each aggregate signal of a sharded stepper combines its shards' aggregates: norms as
#: the root of summed squares, means and fractions weighted by elements, counts added.
#: Quantiles cannot be combined exactly from per-shard quantiles: p50 is the
#: element-weighted mean of the shards' medians, and the tails are bounds (the lowest p1,
#: the highest p99), which is what an alert on them needs.
NORMS = ("grad_norm", "param_norm", "update_norm", "exp_avg_norm")
MEANS = ("exp_avg_sq_mean", "gamma_frac", "amsgrad_clamp", "eps_dominance", "lr_eff_p50")
COUNTS = ("nan_count", "inf_count")
LOWEST = ("lr_eff_p1",)
HIGHEST = ("lr_eff_p99", "shock_p99")


def _numel(record: ShardedRecord, shard: int) -> int:
    total = 0
    for n in record.shards[shard].params:
        size = 1
        for d in record.shapes.get(n, []):
            size *= int(d)
        total += size
    return total


def _finite(value: Any) -> float | None:
    """A history value as a float (the slots write non-finite ones as strings), or None
    when it is missing or NaN."""
    if value is None:
        return None
    x = float(value)
    return None if math.isnan(x) else x


def combine_aggregate(signal: str, values: Sequence[Any], weights: Sequence[int]
                      ) -> float | None:
    """One aggregate signal of a sharded stepper from its shards' (None or NaN: not
    reported by that shard)."""
    pairs = [(x, w) for x, w in ((_finite(v), w) for v, w in zip(values, weights,
                                                                 strict=True))
             if x is not None]
    if not pairs:
        return None
    if signal in NORMS:
        return math.sqrt(sum(v * v for v, _ in pairs))
    if signal in COUNTS:
        return sum(v for v, _ in pairs)
    if signal in LOWEST:
        return min(v for v, _ in pairs)
    if signal in HIGHEST:
        return max(v for v, _ in pairs)
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


async def _sharded_history(ingress: Ingress, record: ShardedRecord, request: Request
                           ) -> Response:
    query = request.query_params.multi_items()
    if request.query_params.get("format") == "csv" or request.headers.get(
            "accept", "").startswith("text/csv"):
        return problem(501, "not_supported_sharded",
                       f"the CSV history of sharded stepper {record.name!r} is not merged; "
                       f"ask for JSON")
    asked = [v for k, v in query if k == "tensor"]
    unknown = [t for t in asked if t != "*" and t not in record.params]
    if unknown:
        return _unknown(record, unknown[0])
    queries = []
    for sh in record.shards:
        mine = [t for t in asked if t == "*" or t in sh.params]
        q = [(k, v) for k, v in query if k != "tensor"] + [("tensor", t) for t in mine]
        queries.append(q)
    replies = await ingress.fan_out(record, request, "GET", request.url.path, queries,
                                    [None] * len(record.shards))
    error = _first_error(replies)
    if error is not None:
        return error
    parts = [json.loads(c) for _, _, c in replies]
    weights = [_numel(record, i) for i in range(len(record.shards))]
    merged = dict(parts[0])
    # Steps every shard recorded (they step together; a shard restored from disk may
    # lack the steps its memory-only history had).
    common = set(parts[0]["aggregate"]["steps"])
    for p in parts[1:]:
        common &= set(p["aggregate"]["steps"])
    steps = [st for st in parts[0]["aggregate"]["steps"] if st in common]
    rows = [{st: k for k, st in enumerate(p["aggregate"]["steps"])} for p in parts]
    values: dict[str, list[float | None]] = {}
    for sig in merged.get("signals", []):
        column = []
        for st in steps:
            shard_values = [p["aggregate"]["values"].get(sig, [None] * len(rows[i]))[
                rows[i][st]] for i, p in enumerate(parts)]
            column.append(combine_aggregate(sig, shard_values, weights))
        values[sig] = column
    if "update_ratio" in values:  # |update| / |p before|, from each shard's two
        values["update_ratio"] = [_update_ratio([
            (p["aggregate"]["values"].get("update_norm", [None] * (rows[i][st] + 1))[
                rows[i][st]], p["aggregate"]["values"]["update_ratio"][rows[i][st]])
            for i, p in enumerate(parts)]) for st in steps]
    times = [parts[0]["aggregate"]["time"][rows[0][st]] for st in steps]
    merged["aggregate"] = {"steps": steps, "time": times, "values": values}
    merged["tensors"] = {}
    for p in parts:
        merged["tensors"].update(p.get("tensors") or {})
    merged["tensors"] = {n: merged["tensors"][n] for n in record.params
                         if n in merged["tensors"]}
    return Response(render_json(merged), media_type="application/json")


def _update_ratio(pairs: Sequence[tuple[Any, Any]]) -> float | None:
    """|update| / |p before| of the whole stepper from each shard's (update_norm,
    update_ratio)."""
    upd = p0 = 0.0
    for u_raw, r_raw in pairs:
        u, r = _finite(u_raw), _finite(r_raw)
        if u is None or not r:
            continue
        upd += u * u
        p0 += (u / r) ** 2
    return (upd ** 0.5) / (p0 ** 0.5) if p0 else None


async def _sharded_signals(ingress: Ingress, record: ShardedRecord, request: Request
                           ) -> Response:
    n = len(record.shards)
    replies = await ingress.fan_out(record, request, "GET", request.url.path,
                                    [request.query_params.multi_items()] * n, [None] * n)
    error = _first_error(replies)
    if error is not None:
        return error
    parts = [json.loads(c) for _, _, c in replies]
    weights = [_numel(record, i) for i in range(n)]
    merged = dict(parts[0])
    tensors: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    for p in parts:
        tensors.update(p.get("tensors") or {})
        samples.update(p.get("sample") or {})
    merged["tensors"] = {k: tensors[k] for k in record.params if k in tensors}
    merged["sample"] = {k: samples[k] for k in record.params if k in samples}
    steps = [p.get("step") for p in parts]
    merged["step"] = None if None in steps else min(steps)
    aggregate = {}
    for sig in parts[0].get("aggregate") or {}:
        aggregate[sig] = combine_aggregate(
            sig, [(p.get("aggregate") or {}).get(sig) for p in parts], weights)
    if "update_ratio" in aggregate:
        aggregate["update_ratio"] = _update_ratio(
            [((p.get("aggregate") or {}).get("update_norm"),
              (p.get("aggregate") or {}).get("update_ratio")) for p in parts])
    merged["aggregate"] = aggregate
    return Response(render_json(merged), media_type="application/json")


#: Summary fields of a statistics aggregate that merge exactly across shards.
_COUNTED = ("numel", "finite", "nan", "inf", "zeros")


def merge_summaries_of_values(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The moments, extremes and counts of several tensors' values from each one's
    (exact: counts add, norms combine, the mean and standard deviation pool)."""
    out: dict[str, Any] = {k: sum(int(p.get(k) or 0) for p in parts) for k in _COUNTED}
    out["norm"] = math.sqrt(sum((_finite(p.get("norm")) or 0.0) ** 2 for p in parts))
    finite: list[tuple[int, float, float]] = []
    for p in parts:
        f, m, sd = int(p.get("finite") or 0), _finite(p.get("mean")), _finite(p.get("std"))
        if f and m is not None and sd is not None:
            finite.append((f, m, sd))
    total = sum(f for f, _, _ in finite)
    if total:
        mean = sum(f * m for f, m, _ in finite) / total
        var = sum(f * (sd * sd + (m - mean) ** 2) for f, m, sd in finite) / total
        out["mean"], out["std"] = mean, math.sqrt(max(var, 0.0))
    else:
        out["mean"] = out["std"] = math.nan
    lows = [x for x in (_finite(p.get("min")) for p in parts) if x is not None]
    highs = [x for x in (_finite(p.get("max")) for p in parts) if x is not None]
    out["min"] = min(lows) if lows else math.nan
    out["max"] = max(highs) if highs else math.nan
    return out


async def _sharded_stats(ingress: Ingress, record: ShardedRecord, request: Request
                         ) -> Response:
    query = request.query_params.multi_items()
    asked = [v for k, v in query if k == "names"]
    unknown = [a for a in asked if a not in record.params]
    if unknown:
        return _unknown(record, unknown[0])
    shards = [i for i, sh in enumerate(record.shards) if not asked or set(asked) & set(
        sh.params)]
    replies = await asyncio.gather(*(
        ingress.call(record.shards[i].slot, request, "GET", request.url.path,
                     _names_query(query, set(asked) & set(record.shards[i].params)
                                  if asked else None), None) for i in shards))
    error = _first_error(replies)
    if error is not None:
        return error
    parts = [json.loads(c) for _, _, c in replies]
    merged = dict(parts[0])
    tensors: dict[str, Any] = {}
    for p in parts:
        tensors.update(p.get("tensors") or {})
    merged["tensors"] = {k: tensors[k] for k in record.params if k in tensors}
    merged["missing"] = [m for p in parts for m in p.get("missing", [])]
    if "aggregate" in merged:
        keys = dict.fromkeys(k for p in parts for k in (p.get("aggregate") or {}))
        merged["aggregate"] = {
            key: {**merge_summaries_of_values([p["aggregate"][key] for p in parts
                                               if key in (p.get("aggregate") or {})]),
                  "shards": len(parts),
                  "note": "merged across shards: counts, norm, mean, std, min and max are "
                          "exact; quantiles and histograms are per tensor (ask for one "
                          "tensor by name)"}
            for key in keys}
    return Response(render_json(merged), media_type="application/json")


async def _sharded_alerts(ingress: Ingress, record: ShardedRecord, request: Request
                          ) -> Response:
    raw = await request.body() if request.method != "GET" else None
    n = len(record.shards)
    replies = await ingress.fan_out(record, request, request.method, request.url.path,
                                    [request.query_params.multi_items()] * n, [raw] * n)
    error = _first_error(replies)
    if error is not None:
        return error
    parts = [json.loads(c) for _, _, c in replies]
    merged = dict(parts[0])
    if "events" in merged:
        events = sorted((e for p in parts for e in p.get("events", [])),
                        key=lambda e: (e.get("step") or 0, e.get("time") or 0))
        limit = request.query_params.get("limit")
        merged["events"] = events[-int(limit):] if limit and int(limit) else events
        merged["count"] = sum(int(p.get("count", 0)) for p in parts)
        merged["active"] = [a for p in parts for a in p.get("active", [])]
    return Response(render_json(merged), status_code=replies[0][0],
                    media_type="application/json")


async def _sharded_snapshots(ingress: Ingress, record: ShardedRecord, rest: str,
                             request: Request) -> Response:
    n = len(record.shards)
    query = [request.query_params.multi_items()] * n
    if rest == "snapshots" and request.method == "GET":
        return await ingress.forward(request, record.shards[0].slot)
    raw = await request.body()
    if rest == "snapshots" and request.method == "POST":
        # One name on every shard: the caller's, or one chosen here.
        try:
            asked = codec.load_json(raw, "body").get("name") if raw else None
        except (ValueError, AttributeError):
            return problem(400, "malformed_body", "the body must be JSON {\"name\": ...}")
        snap = asked or time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime()) + \
            f"-{uuid.uuid4().hex[:6]}"
        raw = json.dumps({"name": snap}).encode()
        headers = {"content-type": "application/json"}
        replies = await ingress.fan_out(record, request, "POST", request.url.path, query,
                                        [raw] * n, headers, retry=False)
    else:
        replies = await ingress.fan_out(record, request, request.method, request.url.path,
                                        query, [raw or None] * n)
    return _first_error(replies) or _json_reply(replies[0])
