"""Server-Sent Events: frames, and a streaming response that stops when its client goes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .reply import render_json

__all__ = ["EVENT_STREAM", "EventStreamResponse", "sse_frame"]

EVENT_STREAM = "text/event-stream"


def sse_frame(kind: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\n".encode() + b"data: " + render_json(data) + b"\n\n"


class EventStreamResponse(Response):
    """``text/event-stream`` from an async iterator, which stops as soon as the client
    disconnects (a listener on ``receive`` cancels it); ``cleanup`` always runs."""

    media_type = EVENT_STREAM

    def __init__(
        self, body: AsyncIterator[bytes], cleanup: Callable[[], None], status_code: int = 200
    ) -> None:
        super().__init__(
            None, status_code, headers={"cache-control": "no-cache", "x-accel-buffering": "no"}
        )
        # Response(None) declares "content-length: 0", which a real server enforces: a
        # stream has no length.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._body = body
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in self._body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            streaming = asyncio.ensure_future(stream())
            listening = asyncio.ensure_future(disconnected())
            try:
                done, _ = await asyncio.wait(
                    {streaming, listening}, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for task in (streaming, listening):
                    task.cancel()
                for task in (streaming, listening):
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await task
            if streaming in done and not streaming.cancelled():
                streaming.result()  # a failure while streaming is not swallowed
        finally:
            self._cleanup()
            with contextlib.suppress(Exception):
                await self._body.aclose()  # type: ignore[attr-defined]
