"""Tensor bodies streamed in place, and replies streamed from tensor memory.

A step moves 4 bytes per fp32 parameter each way; at 10M parameters that is 40 MB in and
40 MB out, so how the bytes are handled decides the step's latency. Here:

- the request body is parsed as it arrives: the safetensors header first (every tensor is
  validated before any data is read), then each tensor's bytes are copied from the
  received chunks straight into its destination (the stepper's reusable gradient buffer),
  never joined into one body first;
- a header is never larger than the stepper it addresses can need (:func:`header_limit`),
  is held only as its bytes arrive (a declared length reserves nothing), must arrive within
  ``body_timeout`` seconds, and is parsed and checked off the event loop when it is large;
- a reply is the safetensors header followed by the tensors' own memory, sent as views
  (no serialization copy), while the stepper's write gate keeps the tensors unchanged.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from adamscope.client import codec
from adamscope.client.protocol import META_STEP, META_STEPPER

from ...engine import Stepper
from ...engine.errors import DeviceOutOfMemory
from ...engine.memory import is_out_of_memory
from ...errors import ApiError
from .body import OCTET, BodyStream, declared_length, media_type

__all__ = [
    "BodyReader",
    "TensorStreamResponse",
    "WireLayout",
    "forget_layout",
    "gate",
    "header_limit",
    "ingest_layout",
    "ingest_tensors",
    "off_loop",
    "settle_and_release",
    "settled",
    "step_applied",
    "step_applied_event",
    "step_layouts",
    "torch_threads",
]

#: The last bytes of a streamed reply are sent as a copy, see TensorStreamResponse.
TAIL_COPY_BYTES = 1 << 20

_gates: weakref.WeakKeyDictionary[Stepper, asyncio.Lock] = weakref.WeakKeyDictionary()


#: A safetensors header longer than this is parsed and checked in a worker thread.
INLINE_HEADER_BYTES = 64 * 1024
#: Header bytes any body may spend beyond its tensors' entries: metadata such as each
#: group's options, and whatever a client adds.
HEADER_SLACK = 64 * 1024
#: Longest header entry of one tensor beyond its name and shape (punctuation, the longest
#: dtype tag, two 20-digit offsets) plus its place in a PyTorch state_dict's param_groups.
_ENTRY_BYTES = len('"":{"dtype":"BF16","shape":[],"data_offsets":[,]},') + 2 * 20
_limits: weakref.WeakKeyDictionary[Stepper, int] = weakref.WeakKeyDictionary()


def header_limit(stepper: Stepper) -> int:
    """The largest safetensors header a body for ``stepper`` can need: one entry per state
    tensor of every parameter (``"<name>.max_exp_avg_sq"``, the longest key), each name
    twice more in the metadata (a state_dict's ``param_names`` and ``params``, escaped),
    plus :data:`HEADER_SLACK`. A header beyond it is refused before it is read."""
    limit = _limits.get(stepper)
    if limit is None:
        limit = HEADER_SLACK + 4096 * len(stepper.group_names)
        for name, p in zip(stepper.names, stepper.params, strict=True):
            quoted = len(json.dumps(name))
            dims = sum(len(str(d)) + 1 for d in p.shape)
            limit += 4 * (quoted + len(".max_exp_avg_sq") + dims + _ENTRY_BYTES)
            limit += 2 * (2 * quoted + 24)
        limit = _limits[stepper] = min(limit, codec.MAX_HEADER_BYTES)
    return limit


async def _off_loop_if(large: bool, work: Callable[[], T]) -> T:
    """``work()`` in a worker thread when ``large`` (a big header's parse and checks would
    stall every other request on the event loop), else right here."""
    if not large:
        return work()
    return await run_in_threadpool(work)


#: Steppers at most this large step on the event loop itself: their update takes tens of
#: microseconds, less than the hand-off to a worker thread and back.
INLINE_NUMEL = 1 << 16

T = TypeVar("T")


#: The one thread that runs PyTorch on every core (see torch_threads); None until then.
_compute: ThreadPoolExecutor | None = None
#: Its intra-op threads: PyTorch's default count when the service started.
compute_threads = 0


def torch_threads() -> None:
    """Give PyTorch's intra-op parallelism (OpenMP) to one thread, the compute thread that
    steps CPU steppers too big to step inline; every other thread, the calling one (the
    event loop) included, runs PyTorch on one thread. Called on the event loop at startup.

    Measured on the 2-core VM: once two threads have run parallel PyTorch operations, two
    OpenMP pools exist, OpenMP stops spinning between parallel regions (more pool threads
    than cores) and every region pays a wake-up: a fused Adam step of 10M parameters in 129
    tensors takes 17 to 19 ms instead of 8. On the event loop, a parallel region in a tiny
    inline step costs more than the step where the client shares the cores (a 10K-parameter
    step: 2.9 to 5.4 ms, against 2.1 ms on one thread). PyTorch keeps the count per thread,
    and a thread that has not run an operation yet takes the value last set anywhere.
    """
    global _compute, compute_threads
    if _compute is None:
        n = compute_threads = torch.get_num_threads()

        def keep_every_core() -> None:
            torch.get_num_threads()  # this thread's count is now its own ...
            torch.set_num_threads(n)  # ... and stays n when the default changes below

        _compute = ThreadPoolExecutor(1, "adamscope-torch", initializer=keep_every_core)
        _compute.submit(lambda: None).result()
    torch.get_num_threads()
    torch.set_num_threads(1)  # this thread, and every thread that starts from now on


async def off_loop(stepper: Stepper, work: Callable[[], T]) -> T:
    """Run engine work for ``stepper`` where it runs best: inline when it is tiny and on the
    CPU; larger CPU work on the compute thread (all cores, one at a time, see
    torch_threads); GPU work in the thread pool (it launches kernels, the GPU computes).
    Heavy or GPU work never blocks the event loop."""
    if stepper.device.type == "cpu":
        if stepper.numel <= INLINE_NUMEL:
            return work()
        if _compute is not None:
            context = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(
                _compute, functools.partial(context.run, work))
    return await run_in_threadpool(work)


_applied: weakref.WeakKeyDictionary[Stepper, asyncio.Event] = weakref.WeakKeyDictionary()


def step_applied_event(stepper: Stepper) -> asyncio.Event:
    """An event set when the stepper's next step has been applied (accumulate mode waits)."""
    event = _applied.get(stepper)
    if event is None:
        event = _applied[stepper] = asyncio.Event()
    return event


def step_applied(stepper: Stepper) -> None:
    """Wake whoever waits for the step just applied; later waiters get a fresh event."""
    event = _applied.pop(stepper, None)
    if event is not None:
        event.set()


async def settled(stepper: Stepper) -> Stepper:
    """``stepper`` once its last step's signals and history are recorded: every read of
    them (signals, history, alerts, summaries, metrics) waits for this. The step route
    records them after its reply has left (:func:`settle_and_release`); a read that
    arrives meanwhile waits where that work runs, never blocking the event loop for it."""
    if stepper.unsettled:
        await off_loop(stepper, stepper.settle)
    return stepper


async def settle_and_release(stepper: Stepper, lock: asyncio.Lock) -> None:
    """Open a mutating request's gate once the stepper has settled: the step's deferred
    after-step observers (its signals and history; :meth:`Stepper.settle`) run after its
    reply has left and before anyone can write the gradient buffers they read."""
    try:
        await off_loop(stepper, stepper.settle)
    except BaseException:
        stepper.settle()  # cancelled: wait for a settle still running in a worker
        raise
    finally:
        lock.release()


def gate(stepper: Stepper) -> asyncio.Lock:
    """The stepper's write gate: held by every request that mutates it, from the first
    byte of its body until its reply has left, so a reply streamed from parameter memory
    never sees the next mutation. Reads do not take it (they copy under the engine lock)."""
    lock = _gates.get(stepper)
    if lock is None:
        lock = _gates[stepper] = asyncio.Lock()
    return lock


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
                raise ApiError("payload_too_large",
                               f"body exceeds the limit of {self._limit} bytes",
                               limit=self._limit)
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


async def _read_header(request: Request, header_bytes: int
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
        raise ApiError("payload_too_large", f"safetensors header of {n} bytes: a body for this "
                       f"stepper needs at most {header_bytes}", limit=header_bytes)
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


def _parse_checked(head: bytes, declared: int | None, limit: int
                   ) -> tuple[list[codec.Entry], dict[str, str], int]:
    entries, metadata, length = codec.parse_header(head)
    n = len(head)
    _check_declared(declared, head, length)
    if 8 + n + length > limit:  # a chunked body's header: refuse before allocating for it
        raise ApiError("payload_too_large", f"body of {8 + n + length} bytes (as its header "
                       f"lays it out) exceeds the limit of {limit} bytes", limit=limit)
    return entries, metadata, length


async def _read_data(reader: BodyReader, views: list[memoryview], head: bytes,
                     length: int) -> None:
    for view in views:
        if not await reader.read_into(view):
            raise codec.CodecError(
                f"tensor data covers {length} bytes but the body carries "
                f"{reader.received - 8 - len(head)}"
            )
    if not await reader.at_end():
        raise codec.CodecError(
            f"tensor data covers {length} bytes but the body carries more"
        )


async def ingest_tensors(
    request: Request,
    stepper: Stepper,
    destination: Callable[[codec.Entry], torch.Tensor] = fresh_tensor,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors request body for ``stepper`` straight into the tensors
    ``destination`` names.

    ``destination(entry)`` is called for every tensor of the header before any data is
    read; it returns the (CPU, contiguous) tensor to fill, or raises to reject the request.
    A body that ends early, runs long or contradicts its header is ``malformed_body``; in
    every failure case the destinations may hold partial data but nothing else changed.
    """
    reader, head, declared, limit = await _read_header(request, header_limit(stepper))

    def parse() -> tuple[list[codec.Entry], dict[str, str], int, dict[str, torch.Tensor]]:
        entries, metadata, length = _parse_checked(head, declared, limit)
        return entries, metadata, length, {e.name: destination(e) for e in entries}

    entries, metadata, length, tensors = await _off_loop_if(
        len(head) > INLINE_HEADER_BYTES, parse)
    ordered = sorted(entries, key=lambda e: e.begin)
    await _read_data(reader, [codec.byte_view(tensors[e.name]) for e in ordered], head,
                     length)
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


def layout_buffer(entries: list[codec.Entry], length: int, pin: bool
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
        raise DeviceOutOfMemory(f"out of page-locked host memory for a {length}-byte body "
                                f"({e})") from None
    tensors = {e.name: flat[e.begin:e.end].view(e.dtype).view(e.shape) for e in entries}
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
    laid = await run_in_threadpool(layout_buffer, entries, length, pin) if pin else \
        layout_buffer(entries, length, pin)
    if laid is None:
        tensors = (await run_in_threadpool(lambda: {e.name: fallback(e) for e in entries})
                   if pin else {e.name: fallback(e) for e in entries})
        ordered = sorted(entries, key=lambda e: e.begin)
        await _read_data(reader, [codec.byte_view(tensors[e.name]) for e in ordered], head,
                         length)
        return tensors, metadata
    tensors, data = laid
    await _read_data(reader, [data], head, length)
    return WireLayout(head, metadata, tensors, data, key)


#: Each stepper's last step body layout: the next step with the same header is read
#: straight into its buffer (see ingest_layout).
step_layouts: weakref.WeakKeyDictionary[Stepper, WireLayout] = weakref.WeakKeyDictionary()


def forget_layout(stepper: Stepper) -> None:
    """Drop the stepper's step body buffer (page-locked on a GPU stepper): it was deleted."""
    step_layouts.pop(stepper, None)


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
        super().__init__(None, headers={"content-length": str(length),
                                        "x-adamscope-step": str(step)})

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
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            for part in self._parts_with_copied_tail():
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if self._release is not None:
                await self._release()
