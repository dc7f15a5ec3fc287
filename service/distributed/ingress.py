"""The ingress's link to the slots: requests forwarded to the slot services and their
replies streamed back, fan-outs to a sharded stepper's shards, and the slots' event
streams joined into one.

Every request about a stepper goes to the slot that holds it (:mod:`.cluster`): the slot's
service, the single-process app unchanged, answers it. When a slot's actor is found dead
its slot is recovered from its files and an idempotent request is sent again (a step
carries an idempotency key, so it is applied exactly once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from adamscope.client.constants import API_PREFIX

from ..errors import problem_response
from .cluster import Cluster, ClusterConfig, ShardedRecord

__all__ = ["Ingress", "Reply", "first_error"]

#: Request headers not passed on to a slot (hop by hop, or recomputed).
_DROP_REQUEST = {
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
    "expect",
}
_DROP_REPLY = {"content-length", "connection", "keep-alive", "transfer-encoding", "server", "date"}
_TRANSPORT_ERRORS = (httpx.TransportError,)
TRANSPORT_ERRORS = _TRANSPORT_ERRORS

#: A slot's whole reply: status, headers, body.
Reply = tuple[int, dict[str, str], bytes]


def first_error(replies: Sequence[Reply]) -> Response | None:
    """The first slot's problem among ``replies``, passed on as it came."""
    for status, headers, content in replies:
        if status >= 400:
            return Response(
                content,
                status_code=status,
                media_type=headers.get("content-type", "application/json"),
            )
    return None


class Ingress:
    """The routing logic (one per ingress replica)."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.cluster = Cluster(config)
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        self.locks: dict[str, asyncio.Lock] = {}
        #: Each sharded stepper's shards' steps as its last step left them (forgotten on
        #: any doubt: a failed step, a recovery, a change made through another route).
        self.steps: dict[str, list[int]] = {}
        self.subscribers: set[asyncio.Queue[bytes]] = set()
        self.cluster.listeners.append(self._on_cluster_event)
        self._started: asyncio.Task[None] | None = None
        #: Why the slots did not start (the service then answers 503 saying so).
        self.start_error: str | None = None
        #: Set when the service stops: the event streams end, so that Serve's graceful
        #: shutdown does not wait out its timeout for streams that never end by themselves.
        self.closing = asyncio.Event()

    async def ready(self) -> None:
        """Start the slots (once; again after a failed start)."""
        if self._started is None or (
            self._started.done()
            and (self._started.cancelled() or self._started.exception() is not None)
        ):
            self._started = asyncio.get_running_loop().create_task(self.cluster.start())
        await asyncio.shield(self._started)
        self.cluster.start_monitor()

    def lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    # ------------------------------------------------------------------ forwarding

    def _headers(self, request: Request, extra: dict[str, str] | None = None) -> dict[str, str]:
        out = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        out.update(extra or {})
        return out

    async def send(
        self,
        slot: int,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]],
        headers: dict[str, str],
        body: bytes | None,
        *,
        retry: bool,
    ) -> httpx.Response:
        """One request to a slot's service (streamed reply); when the slot's actor is found
        dead, recover it and, if ``retry``, send again."""
        for attempt in (0, 1):
            if self.cluster.slots[slot].state != "ok":
                await self.cluster.check(slot)
            url = self.cluster.slots[slot].url + path
            req = self.http.build_request(
                method, url, params=list(query), headers=headers, content=body
            )
            try:
                return await self.http.send(req, stream=True)
            except _TRANSPORT_ERRORS:
                if await self.cluster.alive(slot):
                    raise
                recovered = await self.cluster.recover(slot)
                if not (retry and recovered) or attempt:
                    raise
        raise AssertionError("unreachable")

    async def forward(
        self,
        request: Request,
        slot: int,
        *,
        body: bytes | None = None,
        path: str | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> Response:
        """Pass ``request`` on to ``slot`` and stream the reply back."""
        if body is None:
            body = await request.body()
        method = request.method
        headers = self._headers(request, extra_headers)
        retry = method in ("GET", "HEAD", "PUT", "PATCH", "DELETE") or (
            "idempotency-key" in {k.lower() for k in headers}
        )
        try:
            reply = await self.send(
                slot,
                method,
                path or request.url.path,
                request.query_params.multi_items(),
                headers,
                body,
                retry=retry,
            )
        except _TRANSPORT_ERRORS as e:
            return problem_response(
                "slot_unavailable",
                f"slot {slot} did not answer ({type(e).__name__}); "
                f"its steppers are being restored, retry the request",
                request.url.path,
                slot=slot,
            )
        return StreamingResponse(
            reply.aiter_raw(),
            status_code=reply.status_code,
            headers={k: v for k, v in reply.headers.items() if k.lower() not in _DROP_REPLY},
            background=BackgroundTask(reply.aclose),
        )

    async def call(
        self,
        slot: int,
        request: Request,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]],
        body: bytes | None,
        extra_headers: dict[str, str] | None = None,
        *,
        retry: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        """A whole request to a slot: (status, headers, body)."""
        reply = await self.send(
            slot, method, path, query, self._headers(request, extra_headers), body, retry=retry
        )
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
            request.query_params.multi_items()
        )

        async def pump(index: int) -> None:
            while True:
                slot = self.cluster.slots[index]
                if slot.state != "ok":
                    await asyncio.sleep(0.5)
                    continue
                try:
                    async with self.http.stream(
                        "GET", slot.url + f"{API_PREFIX}/events", params=query, headers=headers
                    ) as reply:
                        if reply.status_code >= 500:  # a slot coming back: ask again
                            await asyncio.sleep(0.5)
                            continue
                        if reply.status_code != 200:  # the caller's problem (a token's)
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
            while not self.closing.is_set():
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

    async def stop(self) -> None:
        """End the event streams, then stop the slots (each writes what it owes); once."""
        if self.closing.is_set():
            return
        self.closing.set()
        await self.cluster.stop()

    # ------------------------------------------------------------------ sharded steppers

    def record(self, name: str) -> ShardedRecord | None:
        return self.cluster.sharded.get(name)

    async def slot_for(self, name: str) -> int | None:
        """The slot that holds unsharded stepper ``name`` (asking the slots when unknown)."""
        slot = self.cluster.slot_of(name)
        if slot is None:
            await self.cluster.refresh()
            slot = self.cluster.slot_of(name)
        return slot

    async def anywhere(self, request: Request) -> Response:
        """``request`` answered by any live slot (what no one stepper is about)."""
        live = self.cluster.ranked()
        if not live:
            return problem_response("slot_unavailable", "no slot is serving", request.url.path)
        return await self.forward(request, live[0].index)

    async def fan_out(
        self,
        record: ShardedRecord,
        request: Request,
        method: str,
        path: str,
        queries: Sequence[Sequence[tuple[str, str]]],
        bodies: Sequence[bytes | None],
        extra: dict[str, str] | None = None,
        retry: bool = True,
    ) -> list[tuple[int, dict[str, str], bytes]]:
        return list(
            await asyncio.gather(
                *(
                    self.call(sh.slot, request, method, path, q, b, extra, retry=retry)
                    for sh, q, b in zip(record.shards, queries, bodies, strict=True)
                )
            )
        )
