"""What the sync and async clients share: request building and response parsing (no I/O).

Each API call is described by a :class:`Call` (method, path, query, body, and how to parse
the answer); :class:`~client.Client` and :class:`~client.AsyncClient` only differ in how they
send it.
"""

from __future__ import annotations

import json
import math
import os
import random
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import torch

from . import codec
from .constants import META_DRY_RUN, META_REPLAYED, META_SKIPPED, META_STEPPED, OPTION_NAMES
from .errors import APIStatusError, ProtocolError, TransportError, error_from_problem
from .progress import Progress
from .protocol import (
    API_PREFIX,
    META_GROUPS,
    META_SPEC,
    META_STEP,
    AlertRule,
    AlertsReport,
    BiasCorrectionReport,
    CheckpointInfo,
    HistoryReport,
    LossRecorded,
    SnapshotInfo,
    SnapshotList,
    StepperSummary,
)
from .transport import WIRE_EXTENSION

__all__ = ["DEFAULT_URL", "Call", "StepReply", "resolve_url"]

DEFAULT_URL = "http://127.0.0.1:8470"
OCTET = "application/octet-stream"


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


@dataclass
class Call:
    """One API request: what to send, and how to turn the answer into a result.

    ``parts`` is a tensor body as a list of byte strings and memoryviews of tensor memory:
    a list (not a generator) so a transport can send it again on a fresh connection.
    ``receive``, when set, consumes a successful answer's body incrementally through a
    ``readinto`` function instead of ``parse`` getting the whole body.
    """

    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    params: list[tuple[str, str]] = field(default_factory=list)
    json_body: Any = None
    parts: list[bytes | memoryview] | None = None
    accept: str = "application/json"
    receive: Callable[[ReadInto], Any] | None = None
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
        direct = (t is not None and t.device.type == "cpu" and t.is_contiguous()
                  and t.dtype == entry.dtype and list(t.shape) == entry.shape)
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
        problem = {"status": response.status_code, "code": f"http_{response.status_code}",
                   "detail": response.text[:500] or response.reason_phrase}
    raise error_from_problem(problem)


def _tensors(response: httpx.Response) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        return codec.decode(response.content)
    except codec.CodecError as e:
        raise ProtocolError(f"server sent an invalid safetensors body: {e}") from None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as e:
        raise ProtocolError(f"server sent invalid JSON: {e}") from None


def _path(name: str, *rest: str) -> str:
    return "/".join([f"{API_PREFIX}/steppers/{quote(name, safe='')}", *rest])


def _names(names: Sequence[str] | None, key: str = "name") -> list[tuple[str, str]]:
    return [(key, n) for n in names] if names is not None else []


def _named(params: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]]
           ) -> list[tuple[str, torch.Tensor]]:
    return list(params.items()) if isinstance(params, Mapping) else list(params)


# ---------------------------------------------------------------------- call builders

def health() -> Call:
    return Call("GET", "/healthz", _json)


def list_steppers() -> Call:
    return Call("GET", f"{API_PREFIX}/steppers",
                lambda r: [StepperSummary.model_validate(s) for s in _json(r)["steppers"]])


def get(name: str) -> Call:
    return Call("GET", _path(name), lambda r: StepperSummary.model_validate(_json(r)))


def create(
    name: str,
    params: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
    optimizer: str,
    device: str | None,
    groups: Sequence[Mapping[str, Any]] | None,
    hyperparameters: Mapping[str, Any],
    durability: Mapping[str, Any] | None = None,
    shards: int | None = None,
) -> Call:
    named = _named(params)
    spec: dict[str, Any] = {
        "name": name,
        "optimizer": optimizer,
        "params": [{"name": n} for n, _ in named],
        "hyperparameters": _jsonable_options(hyperparameters),
    }
    if device is not None:
        spec["device"] = device
    if groups is not None:
        spec["groups"] = [_jsonable_options(g) for g in groups]
    if durability is not None:
        spec["durability"] = dict(durability)
    parts = tensor_parts(dict(named), {META_SPEC: json.dumps(spec)})
    return Call("POST", f"{API_PREFIX}/steppers", lambda r: StepperSummary.model_validate(_json(r)),
                parts=parts, params=[("shards", str(shards))] if shards is not None else [])


