"""What the sync and async clients share that does no I/O: the request (:class:`Call`),
where it goes and with which token, how answers become results or exceptions, and when a
failed request may be sent again. The requests of each endpoint are built in
:mod:`._calls`, :mod:`._inspection` and :mod:`._sse`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import torch

from . import codec
from .constants import API_PREFIX, OCTET
from .errors import APIStatusError, ProtocolError, TransportError, error_from_problem
from .transport import WIRE_EXTENSION

__all__ = ["DEFAULT_URL", "Call", "DryRunReply", "StepReply", "resolve_url"]

DEFAULT_URL = "http://127.0.0.1:8470"


def resolve_url(url: str | None) -> str:
    """Constructor argument > ``ADAMSCOPE_URL`` > ``http://127.0.0.1:8470``."""
    return (url or os.environ.get("ADAMSCOPE_URL") or DEFAULT_URL).rstrip("/")


def resolve_token(token: str | None) -> str | None:
    """Constructor argument > ``ADAMSCOPE_TOKEN`` > none."""
    return token or os.environ.get("ADAMSCOPE_TOKEN") or None


def authorize(http: httpx.Client | httpx.AsyncClient, token: str | None) -> None:
    """Send ``Authorization: Bearer <token>`` with every request of ``http``.

    A token passed explicitly always applies; one from ``ADAMSCOPE_TOKEN`` does not replace
    an Authorization header a caller's own ``http_client`` already carries. httpx masks the
    header in reprs and drops it on redirects to another origin.
    """
    resolved = resolve_token(token)
    if resolved is None or (token is None and "authorization" in http.headers):
        return
    http.headers["Authorization"] = f"Bearer {resolved}"


@dataclass
class StepReply:
    """What a step returns: the stepper's new step and, on request, the new parameters."""

    step: int
    stepped: list[str]
    skipped: list[str]
    params: dict[str, torch.Tensor] | None = None
    #: The key had been applied before: this is the original result, not a new step.
    replayed: bool = False
    #: Accumulate mode: False while the step waits for other workers' contributions.
    applied: bool = True
    pending: list[int] = field(default_factory=list)


ReadInto = Callable[[memoryview], int]


T = TypeVar("T")


@dataclass
class Call(Generic[T]):
    """One API request: what to send, and how to turn the answer into a result.

    ``parts`` is a tensor body as a list of byte strings and memoryviews of tensor memory:
    a list (not a generator) so a transport can send it again on a fresh connection.
    ``receive``, when set, consumes a successful answer's body incrementally through a
    ``readinto`` function instead of ``parse`` getting the whole body.
    """

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: list[tuple[str, str]] = field(default_factory=list)
    json_body: Any = None
    parts: list[bytes | memoryview] | None = None
    accept: str = "application/json"
    receive: Callable[[ReadInto], T] | None = None
    #: Safe to send again after it may have reached the server (None: by HTTP method).
    idempotent: bool | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)

    @property
    def retryable(self) -> bool:
        if self.idempotent is not None:
            return self.idempotent
        return self.method in ("GET", "HEAD", "PUT", "DELETE", "PATCH")

    def headers(self) -> dict[str, str]:
        h = {"accept": self.accept, **self.extra_headers}
        if self.parts is not None:
            h["content-type"] = OCTET
            h["content-length"] = str(sum(len(memoryview(p).cast("B")) for p in self.parts))
        return h

    def extensions(self) -> dict[str, Any]:
        return {WIRE_EXTENSION: True} if self.parts is not None or self.receive else {}


