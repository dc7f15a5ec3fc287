"""The requests of the steppers, their tensors, durability and snapshots: each endpoint's
:class:`~._base.Call`, sent by the sync and async clients alike."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx
import torch

from . import codec
from ._base import (
    Call,
    ReadInto,
    StepReply,
    json_of,
    named,
    names_query,
    path,
    receive_tensors,
    tensor_parts,
    tensors_of,
)
from .constants import (
    API_PREFIX,
    META_GROUPS,
    META_REPLAYED,
    META_SKIPPED,
    META_SPEC,
    META_STEP,
    META_STEPPED,
    OCTET,
)
from .progress import Progress
from .protocol import (
    BiasCorrectionReport,
    CheckpointInfo,
    SnapshotInfo,
    SnapshotList,
    StepperSummary,
)

__all__ = ["jsonable_options"]


def health() -> Call[dict[str, Any]]:
    return Call("GET", "/healthz", json_of)


def list_steppers() -> Call[list[StepperSummary]]:
    return Call(
        "GET",
        f"{API_PREFIX}/steppers",
        lambda r: [StepperSummary.model_validate(s) for s in json_of(r)["steppers"]],
    )


def get(name: str) -> Call[StepperSummary]:
    return Call("GET", path(name), summary_of)


def create(
    name: str,
    params: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
    optimizer: str,
    device: str | None,
    groups: Sequence[Mapping[str, Any]] | None,
    hyperparameters: Mapping[str, Any],
    durability: Mapping[str, Any] | None = None,
    shards: int | None = None,
) -> Call[StepperSummary]:
    pairs = named(params)
    spec: dict[str, Any] = {
        "name": name,
        "optimizer": optimizer,
        "params": [{"name": n} for n, _ in pairs],
        "hyperparameters": jsonable_options(hyperparameters),
    }
    if device is not None:
        spec["device"] = device
    if groups is not None:
        spec["groups"] = [jsonable_options(g) for g in groups]
    if durability is not None:
        spec["durability"] = dict(durability)
    parts = tensor_parts(dict(pairs), {META_SPEC: json.dumps(spec)})
    return Call(
        "POST",
        f"{API_PREFIX}/steppers",
        summary_of,
        parts=parts,
        params=[("shards", str(shards))] if shards is not None else [],
    )


def set_kind(name: str, kind: str) -> Call[StepperSummary]:
    return Call("PATCH", path(name), summary_of, json_body={"kind": kind})


def delete(name: str) -> Call[None]:
    return Call("DELETE", path(name), lambda r: None)


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
) -> Call[StepReply]:
    """A step. ``key`` (default: a fresh UUID) makes retries of it safe: the service applies
    a key once. ``contribution`` is ``(worker, contributors, wait seconds)``."""
    metadata = {}
    if param_groups is not None:
        metadata[META_GROUPS] = json.dumps([jsonable_options(g) for g in param_groups])
    sent = {n: g for n, g in grads.items() if g is not None}
    if wire_dtype is not None:
        sent = {n: g.to(wire_dtype) if g.is_floating_point() else g for n, g in sent.items()}
    parts = tensor_parts(sent, metadata)

    def parse(r: httpx.Response) -> StepReply:
        data = json_of(r)
        return StepReply(
            data["step"],
            data["stepped"],
            data["skipped"],
            replayed=data.get("replayed", False),
            applied=data.get("applied", True),
            pending=data.get("pending", []),
        )

    def receive(readinto: ReadInto) -> StepReply:
        tensors, meta = receive_tensors(readinto, into)
        replayed = bool(json.loads(meta.get(META_REPLAYED, "false")))
        stepped = json.loads(meta.get(META_STEPPED, "[]"))
        skipped = (
            json.loads(meta[META_SKIPPED])
            if META_SKIPPED in meta
            else [n for n in tensors if n not in set(stepped)]
        )  # an older server
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
        params += [
            ("worker", str(worker)),
            ("contributors", str(contributors)),
            ("wait", repr(float(wait))),
        ]
    return Call(
        "POST",
        path(name, "step"),
        parse,
        params=params,
        parts=parts,
        accept=OCTET if return_params else "application/json",
        receive=receive if return_params else None,
        idempotent=True,
        extra_headers={"idempotency-key": key or uuid.uuid4().hex},
    )


def commit(name: str) -> Call[StepReply]:
    return Call(
        "POST",
        path(name, "commit"),
        lambda r: StepReply((d := json_of(r))["step"], d["stepped"], d["skipped"]),
        idempotent=False,
    )


def get_params(
    name: str, names: Sequence[str] | None, into: Mapping[str, torch.Tensor] | None = None
) -> Call[dict[str, torch.Tensor]]:
    return Call(
        "GET",
        path(name, "params"),
        lambda r: tensors_of(r)[0],
        params=names_query(names),
        accept=OCTET,
        receive=lambda readinto: receive_tensors(readinto, into)[0],
    )


def put_params(name: str, tensors: Mapping[str, torch.Tensor]) -> Call[dict[str, Any]]:
    return Call("PUT", path(name, "params"), json_of, parts=tensor_parts(dict(tensors)))


def get_state(
    name: str, names: Sequence[str] | None, keys: Sequence[str] | None, with_params: bool = False
) -> Call[dict[str, dict[str, torch.Tensor]]]:
    def parse(r: httpx.Response) -> dict[str, dict[str, torch.Tensor]]:
        return nest(tensors_of(r)[0])

    def nest(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names or []}
        for k, t in flat.items():
            pname, _, key = k.rpartition(".")
            out.setdefault(pname, {})[key] = t
        return out

    flag = [("with_params", "true")] if with_params else []
    return Call(
        "GET",
        path(name, "state"),
        parse,
        params=names_query(names) + names_query(keys, "key") + flag,
        accept=OCTET,
        receive=lambda readinto: nest(receive_tensors(readinto)[0]),
    )


def put_state(
    name: str,
    state: Mapping[str, Mapping[str, torch.Tensor]],
    param_groups: Sequence[Mapping[str, Any]] | None,
    replace: bool,
) -> Call[dict[str, Any]]:
    flat = {f"{p}.{k}": t for p, entries in state.items() for k, t in entries.items()}
    metadata = {}
    if param_groups is not None:
        metadata[META_GROUPS] = json.dumps([jsonable_options(g) for g in param_groups])
    return Call(
        "PUT",
        path(name, "state"),
        json_of,
        parts=tensor_parts(flat, metadata),
        params=[("replace", "true")] if replace else [],
    )


def reset_state(name: str, names: Sequence[str] | None) -> Call[dict[str, Any]]:
    return Call("DELETE", path(name, "state"), json_of, params=names_query(names))


def set_hyperparameters(
    name: str, group: int | None, options: Mapping[str, Any]
) -> Call[StepperSummary]:
    body = jsonable_options(options)
    if group is not None:
        body["group"] = group
    return Call("PATCH", path(name, "hyperparameters"), summary_of, json_body=body)


def bias_correction(name: str, step: float | None) -> Call[BiasCorrectionReport]:
    return Call(
        "GET",
        path(name, "bias-correction"),
        lambda r: BiasCorrectionReport.model_validate(json_of(r)),
        params=[("step", repr(float(step)))] if step is not None else [],
    )


def jsonable_options(options: Mapping[str, Any]) -> dict[str, Any]:
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


#: Download/upload chunk size for snapshot files.
FILE_CHUNK = 1 << 20


def durability_policy(
    policy: str | Mapping[str, Any] | None = None,
    n: int | None = None,
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


def checkpoint(name: str) -> Call[CheckpointInfo]:
    return Call(
        "POST", path(name, "checkpoint"), lambda r: CheckpointInfo.model_validate(json_of(r))
    )


def set_durability(name: str, policy: Mapping[str, Any]) -> Call[StepperSummary]:
    return Call("PUT", path(name, "durability"), summary_of, json_body=dict(policy))


def take_snapshot(name: str, snap: str | None) -> Call[SnapshotInfo]:
    return Call(
        "POST",
        path(name, "snapshots"),
        lambda r: SnapshotInfo.model_validate(json_of(r)),
        json_body={"name": snap} if snap is not None else None,
    )


def list_snapshots(name: str) -> Call[list[SnapshotInfo]]:
    return Call(
        "GET", path(name, "snapshots"), lambda r: SnapshotList.model_validate(json_of(r)).snapshots
    )


def restore_snapshot(name: str, snap: str) -> Call[StepperSummary]:
    return Call("POST", path(name, "snapshots", quote(snap, safe=""), "restore"), summary_of)


def delete_snapshot(name: str, snap: str) -> Call[None]:
    return Call("DELETE", path(name, "snapshots", quote(snap, safe="")), lambda r: None)


def snapshot_file_path(name: str, snap: str) -> str:
    """Where a snapshot file is downloaded from (streamed by the clients)."""
    return path(name, "snapshots", quote(snap, safe=""))


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
    return StepperSummary.model_validate(json_of(response))
