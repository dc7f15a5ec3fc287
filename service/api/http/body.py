"""Request bodies: read as they arrive, limited in size and time, and parsed.

Small bodies (JSON, create and import bodies) are read whole (:func:`read_body`); tensor
bodies are streamed in place (:mod:`.ingest`). Either way a body is refused (413) once it
passes ``max_body_bytes`` and (408) when the client stalls (:class:`BodyStream`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import torch
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from adamscope.client import codec

from ...errors import ApiError

__all__ = [
    "INLINE_JSON_BYTES",
    "BodyStream",
    "declared_length",
    "decode_tensors",
    "json_object",
    "meta_json",
    "read_body",
    "read_json_object",
]


def declared_length(request: Request, limit: int) -> int | None:
    """The request's Content-Length, refused up front (413) when it exceeds ``limit``."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        size = int(declared)
    except ValueError:
        raise ApiError("malformed_body", f"invalid Content-Length {declared!r}") from None
    if size > limit:
        raise ApiError(
            "payload_too_large",
            f"body of {size} bytes exceeds the limit of {limit} bytes",
            limit=limit,
        )
    return size


class BodyStream:
    """A request body's chunks as they arrive, watched: 408 ``request_timeout`` when the
    client sends nothing for ``body_timeout`` seconds while the service waits for it, or
    when a :meth:`deadline` passes (a slow sender cannot hold a request open).

    One timer per request does the watching, re-armed only when it fires, so a chunk costs
    two clock reads (``asyncio.timeout`` per chunk costs ~5 to 15 us, ``wait_for`` a task:
    on a 40 MB body of 256 KB chunks, milliseconds per step). When the watched wait is over
    time the timer cancels the waiting task, and the cancellation, thrown in at that wait,
    becomes the 408 here.
    """

    def __init__(self, request: Request) -> None:
        self._chunks = request.stream().__aiter__()
        self.timeout: float = request.app.state.settings.body_timeout
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._since = self._loop.time()  # the last chunk, or the start of the current wait
        self._deadline: float | None = None
        self._waiting = False
        self._fired: str | None = None
        self._timer: asyncio.TimerHandle | None = None

    def deadline(self, seconds: float | None) -> None:
        """Whatever arrives must have arrived within ``seconds`` from now (None: no
        deadline, only the idle timeout)."""
        self._deadline = None if seconds is None else self._loop.time() + seconds
        self._disarm()

    def _due(self) -> float:
        due = self._since + self.timeout
        return due if self._deadline is None else min(due, self._deadline)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if not self._waiting:
            return  # re-armed by the next wait
        if self._loop.time() < self._due():
            self._timer = self._loop.call_at(self._due(), self._check)
            return
        idle = self._deadline is None or self._since + self.timeout <= self._deadline
        self._fired = (
            f"the body stalled: no bytes arrived for {self.timeout:g} s"
            if idle
            else "the safetensors header did not arrive in time"
        )
        self._task.cancel()

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        self._since = self._loop.time()
        self._waiting = True
        if self._timer is None:
            self._timer = self._loop.call_at(self._due(), self._check)
        try:
            chunk = await self._chunks.__anext__()
        except asyncio.CancelledError:
            if self._fired is None:
                raise
            self._task.uncancel()
            raise ApiError(
                "request_timeout",
                f"{self._fired} (body_timeout: {self.timeout:g} s)",
                timeout=self.timeout,
            ) from None
        except StopAsyncIteration:
            self._disarm()
            raise
        finally:
            self._waiting = False
        self._since = self._loop.time()
        return chunk

    def close(self) -> None:
        self._disarm()


async def read_body(request: Request) -> bytearray:
    """The whole request body (small JSON and create bodies), refused with 413 once it
    passes ``max_body_bytes``; tensor bodies are streamed in place (:mod:`.ingest`)."""
    limit: int = request.app.state.settings.max_body_bytes
    declared_length(request, limit)
    buf = bytearray()
    stream = BodyStream(request)
    try:
        async for chunk in stream:
            if len(buf) + len(chunk) > limit:
                raise ApiError(
                    "payload_too_large", f"body exceeds the limit of {limit} bytes", limit=limit
                )
            buf += chunk
    finally:
        stream.close()
    return buf


def decode_tensors(body: bytes | bytearray) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not body:
        raise ApiError("malformed_body", "empty body: expected a safetensors buffer")
    return codec.decode(body)


#: A JSON body longer than this is parsed in a worker thread, off the event loop.
INLINE_JSON_BYTES = 64 * 1024


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request's JSON object body (see :func:`json_object`), parsed off the event loop
    when it is large."""
    body = await read_body(request)
    if len(body) <= INLINE_JSON_BYTES:
        return json_object(body)
    return await run_in_threadpool(json_object, body)


def json_object(body: bytes | bytearray) -> dict[str, Any]:
    try:
        value = codec.load_json(body, "body")
    except codec.CodecError as e:
        raise ApiError("malformed_body", str(e)) from None
    if not isinstance(value, dict):
        raise ApiError("malformed_body", "JSON body must be an object")
    return value


def meta_json(metadata: Mapping[str, str], key: str) -> Any:
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return codec.load_json(raw, f"metadata {key!r}")
    except codec.CodecError as e:
        raise ApiError("malformed_body", str(e)) from None