def delete(name: str) -> Call:
    return Call("DELETE", _path(name), lambda r: None)


def step(
    name: str,
    grads: Mapping[str, torch.Tensor | None],
    return_params: bool,
    param_groups: Sequence[Mapping[str, Any]] | None,
    into: Mapping[str, torch.Tensor] | None = None,
    only_stepped: bool = False,
    wire_dtype: torch.dtype | None = None,
    key: str | None = None,
    expected_step: int | None = None,
    contribution: tuple[int, int, float] | None = None,
) -> Call:
    """A step. ``key`` (default: a fresh UUID) makes retries of it safe: the service applies
    a key once. ``contribution`` is ``(worker, contributors, wait seconds)``."""
    metadata = {}
    if param_groups is not None:
        metadata[META_GROUPS] = json.dumps([_jsonable_options(g) for g in param_groups])
    sent = {n: g for n, g in grads.items() if g is not None}
    if wire_dtype is not None:
        sent = {n: g.to(wire_dtype) if g.is_floating_point() else g for n, g in sent.items()}
    parts = tensor_parts(sent, metadata)

    def parse(r: httpx.Response) -> StepReply:
        data = _json(r)
        return StepReply(data["step"], data["stepped"], data["skipped"],
                         replayed=data.get("replayed", False), applied=data.get("applied", True),
                         pending=data.get("pending", []))

    def receive(readinto: ReadInto) -> StepReply:
        tensors, meta = receive_tensors(readinto, into)
        replayed = bool(json.loads(meta.get(META_REPLAYED, "false")))
        stepped = json.loads(meta.get(META_STEPPED, "[]"))
        skipped = (json.loads(meta[META_SKIPPED]) if META_SKIPPED in meta
                   else [n for n in tensors if n not in set(stepped)])  # an older server
        return StepReply(int(meta[META_STEP]), stepped, skipped, tensors, replayed=replayed)

    params = []
    if return_params:
        params.append(("return_params", "true"))
        if only_stepped:
            params.append(("only_stepped", "true"))
    if wire_dtype is not None:
        params.append(("wire_dtype", codec.dtype_name(wire_dtype)))
    if expected_step is not None:
        params.append(("expected_step", str(expected_step)))
    if contribution is not None:
        worker, contributors, wait = contribution
        params += [("worker", str(worker)), ("contributors", str(contributors)),
                   ("wait", repr(float(wait)))]
    return Call("POST", _path(name, "step"), parse, params=params, parts=parts,
                accept=OCTET if return_params else "application/json",
                receive=receive if return_params else None, idempotent=True,
                extra_headers={"idempotency-key": key or uuid.uuid4().hex})


def commit(name: str) -> Call:
    return Call("POST", _path(name, "commit"), lambda r: StepReply(
        (d := _json(r))["step"], d["stepped"], d["skipped"]), idempotent=False)


def is_tensor_body(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith(OCTET)


def retry_delay(attempt: int, backoff: float) -> float:
    """Exponential backoff with jitter: ``backoff * 2**attempt``, times 0.5 to 1."""
    return float(backoff * 2**attempt * (0.5 + random.random() / 2))


def should_retry(call: Call, error: Exception) -> bool:
    """Connection failures and 5xx (but 501 and 507, which repeat) may be retried; a call
    that may have reached the server only when it is idempotent (a step carries a key)."""
    if isinstance(error, TransportError):
        cause = error.__cause__
        return call.retryable or isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout)
    if isinstance(error, APIStatusError):
        return call.retryable and error.status in (500, 502, 503, 504)
    return False


def get_params(name: str, names: Sequence[str] | None,
               into: Mapping[str, torch.Tensor] | None = None) -> Call:
    return Call("GET", _path(name, "params"), lambda r: _tensors(r)[0],
                params=_names(names), accept=OCTET,
                receive=lambda readinto: receive_tensors(readinto, into)[0])


def put_params(name: str, tensors: Mapping[str, torch.Tensor]) -> Call:
    return Call("PUT", _path(name, "params"), _json, parts=tensor_parts(dict(tensors)))


