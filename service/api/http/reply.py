"""Replies: tensors as safetensors (streamed from their memory) or JSON, and JSON with
non-finite numbers spelled out.

Floats that are NaN or infinite leave as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` in JSON (protobuf's convention; JSON numbers cannot spell them). A
safetensors reply is the header followed by the tensors' own memory, sent as views (no
serialization copy) while the stepper's write gate keeps the tensors unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import Response
from pydantic import ConfigDict, TypeAdapter
from starlette.types import Receive, Scope, Send

from adamscope.client import codec
from adamscope.client.constants import META_STEP, META_STEPPER

from ...errors import ApiError
from .media import OCTET

__all__ = [
    "TensorStreamResponse",
    "check_json_size",
    "json_response",
    "json_tensors",
    "render_json",
    "tensor_response",
]

_JSON = TypeAdapter(Any, config=ConfigDict(ser_json_inf_nan="strings"))


def render_json(value: Any) -> bytes:
    """JSON with non-finite floats as ``"NaN"``/``"Infinity"``/``"-Infinity"``."""
    return _JSON.dump_json(value)


def json_response(value: Any, status_code: int = 200) -> Response:
    return Response(render_json(value), status_code=status_code, media_type="application/json")


def check_json_size(request: Request, tensors: list[torch.Tensor]) -> None:
    limit: int = request.app.state.settings.max_json_elements
    n = sum(t.numel() for t in tensors)
    if n > limit:
        raise ApiError(
            "json_too_large",
            f"{n} elements exceed the JSON limit of {limit}; request format=safetensors instead",
            limit=limit,
        )


def json_tensors(request: Request, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    check_json_size(request, list(tensors.values()))
    return {k: codec.tensor_to_json(t) for k, t in tensors.items()}


def tensor_response(
    tensors: Mapping[str, torch.Tensor],
    stepper: str,
    step: int,
    extra_metadata: Mapping[str, str] | None = None,
) -> Response:
    metadata = {META_STEPPER: stepper, META_STEP: str(step), **(extra_metadata or {})}
    return Response(
        codec.encode(tensors, metadata),
        media_type=OCTET,
        headers={"X-Adamscope-Step": str(step)},
    )


#: The last bytes of a streamed reply are sent as a copy, see TensorStreamResponse.
TAIL_COPY_BYTES = 1 << 20


class TensorStreamResponse(Response):
    """A safetensors reply sent from the tensors' memory, then ``await release()`` runs.

    The transport may still hold the last bytes handed to it when the final message has
    been sent; so that none of those can be tensor memory that changes once the gate is
    released, the last ``TAIL_COPY_BYTES`` go out as a copy, and an empty final message
    follows it: uvicorn waits for its write buffer to drain below the low-water mark
    (far below the copied tail) before writing that message, so every byte taken from
    tensor memory has reached the kernel when ``release`` runs.
    """

    media_type = OCTET

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        stepper: str,
        step: int,
        extra_metadata: Mapping[str, str] | None = None,
        release: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        metadata = {META_STEPPER: stepper, META_STEP: str(step), **(extra_metadata or {})}
        head, views = codec.encode_parts(tensors, metadata)
        self._parts = [memoryview(head), *views]
        self._release = release
        length = sum(p.nbytes for p in self._parts)
        super().__init__(
            None, headers={"content-length": str(length), "x-adamscope-step": str(step)}
        )

    def _parts_with_copied_tail(self) -> list[bytes | memoryview]:
        total = sum(p.nbytes for p in self._parts)
        keep = max(0, total - TAIL_COPY_BYTES)
        out: list[bytes | memoryview] = []
        tail = bytearray()
        pos = 0
        for p in self._parts:
            n = p.nbytes
            if pos + n <= keep:
                out.append(p)
            elif pos >= keep:
                tail += p
            else:
                out.append(p[: keep - pos])
                tail += p[keep - pos :]
            pos += n
        out.append(bytes(tail))
        return out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            for part in self._parts_with_copied_tail():
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if self._release is not None:
                await self._release()
