"""Tensor request bodies, parsed as they arrive and read into their destinations.

A step moves 4 bytes per fp32 parameter each way; at 10M parameters that is 40 MB in and
40 MB out, so how the bytes are handled decides the step's latency. Here:

- the request body is parsed as it arrives: the safetensors header first (every tensor is
  validated before any data is read), then each tensor's bytes are copied from the
  received chunks straight into its destination (the stepper's reusable gradient buffer),
  never joined into one body first;
- a header is never larger than the stepper it addresses can need (:func:`header_limit`),
  is held only as its bytes arrive (a declared length reserves nothing), must arrive within
  ``body_timeout`` seconds, and is parsed and checked off the event loop when it is large.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from adamscope.client import codec

from ...engine import Stepper
from ...engine.errors import DeviceOutOfMemory
from ...engine.memory import is_out_of_memory
from ...errors import ApiError
from .body import BodyStream, declared_length
from .media import OCTET, media_type

__all__ = [
    "BodyReader",
    "WireLayout",
    "header_limit",
    "ingest_layout",
    "ingest_tensors",
    "layout_buffer",
]

T = TypeVar("T")

#: A safetensors header longer than this is parsed and checked in a worker thread.
INLINE_HEADER_BYTES = 64 * 1024
#: Header bytes any body may spend beyond its tensors' entries: metadata such as each
#: group's options, and whatever a client adds.
HEADER_SLACK = 64 * 1024
#: Longest header entry of one tensor beyond its name and shape (punctuation, the longest
#: dtype tag, two 20-digit offsets) plus its place in a PyTorch state_dict's param_groups.
_ENTRY_BYTES = len('"":{"dtype":"BF16","shape":[],"data_offsets":[,]},') + 2 * 20


def header_limit(stepper: Stepper) -> int:
    """The largest safetensors header a body for ``stepper`` can need: one entry per state
    tensor of every parameter (``"<name>.max_exp_avg_sq"``, the longest key), each name
    twice more in the metadata (a state_dict's ``param_names`` and ``params``, escaped),
    plus :data:`HEADER_SLACK`. A header beyond it is refused before it is read (the
    serving state computes it once per stepper)."""
    limit = HEADER_SLACK + 4096 * len(stepper.group_names)
    for name, p in zip(stepper.names, stepper.params, strict=True):
        quoted = len(json.dumps(name))
        dims = sum(len(str(d)) + 1 for d in p.shape)
        limit += 4 * (quoted + len(".max_exp_avg_sq") + dims + _ENTRY_BYTES)
        limit += 2 * (2 * quoted + 24)
    return min(limit, codec.MAX_HEADER_BYTES)


async def _off_loop_if(large: bool, work: Callable[[], T]) -> T:
    """``work()`` in a worker thread when ``large`` (a big header's parse and checks would
    stall every other request on the event loop), else right here."""
    if not large:
        return work()
    return await run_in_threadpool(work)


class BodyReader:
    """Reads an ASGI request body incrementally, enforcing the size limit."""

    def __init__(self, chunks: AsyncIterator[bytes], limit: int) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")
        self._limit = limit
        self.received = 0
        self._done = False

    async def _fill(self) -> bool:
        while not self._pending.nbytes:
            if self._done:
                return False
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._done = True
                return False
            self.received += len(chunk)
            if self.received > self._limit:
                raise ApiError(
                    "payload_too_large",
                    f"body exceeds the limit of {self._limit} bytes",
                    limit=self._limit,
                )
            self._pending = memoryview(chunk)
        return True

    async def read_into(self, dest: memoryview) -> bool:
        """Fill ``dest`` completely from the body; False if the body ends first."""
        filled, size = 0, dest.nbytes
        while filled < size:
            if not await self._fill():
                return False
            n = min(self._pending.nbytes, size - filled)
            dest[filled : filled + n] = self._pending[:n]
            self._pending = self._pending[n:]
            filled += n
        return True

    async def read_bytes(self, size: int) -> bytes | None:
        """The next ``size`` bytes, held only as they arrive (a length the client declares
        reserves nothing); None if the body ends first."""
        parts: list[bytes] = []
        got = 0
        while got < size:
            if not await self._fill():
                return None
            n = min(self._pending.nbytes, size - got)
            parts.append(bytes(self._pending[:n]))
            self._pending = self._pending[n:]
            got += n
        return b"".join(parts)

    async def at_end(self) -> bool:
        return not await self._fill()


def fresh_tensor(entry: codec.Entry) -> torch.Tensor:
    return torch.empty(entry.shape, dtype=entry.dtype)


async def _read_header(
    request: Request, header_bytes: int
) -> tuple[BodyReader, bytes, int | None, int]:
    """Check the body's type and declared size, read its safetensors prefix and header (at
    most ``header_bytes`` long, complete within ``body_timeout``): ``(reader, header bytes,
    declared length, limit)``."""
    kind = media_type(request)
    if kind not in (OCTET, ""):
        raise ApiError("unsupported_media_type", f"Content-Type {kind!r}: send {OCTET}")
    settings = request.app.state.settings
    limit: int = settings.max_body_bytes
    declared = declared_length(request, limit)
    if declared == 0:
        raise ApiError("malformed_body", "empty body: expected a safetensors buffer")
    stream = BodyStream(request)
    stream.deadline(stream.timeout)  # the whole header, however it is dribbled
    reader = BodyReader(stream, limit)
    prefix = await reader.read_bytes(8)
    if prefix is None:
        raise codec.CodecError("body too short for a safetensors header (need at least 8 bytes)")
    n = codec.header_length(prefix)
    if n > header_bytes:
        raise ApiError(
            "payload_too_large",
            f"safetensors header of {n} bytes: a body for this "
            f"stepper needs at most {header_bytes}",
            limit=header_bytes,
        )
    if declared is not None and 8 + n > declared:
        raise codec.CodecError(
            f"safetensors header claims {n} bytes but the body has only {declared - 8}"
        )
    head = await reader.read_bytes(n)
    if head is None:
        raise codec.CodecError(
            f"safetensors header claims {n} bytes but the body has only {reader.received - 8}"
        )
    stream.deadline(None)  # the data: only the idle timeout
    return reader, head, declared, limit


def _check_declared(declared: int | None, head: bytes, length: int) -> None:
    """A body whose Content-Length disagrees with the data its header lays out."""
    if declared is not None and declared != 8 + len(head) + length:
        raise codec.CodecError(
            f"tensor data covers {length} bytes but the body carries {declared - 8 - len(head)}"
        )


def _parse_checked(
    head: bytes, declared: int | None, limit: int
) -> tuple[list[codec.Entry], dict[str, str], int]:
    entries, metadata, length = codec.parse_header(head)
    n = len(head)
    _check_declared(declared, head, length)
    if 8 + n + length > limit:  # a chunked body's header: refuse before allocating for it
        raise ApiError(
            "payload_too_large",
            f"body of {8 + n + length} bytes (as its header "
            f"lays it out) exceeds the limit of {limit} bytes",
            limit=limit,
        )
    return entries, metadata, length


async def _read_data(reader: BodyReader, views: list[memoryview], head: bytes, length: int) -> None:
    for view in views:
        if not await reader.read_into(view):
            raise codec.CodecError(
                f"tensor data covers {length} bytes but the body carries "
                f"{reader.received - 8 - len(head)}"
            )
    if not await reader.at_end():
        raise codec.CodecError(f"tensor data covers {length} bytes but the body carries more")


async def ingest_tensors(
    request: Request,
    header_bytes: int,
    destination: Callable[[codec.Entry], torch.Tensor] = fresh_tensor,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors request body (its header at most ``header_bytes`` long: see
    :func:`header_limit`) straight into the tensors ``destination`` names.

    ``destination(entry)`` is called for every tensor of the header before any data is
    read; it returns the (CPU, contiguous) tensor to fill, or raises to reject the request.
    A body that ends early, runs long or contradicts its header is ``malformed_body``; in
    every failure case the destinations may hold partial data but nothing else changed.
    """
    reader, head, declared, limit = await _read_header(request, header_bytes)

    def parse() -> tuple[list[codec.Entry], dict[str, str], int, dict[str, torch.Tensor]]:
        entries, metadata, length = _parse_checked(head, declared, limit)
        return entries, metadata, length, {e.name: destination(e) for e in entries}

    entries, metadata, length, tensors = await _off_loop_if(len(head) > INLINE_HEADER_BYTES, parse)
    ordered = sorted(entries, key=lambda e: e.begin)
    await _read_data(reader, [codec.byte_view(tensors[e.name]) for e in ordered], head, length)
    return tensors, metadata