def get_state(name: str, names: Sequence[str] | None, keys: Sequence[str] | None,
              with_params: bool = False) -> Call:
    def parse(r: httpx.Response) -> dict[str, dict[str, torch.Tensor]]:
        return nest(_tensors(r)[0])

    def nest(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names or []}
        for k, t in flat.items():
            pname, _, key = k.rpartition(".")
            out.setdefault(pname, {})[key] = t
        return out

    flag = [("with_params", "true")] if with_params else []
    return Call("GET", _path(name, "state"), parse,
                params=_names(names) + _names(keys, "key") + flag, accept=OCTET,
                receive=lambda readinto: nest(receive_tensors(readinto)[0]))


def put_state(
    name: str,
    state: Mapping[str, Mapping[str, torch.Tensor]],
    param_groups: Sequence[Mapping[str, Any]] | None,
    replace: bool,
) -> Call:
    flat = {f"{p}.{k}": t for p, entries in state.items() for k, t in entries.items()}
    metadata = {}
    if param_groups is not None:
        metadata[META_GROUPS] = json.dumps([_jsonable_options(g) for g in param_groups])
    return Call("PUT", _path(name, "state"), _json, parts=tensor_parts(flat, metadata),
                params=[("replace", "true")] if replace else [])


def reset_state(name: str, names: Sequence[str] | None) -> Call:
    return Call("DELETE", _path(name, "state"), _json, params=_names(names))


def set_hyperparameters(name: str, group: int | None, options: Mapping[str, Any]) -> Call:
    body = _jsonable_options(options)
    if group is not None:
        body["group"] = group
    return Call("PATCH", _path(name, "hyperparameters"),
                lambda r: StepperSummary.model_validate(_json(r)), json_body=body)


def bias_correction(name: str, step: float | None) -> Call:
    return Call("GET", _path(name, "bias-correction"),
                lambda r: BiasCorrectionReport.model_validate(_json(r)),
                params=[("step", repr(float(step)))] if step is not None else [])


def _jsonable_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as JSON. Tensor-valued ``lr``/``betas`` are refused: PyTorch computes with
    them as tensors (float32 arithmetic), which a float on the wire would not reproduce."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        values = v if isinstance(v, tuple | list) else [v]
        if any(torch.is_tensor(x) for x in values):
            raise TypeError(
                f"a tensor-valued {k} cannot be sent to a remote optimizer bit-exactly; "
                "pass a Python float"
            )
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


# ---------------------------------------------------------------------- state_dict mapping



def to_state_dict(
    summary: StepperSummary, state: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, Any]:
    """Name-keyed remote state -> a PyTorch ``Optimizer.state_dict()`` (index-keyed).

    Indices follow PyTorch's rule: parameters numbered in param-group order.
    """
    order = [n for g in summary.groups for n in g.params]
    index = {n: i for i, n in enumerate(order)}
    packed_state = {index[n]: {k: state[n][k] for k in ("step", "exp_avg", "exp_avg_sq",
                                                          "max_exp_avg_sq") if k in state[n]}
                    for n in order if state.get(n)}
    groups = []
    for g in summary.groups:
        opts = g.model_dump(include=set(OPTION_NAMES))
        opts["betas"] = tuple(opts["betas"])
        groups.append({**opts, "params": [index[n] for n in g.params]})
    return {"state": packed_state, "param_groups": groups}


def from_state_dict(
    summary: StepperSummary, state_dict: Mapping[str, Any]
) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """A PyTorch ``state_dict`` -> (name-keyed state, per-group options) for this stepper.

    Saved parameter ids are matched to the stepper's parameters positionally, group by group,
    exactly as ``Optimizer.load_state_dict`` does.
    """
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(summary.groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    id_to_name: dict[Any, str] = {}
    options = []
    for saved, g in zip(saved_groups, summary.groups, strict=True):
        if len(saved["params"]) != len(g.params):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of "
                "optimizer's group"
            )
        id_to_name.update(zip(saved["params"], g.params, strict=True))
        options.append({k: saved[k] for k in OPTION_NAMES if k in saved})
    state: dict[str, dict[str, torch.Tensor]] = {}
    for pid, entries in state_dict.get("state", {}).items():
        if pid not in id_to_name:
            continue  # PyTorch ignores state for ids no group names
        state[id_to_name[pid]] = {
            k: (v if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float32))
            for k, v in entries.items()
        }
    return state, options


# ---------------------------------------------------------------------- durability and snapshots