def tensor_parts(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> list[bytes | memoryview]:
    head, views = codec.encode_parts(tensors, metadata)
    return [head, *views]


def chunk_reader(chunks: Iterator[bytes]) -> ReadInto:
    """``readinto`` over an iterator of byte chunks (for transports without zero-copy)."""
    pending = memoryview(b"")

    def readinto(dest: memoryview) -> int:
        nonlocal pending
        while not pending:
            try:
                pending = memoryview(next(chunks))
            except StopIteration:
                return 0
        n = min(pending.nbytes, dest.nbytes)
        dest[:n] = pending[:n]
        pending = pending[n:]
        return n

    return readinto


def _read_exact(readinto: ReadInto, dest: memoryview) -> None:
    filled = 0
    while filled < dest.nbytes:
        n = readinto(dest[filled:])
        if n == 0:
            raise ProtocolError(f"response ended {dest.nbytes - filled} bytes early")
        filled += n


_increment_version = getattr(torch.autograd.graph, "increment_version", None)


def receive_tensors(
    readinto: ReadInto, into: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors answer, writing each tensor straight into ``into[name]`` when that
    is a CPU-contiguous tensor of the same shape and dtype (else into a fresh tensor)."""
    prefix = memoryview(bytearray(8))
    _read_exact(readinto, prefix)
    try:
        n = codec.header_length(prefix)
        head = memoryview(bytearray(n))
        _read_exact(readinto, head)
        entries, metadata, _ = codec.parse_header(head)
    except codec.CodecError as e:
        raise ProtocolError(f"server sent an invalid safetensors body: {e}") from None
    out: dict[str, torch.Tensor] = {}
    for entry in sorted(entries, key=lambda x: x.begin):
        t = (into or {}).get(entry.name)
        direct = (
            t is not None
            and t.device.type == "cpu"
            and t.is_contiguous()
            and t.dtype == entry.dtype
            and list(t.shape) == entry.shape
        )
        if not direct:
            t = torch.empty(entry.shape, dtype=entry.dtype)
        assert t is not None
        _read_exact(readinto, codec.byte_view(t.detach()))
        if direct and _increment_version is not None:
            _increment_version(t)  # written behind autograd's back: tell it, as copy_ would
        out[entry.name] = t
    if readinto(memoryview(bytearray(1))):
        raise ProtocolError("server sent bytes after the tensor data")
    return out, metadata


def raise_for_problem(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        problem = response.json()
        if not isinstance(problem, dict) or "code" not in problem:
            raise ValueError
    except ValueError:
        problem = {
            "status": response.status_code,
            "code": f"http_{response.status_code}",
            "detail": response.text[:500] or response.reason_phrase,
        }
    raise error_from_problem(problem)


def tensors_of(response: httpx.Response) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        return codec.decode(response.content)
    except codec.CodecError as e:
        raise ProtocolError(f"server sent an invalid safetensors body: {e}") from None


def json_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as e:
        raise ProtocolError(f"server sent invalid JSON: {e}") from None


def path(name: str, *rest: str) -> str:
    return "/".join([f"{API_PREFIX}/steppers/{quote(name, safe='')}", *rest])


def names_query(names: Sequence[str] | None, key: str = "name") -> list[tuple[str, str]]:
    return [(key, n) for n in names] if names is not None else []


def named(
    params: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
) -> list[tuple[str, torch.Tensor]]:
    return list(params.items()) if isinstance(params, Mapping) else list(params)


@dataclass
class DryRunReply:
    """A dry run's report (statistics of the update and gradient per tensor, aggregate,
    signals) and, when asked for, the would-be tensors: ``{param: {"update", "param",
    "exp_avg", ...}}``."""

    report: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]] | None = None


def is_tensor_body(response: httpx.Response) -> bool:
    return bool(response.headers.get("content-type", "").startswith(OCTET))


def retry_delay(attempt: int, backoff: float) -> float:
    """Exponential backoff with jitter: ``backoff * 2**attempt``, times 0.5 to 1."""
    return float(backoff * 2**attempt * (0.5 + random.random() / 2))


def should_retry(call: Call[Any], error: Exception) -> bool:
    """Connection failures and 5xx (but 501 and 507, which repeat) may be retried; a call
    that may have reached the server only when it is idempotent (a step carries a key)."""
    if isinstance(error, TransportError):
        cause = error.__cause__
        return call.retryable or isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout)
    if isinstance(error, APIStatusError):
        return call.retryable and error.status in (500, 502, 503, 504)
    return False


def special_float(value: Any) -> Any:
    return codec.SPECIAL_FLOATS.get(value, value) if isinstance(value, str) else value


def signal_floats(values: Any) -> Any:
    return {k: special_float(v) for k, v in values.items()} if isinstance(values, dict) else values


def event_floats(data: dict[str, Any]) -> dict[str, Any]:
    """A stream event's data with its NaN/Inf strings turned back into floats (only where
    numbers belong: signals, losses, alert values)."""
    out = dict(data)
    if "aggregate" in out:
        out["aggregate"] = signal_floats(out["aggregate"])
    if isinstance(out.get("tensors"), dict):
        out["tensors"] = {n: signal_floats(v) for n, v in out["tensors"].items()}
    if "loss" in out:
        out["loss"] = special_float(out["loss"])
    if isinstance(out.get("alerts"), list):
        out["alerts"] = [
            {
                **a,
                **{
                    k: special_float(a.get(k)) for k in ("value", "previous", "threshold") if k in a
                },
            }
            for a in out["alerts"]
        ]
    return out