@dataclass
class WireLayout:
    """A body layout seen before: its exact header, and the tensors its data section is
    read into whole (views of one buffer, laid out as the header lays out the data)."""

    header: bytes
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]
    data: memoryview
    key: Any = None


def layout_buffer(
    entries: list[codec.Entry], length: int, pin: bool
) -> tuple[dict[str, torch.Tensor], memoryview] | None:
    """One buffer for a data section and each entry's tensor as a view of it; None when
    an entry's offset does not suit its dtype (a view needs its elements aligned)."""
    if any(e.begin % e.dtype.itemsize for e in entries):
        return None
    try:
        flat = torch.empty(length, dtype=torch.uint8, pin_memory=pin)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise DeviceOutOfMemory(
            f"out of page-locked host memory for a {length}-byte body ({e})"
        ) from None
    tensors = {e.name: flat[e.begin : e.end].view(e.dtype).view(e.shape) for e in entries}
    return tensors, codec.byte_view(flat)


async def ingest_layout(
    request: Request,
    known: WireLayout | None,
    key: Any,
    check: Callable[[codec.Entry], None],
    fallback: Callable[[codec.Entry], torch.Tensor] = fresh_tensor,
    pin: bool = False,
    header_bytes: int = codec.MAX_HEADER_BYTES,
) -> WireLayout | tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`ingest_tensors` for bodies that repeat (every step of a training loop sends
    the same header): when the header is ``known``'s, byte for byte, and ``key`` is its
    key, the data is read straight into its buffer and nothing is parsed or checked again
    (``check`` passed for that header). Else the header is parsed and every entry goes
    through ``check`` (which raises to reject) before a new buffer (pinned with ``pin``) is
    laid out for it; a layout no one buffer suits is read into ``fallback(entry)`` for each
    entry and returned as ``(tensors, metadata)``. A header longer than ``header_bytes``
    is refused (413) before it is read."""
    reader, head, declared, limit = await _read_header(request, header_bytes)
    if known is not None and known.key == key and known.header == head:
        length = known.data.nbytes
        _check_declared(declared, head, length)
        await _read_data(reader, [known.data], head, length)
        return known

    def parse() -> tuple[list[codec.Entry], dict[str, str], int]:
        entries, metadata, length = _parse_checked(head, declared, limit)
        for e in entries:
            check(e)
        return entries, metadata, length

    entries, metadata, length = await _off_loop_if(len(head) > INLINE_HEADER_BYTES, parse)
    # Page-locked memory is slow to allocate (the driver maps it): never on the event loop.
    laid = (
        await run_in_threadpool(layout_buffer, entries, length, pin)
        if pin
        else layout_buffer(entries, length, pin)
    )
    if laid is None:
        tensors = (
            await run_in_threadpool(lambda: {e.name: fallback(e) for e in entries})
            if pin
            else {e.name: fallback(e) for e in entries}
        )
        ordered = sorted(entries, key=lambda e: e.begin)
        await _read_data(reader, [codec.byte_view(tensors[e.name]) for e in ordered], head, length)
        return tensors, metadata
    tensors, data = laid
    await _read_data(reader, [data], head, length)
    return WireLayout(head, metadata, tensors, data, key)