#: Download/upload chunk size for snapshot files.
FILE_CHUNK = 1 << 20


def durability_policy(
    policy: str | Mapping[str, Any] | None = None, n: int | None = None,
    seconds: float | None = None,
) -> dict[str, Any] | None:
    """A durability policy as JSON: ``"every_step"``, ``"every_n"`` with ``n``,
    ``"interval"`` with ``seconds``, ``"manual"``, or a ``{"mode": ...}`` mapping."""
    if policy is None:
        return None
    out: dict[str, Any] = {"mode": policy} if isinstance(policy, str) else dict(policy)
    if n is not None:
        out["n"] = n
    if seconds is not None:
        out["seconds"] = seconds
    return out


def checkpoint(name: str) -> Call:
    return Call("POST", _path(name, "checkpoint"),
                lambda r: CheckpointInfo.model_validate(_json(r)))


def set_durability(name: str, policy: Mapping[str, Any]) -> Call:
    return Call("PUT", _path(name, "durability"),
                lambda r: StepperSummary.model_validate(_json(r)), json_body=dict(policy))


def take_snapshot(name: str, snap: str | None) -> Call:
    return Call("POST", _path(name, "snapshots"),
                lambda r: SnapshotInfo.model_validate(_json(r)),
                json_body={"name": snap} if snap is not None else None)


def list_snapshots(name: str) -> Call:
    return Call("GET", _path(name, "snapshots"),
                lambda r: SnapshotList.model_validate(_json(r)).snapshots)


def restore_snapshot(name: str, snap: str) -> Call:
    return Call("POST", _path(name, "snapshots", quote(snap, safe=""), "restore"),
                lambda r: StepperSummary.model_validate(_json(r)))


def delete_snapshot(name: str, snap: str) -> Call:
    return Call("DELETE", _path(name, "snapshots", quote(snap, safe="")), lambda r: None)


def snapshot_file_path(name: str, snap: str) -> str:
    """Where a snapshot file is downloaded from (streamed by the clients)."""
    return _path(name, "snapshots", quote(snap, safe=""))


def import_request(name: str | None, device: str | None) -> tuple[str, list[tuple[str, str]]]:
    """Path and query of an import upload (streamed by the clients)."""
    query = [("name", name)] if name is not None else []
    if device is not None:
        query.append(("device", device))
    return f"{API_PREFIX}/steppers/import", query


def upload_headers(size: int) -> dict[str, str]:
    return {"accept": "application/json", "content-type": OCTET, "content-length": str(size)}


def progress_chunks(data: bytes, bar: Progress) -> Iterator[memoryview]:
    """``data`` in chunks, advancing ``bar`` as each one has been taken for sending."""
    view = memoryview(data)
    for i in range(0, len(view), FILE_CHUNK):
        chunk = view[i : i + FILE_CHUNK]
        yield chunk
        bar.update(len(chunk))


def summary_of(response: httpx.Response) -> StepperSummary:
    return StepperSummary.model_validate(_json(response))


# ---------------------------------------------------------------------- history, alerts, events

#: How JSON spells the floats it has no numbers for (protobuf's convention, used by the
#: service for signals, losses and alert values).
SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def json_float(value: float) -> float | str:
    """A float for a JSON body: NaN/Inf as their conventional strings."""
    if math.isfinite(value):
        return float(value)
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _float(value: Any) -> Any:
    return SPECIAL_FLOATS.get(value, value) if isinstance(value, str) else value


def _signal_floats(values: Any) -> Any:
    return {k: _float(v) for k, v in values.items()} if isinstance(values, dict) else values


def event_floats(data: dict[str, Any]) -> dict[str, Any]:
    """A stream event's data with its NaN/Inf strings turned back into floats (only where
    numbers belong: signals, losses, alert values)."""
    out = dict(data)
    if "aggregate" in out:
        out["aggregate"] = _signal_floats(out["aggregate"])
    if isinstance(out.get("tensors"), dict):
        out["tensors"] = {n: _signal_floats(v) for n, v in out["tensors"].items()}
    if "loss" in out:
        out["loss"] = _float(out["loss"])
    if isinstance(out.get("alerts"), list):
        out["alerts"] = [{**a, **{k: _float(a.get(k)) for k in ("value", "previous",
                                                                  "threshold") if k in a}}
                         for a in out["alerts"]]
    return out


def history(name: str, signals: Sequence[str] | str | None, tensors: Sequence[str] | str | None,
            since: int | None, limit: int | None, fmt: str) -> Call:
    """``fmt="json"``: a HistoryReport; ``"csv"``: the CSV text."""
    if fmt not in ("json", "csv"):
        raise ValueError(f"fmt must be 'json' or 'csv', got {fmt!r}")
    if isinstance(signals, str):
        signals = [signals]
    if isinstance(tensors, str):
        tensors = [tensors]
    params = _names(signals, "signal") + _names(tensors, "tensor") + [("format", fmt)]
    if since is not None:
        params.append(("since", str(since)))
    if limit is not None:
        params.append(("limit", str(limit)))
    if fmt == "csv":
        return Call("GET", _path(name, "history"), lambda r: r.text, params=params,
                    accept="text/csv")
    return Call("GET", _path(name, "history"),
                lambda r: HistoryReport.model_validate(_json(r)), params=params)


def alerts(name: str, limit: int | None) -> Call:
    return Call("GET", _path(name, "alerts"), lambda r: AlertsReport.model_validate(_json(r)),
                params=[("limit", str(limit))] if limit is not None else [])


def set_alerts(name: str, rules: Sequence[AlertRule | Mapping[str, Any]] | None) -> Call:
    body = None if rules is None else [
        r.model_dump(mode="json", exclude_none=True) if isinstance(r, AlertRule) else dict(r)
        for r in rules]
    return Call("PUT", _path(name, "alerts"), lambda r: AlertsReport.model_validate(_json(r)),
                json_body={"rules": body})


def report_loss(name: str, step: int | None, loss: float) -> Call:
    body: dict[str, Any] = {"loss": json_float(float(loss))}
    if step is not None:
        body["step"] = step
    # Recording the same (step, loss) again changes nothing: safe to retry with a step.
    return Call("POST", _path(name, "loss"), lambda r: LossRecorded.model_validate(_json(r)),
                json_body=body, idempotent=step is not None)


def events_request(
    steppers: Sequence[str] | str | None, tensors: Sequence[str] | None, replay: int,
    last_event_id: str | None, heartbeat: float | None, max_events: int | None,
    duration: float | None,
) -> tuple[str, list[tuple[str, str]], dict[str, str]]:
    """Path, query and headers of a ``GET /v1/events`` stream."""
    if isinstance(steppers, str):
        steppers = [steppers]
    params = _names(steppers, "stepper") + _names(tensors, "tensor")
    for key, value in (("replay", replay or None), ("heartbeat", heartbeat),
                       ("max_events", max_events), ("duration", duration)):
        if value is not None:
            params.append((key, str(value)))
    headers = {"accept": "text/event-stream"}
    if last_event_id is not None:
        headers["last-event-id"] = last_event_id
    return f"{API_PREFIX}/events", params, headers


class SSEParser:
    """Server-Sent Events, line by line (the WHATWG event-stream rules this service uses):
    ``feed(line)`` returns a finished event ``{"event", "id", "data"}`` at a blank line,
    and with ``heartbeats`` a ``{"event": "heartbeat"}`` for a comment line."""

    def __init__(self, heartbeats: bool = False) -> None:
        self.heartbeats = heartbeats
        self.last_id: str | None = None
        self._kind = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> dict[str, Any] | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._kind = "message"
                return None
            text = "\n".join(self._data)
            kind, self._kind, self._data = self._kind, "message", []
            try:
                data = json.loads(text)
            except ValueError as e:
                raise ProtocolError(f"event {kind!r} carries invalid JSON: {e}") from None
            if isinstance(data, dict):
                data = event_floats(data)
            return {"event": kind, "id": self.last_id, "data": data}
        if line.startswith(":"):
            return {"event": "heartbeat", "id": self.last_id, "data": None} \
                if self.heartbeats else None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self._kind = value
        elif field == "data":
            self._data.append(value)
        elif field == "id":
            self.last_id = value
        return None


# ---------------------------------------------------------------------- inspection (stats)

#: Fields of the inspection replies that hold text, never a number (a stepper or
#: parameter may be named "NaN"): left alone when NaN/Inf strings become floats again.
_TEXT_FIELDS = frozenset({"stepper", "name", "key", "index", "snapshot", "dtype", "error",
                          "reason", "option", "in"})
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def inspection_floats(value: Any, field_name: str | None = None) -> Any:
    """An inspection reply with the strings NaN / Infinity / -Infinity, which stand for
    non-finite numbers in JSON, turned back into floats where numbers belong."""
    if isinstance(value, dict):
        return {k: inspection_floats(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [inspection_floats(v, None) if isinstance(v, dict) else v for v in value]
    if isinstance(value, str) and field_name not in _TEXT_FIELDS and value in _NONFINITE:
        return _NONFINITE[value]
    return value


@dataclass
class DryRunReply:
    """A dry run's report (statistics of the update and gradient per tensor, aggregate,
    signals) and, when asked for, the would-be tensors: ``{param: {"update", "param",
    "exp_avg", ...}}``."""

    report: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]] | None = None


def _stats_query(quantiles: Sequence[float] | None, bins: int,
                 hist_range: tuple[float, float] | None, log: bool,
                 log_range: tuple[float, float] | None) -> list[tuple[str, str]]:
    params = [("bins", str(bins))]
    if quantiles is not None:
        params.append(("quantiles", ",".join(repr(float(q)) for q in quantiles)))
    if hist_range is not None:
        params.append(("range", ",".join(repr(float(x)) for x in hist_range)))
    if log:
        params.append(("log", "true"))
    if log_range is not None:
        params.append(("log_range", ",".join(repr(float(x)) for x in log_range)))
    return params


def stats(name: str, names: Sequence[str] | None, keys: Sequence[str] | None,
          quantiles: Sequence[float] | None, bins: int, hist_range: tuple[float, float] | None,
          log: bool, log_range: tuple[float, float] | None, aggregate: bool) -> Call:
    params = _names(names) + _names(keys, "key") + _stats_query(
        quantiles, bins, hist_range, log, log_range)
    if not aggregate:
        params.append(("aggregate", "false"))
    return Call("GET", _path(name, "stats"), lambda r: inspection_floats(_json(r)),
                params=params)


def signals(name: str) -> Call:
    return Call("GET", _path(name, "signals"), lambda r: inspection_floats(_json(r)))


def slice_tensor(name: str, param: str, key: str, index: str | int | None,
                 rows: str | None) -> Call:
    params = [("name", param), ("key", key)]
    if index is not None:
        params.append(("index", str(index)))
    if rows is not None:
        params.append(("rows", rows))

    def parse(r: httpx.Response) -> torch.Tensor:
        data = _json(r)
        return codec.tensor_from_json(data["data"], codec.dtype_from_name(data["dtype"]),
                                      data["shape"])

    return Call("GET", _path(name, "slice"), parse, params=params)


def dry_run(name: str, grads: Mapping[str, torch.Tensor],
            param_groups: Sequence[Mapping[str, Any]] | None, return_update: bool,
            quantiles: Sequence[float] | None, bins: int, log: bool) -> Call:
    metadata = {}
    if param_groups is not None:
        metadata[META_GROUPS] = json.dumps([_jsonable_options(g) for g in param_groups])
    parts = tensor_parts(dict(grads), metadata)
    params = _stats_query(quantiles, bins, None, log, None)
    if return_update:
        params.append(("return_update", "true"))

    def parse(r: httpx.Response) -> DryRunReply:
        if not is_tensor_body(r):
            return DryRunReply(inspection_floats(_json(r)))
        flat, meta = _tensors(r)
        nested: dict[str, dict[str, torch.Tensor]] = {}
        for k, t in flat.items():
            pname, _, which = k.rpartition(".")
            nested.setdefault(pname, {})[which] = t
        return DryRunReply(inspection_floats(json.loads(meta[META_DRY_RUN])), nested)

    # It changes nothing, so a retry is always safe.
    return Call("POST", _path(name, "dry-run"), parse, params=params, parts=parts,
                accept=OCTET if return_update else "application/json", idempotent=True)


def diff(a: str, b: str) -> Call:
    return Call("GET", f"{API_PREFIX}/diff", lambda r: inspection_floats(_json(r)),
                params=[("a", a), ("b", b)])
