"""Checkpoints: a stepper as one self-describing safetensors file, and back.

A checkpoint holds everything a stepper is: its parameter values, every Adam state tensor,
the optimizer kind, each param group's options, the step count and the engine's ``journal``.
It is a plain safetensors file that any safetensors reader opens:

* tensors ``param/<name>`` for every parameter (in the stepper's order), then
  ``state/<name>/<key>`` for the Adam state that exists (``key``: ``step``, ``exp_avg``,
  ``exp_avg_sq``, ``max_exp_avg_sq``; a parameter that never stepped has none);
* ``__metadata__["adamscope.checkpoint"]``, a JSON object (format version 1)::

      {"format": "adamscope-checkpoint", "version": 1,
       "stepper": "run1", "optimizer": "adam" | "adamw", "device": "cpu",
       "params": ["w", "b"],                      # parameter order
       "groups": [{"params": ["w", "b"], "options": {"lr": 0.001, "betas": [0.9, 0.999],
                   ...every torch.optim.Adam option...}}],
       "step": 12, "created_at": ..., "updated_at": ..., "saved_at": ...,  # Unix seconds
       "torch": "2.13.0", "extra": {...},         # extra: engine bookkeeping
       "idempotency": {...}}                      # the keys of the last keyed steps

  (``idempotency`` is :class:`~.journal.KeyJournal`'s compact form: its size does not grow
  with the run, so neither do the header and the time a write takes), plus whatever the
  caller annotates (the service adds ``durability`` and, for snapshots,
  ``snapshot``), and ``adamscope.step`` / ``adamscope.stepper`` as on every tensor body.

Every checkpoint the service writes stays readable by it and by the reference
``safetensors`` library (whose header ceiling is :data:`adamscope.client.codec.MAX_HEADER_BYTES`):
:func:`check_header_room` refuses, at creation, a stepper whose names would make the header
of its checkpoint (with every state tensor and a full journal) larger than that, and
:func:`write` refuses to write one that is.

Restoring goes through the stepper's own state load (``Optimizer.load_state_dict``), so a
restored stepper continues bit for bit like one that never stopped. Nothing is unpickled:
tensors are rebuilt from dtype, shape and raw bytes by :mod:`adamscope.client.codec`.
"""

from __future__ import annotations

import copy
import json
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adamscope.client import codec
from adamscope.client.constants import (
    META_CHECKPOINT,
    META_STEP,
    META_STEPPER,
)

from .errors import CheckpointTooLarge, EngineError, InvalidCheckpoint, StepperExists
from .header import (
    FORMAT,
    FORMAT_VERSION,
    PARAM_PREFIX,
    RESERVED,
    STATE_PREFIX,
    check,
    check_header_room,
    header_bound,
    parse_header,
)
from .journal import JournalError, KeyJournal
from .memory import stage_on_host
from .spec import GroupDef
from .state import STATE_KEYS
from .stepper import Stepper

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "Encoded",
    "build",
    "check_header_room",
    "check_layout",
    "header_bound",
    "decode",
    "encode",
    "encode_held_elsewhere",
    "header_from_prefix",
    "load_into",
    "write",
]

#: A GPU stepper's checkpoint up to this size is copied to the host in one batch (one
#: page-locked buffer, one wait); a larger one tensor by tensor, where the copies' time
#: dwarfs their waits, and no page-locked buffer of its size (which PyTorch's host
#: allocator would round up to a power of two and keep cached) is taken.
STAGE_LIMIT = 512 * 2**20


@dataclass(frozen=True)
class Encoded:
    """A checkpoint's bytes (empty when written by :func:`write`), its header, the
    ``Stepper.version`` it reflects and its size in bytes."""

    data: bytes
    header: dict[str, Any]
    version: int
    size: int

    @property
    def step(self) -> int:
        return int(self.header["step"])


@dataclass
class Checkpoint:
    """A decoded, validated checkpoint (not yet a stepper)."""

    header: dict[str, Any]
    params: list[tuple[str, torch.Tensor]]
    state: dict[str, dict[str, torch.Tensor]]

    @property
    def name(self) -> str:
        return str(self.header["stepper"])

    @property
    def kind(self) -> str:
        return str(self.header["optimizer"])

    @property
    def device(self) -> str:
        return str(self.header["device"])

    @property
    def step(self) -> int:
        return int(self.header["step"])

    @property
    def groups(self) -> list[GroupDef]:
        return [GroupDef(list(g["params"]), dict(g["options"])) for g in self.header["groups"]]


# ---------------------------------------------------------------------- stepper -> bytes


def _tensors_of(stepper: Stepper) -> dict[str, torch.Tensor]:
    """Every parameter, then every state tensor that exists, by checkpoint name."""
    tensors: dict[str, torch.Tensor] = {}
    for n, p in zip(stepper.names, stepper.params, strict=True):
        tensors[PARAM_PREFIX + n] = p.detach()
    for n in stepper.names:
        s = stepper.param_state(n)
        for key in STATE_KEYS:
            if key in s:
                tensors[f"{STATE_PREFIX}{n}/{key}"] = s[key]
    return tensors


def _header_of(stepper: Stepper) -> dict[str, Any]:
    groups = [
        {"params": list(stepper.group_names[gi]), "options": options}
        for gi, options in enumerate(stepper.group_options())
    ]
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "stepper": stepper.name,
        "optimizer": stepper.kind,
        "device": str(stepper.device),
        "params": list(stepper.names),
        "groups": groups,
        "step": stepper.step_count,
        "created_at": stepper.created_at,
        "updated_at": stepper.updated_at,
        "saved_at": time.time(),
        "torch": torch.__version__,
        "extra": stepper.journal,
        "idempotency": stepper.keys.to_json(),
    }


def _check_annotations(annotations: Mapping[str, Any] | None) -> None:
    extra_keys = set(annotations or {}) & RESERVED
    if extra_keys:
        raise ValueError(f"annotations may not replace {sorted(extra_keys)}")


def _emit(
    name: str,
    step: int,
    tensors: Mapping[str, torch.Tensor],
    header: Mapping[str, Any],
    sink: Callable[[list[bytes | memoryview]], int],
) -> tuple[int, dict[str, Any]]:
    """Hand a checkpoint's chunks to ``sink``: its size and its header as written."""
    metadata = {
        META_CHECKPOINT: json.dumps(header, separators=(",", ":")),
        META_STEP: str(step),
        META_STEPPER: name,
    }
    head, views = codec.encode_parts(tensors, metadata)
    if len(head) - 8 > codec.MAX_HEADER_BYTES:
        raise CheckpointTooLarge(
            f"the checkpoint of {name!r} would have a {len(head) - 8}-byte header, "
            f"over the {codec.MAX_HEADER_BYTES} bytes safetensors readers accept; it was "
            "not written",
            stepper=name,
        )
    size = sink([head, *views])
    # The header as written (the journal copied by the JSON round trip).
    return size, json.loads(metadata[META_CHECKPOINT])


def write(
    stepper: Stepper,
    sink: Callable[[list[bytes | memoryview]], int],
    annotations: Mapping[str, Any] | None = None,
) -> Encoded:
    """Hand the stepper's checkpoint to ``sink`` as a list of byte chunks, under its lock.

    The chunks are views of the stepper's own tensor memory (no serialization copy), valid
    only while ``sink`` runs: the lock keeps every tensor at one step until it returns, so
    the checkpoint is never a mix of two. ``sink`` returns the number of bytes it took.
    The returned :class:`Encoded` has no ``data``.
    """
    _check_annotations(annotations)
    with stepper.lock:
        tensors = _tensors_of(stepper)
        header = {**_header_of(stepper), **(annotations or {})}
        if (
            stepper.device.type != "cpu"
            and sum(t.numel() * t.element_size() for t in tensors.values()) <= STAGE_LIMIT
        ):
            tensors = stage_on_host(tensors)  # one batched copy to the host, one wait
        size, written = _emit(stepper.name, stepper.step_count, tensors, header, sink)
        version = stepper.version
    return Encoded(b"", written, version, size)


def encode_held_elsewhere(
    stepper: Stepper,
    step: int,
    params: Mapping[str, torch.Tensor],
    state: Mapping[str, Mapping[str, torch.Tensor]],
    annotations: Mapping[str, Any] | None = None,
) -> Encoded:
    """A checkpoint of ``stepper``'s layout, options and journal at ``step`` with tensors
    it does not hold: a watched run's, as its trainer uploaded them (every parameter's
    value in ``params``, state by parameter and key). The same file format, so it lists,
    downloads and decodes as any checkpoint."""
    _check_annotations(annotations)
    with stepper.lock:
        header = {**_header_of(stepper), "step": step, **(annotations or {})}
        version = stepper.version
    tensors = {PARAM_PREFIX + n: params[n] for n in stepper.names}
    for n in stepper.names:
        for key in STATE_KEYS:
            if key in state.get(n, {}):
                tensors[f"{STATE_PREFIX}{n}/{key}"] = state[n][key]
    out: list[bytes] = []
    join = _joiner(out)
    size, written = _emit(stepper.name, step, tensors, header, join)
    return Encoded(out[0], written, version, size)


def _joiner(out: list[bytes]) -> Callable[[list[bytes | memoryview]], int]:
    """A sink that joins a checkpoint's chunks into one bytes object, appended to ``out``."""

    def join(parts: list[bytes | memoryview]) -> int:
        out.append(b"".join(parts))
        return len(out[0])

    return join


def encode(stepper: Stepper, annotations: Mapping[str, Any] | None = None) -> Encoded:
    """The stepper's checkpoint as bytes (one copy of its tensors, made under its lock)."""
    out: list[bytes] = []
    join = _joiner(out)
    enc = write(stepper, join, annotations)
    return Encoded(out[0], enc.header, enc.version, enc.size)


def decode(data: bytes | bytearray | memoryview) -> Checkpoint:
    """Parse and validate checkpoint bytes (raises :class:`InvalidCheckpoint`)."""
    try:
        tensors, metadata = codec.decode(data)
    except codec.CodecError as e:
        raise InvalidCheckpoint(f"not a valid safetensors file: {e}") from None
    header = parse_header(metadata)
    names: list[str] = header["params"]
    known = set(names)
    params: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith(PARAM_PREFIX):
            n = key[len(PARAM_PREFIX) :]
            check(n in known, f"checkpoint tensor {key!r} names no listed parameter")
            params[n] = t
        elif key.startswith(STATE_PREFIX):
            n, _, which = key[len(STATE_PREFIX) :].rpartition("/")
            check(
                n in known and which in STATE_KEYS,
                f"checkpoint tensor {key!r} is not 'state/<parameter>/<key>' with key one of "
                + ", ".join(STATE_KEYS),
            )
            state.setdefault(n, {})[which] = t
        else:
            raise InvalidCheckpoint(f"unexpected tensor {key!r} in checkpoint")
    missing = [n for n in names if n not in params]
    check(not missing, f"checkpoint lacks the values of parameter(s) {missing}")
    return Checkpoint(header, [(n, params[n]) for n in names], state)


def header_from_prefix(read: Callable[[int], bytes]) -> dict[str, Any]:
    """A checkpoint's header read from the start of a file (``read(n)`` returns the next n
    bytes), without reading any tensor data."""
    prefix = read(8)
    check(len(prefix) == 8, "file too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix)
    check(n <= codec.MAX_HEADER_BYTES, f"safetensors header of {n} bytes is too large")
    raw = read(n)
    check(len(raw) == n, "file ends inside its safetensors header")
    try:
        head = codec.load_json(raw, "safetensors header")
    except codec.CodecError as e:
        raise InvalidCheckpoint(str(e)) from None
    check(isinstance(head, dict), "safetensors header must be a JSON object")
    metadata = head.get("__metadata__")
    check(
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()),
        "safetensors __metadata__ must map strings to strings",
    )
    return parse_header(metadata)


# ---------------------------------------------------------------------- checkpoint -> stepper


def _journals(ckpt: Checkpoint) -> tuple[dict[str, Any], KeyJournal]:
    """The checkpoint's ``extra`` bookkeeping and idempotency journal, validated."""
    extra = copy.deepcopy(ckpt.header.get("extra", {}))
    keys = KeyJournal([n for n, _ in ckpt.params])
    try:
        if "idempotency" in ckpt.header:
            keys.load_json(ckpt.header["idempotency"])
        else:  # written before the compact journal: its keys sat in "extra"
            legacy = extra.pop("keys", None)
            keys.load_legacy(legacy if isinstance(legacy, dict) else {})
    except JournalError as e:
        raise InvalidCheckpoint(f"checkpoint of {ckpt.name!r} does not load: {e}") from None
    return extra, keys


def _finish(
    stepper: Stepper,
    ckpt: Checkpoint,
    journals: tuple[dict[str, Any], KeyJournal],
    *,
    restore_times: bool,
) -> None:
    stepper.step_count = ckpt.step
    stepper.journal, stepper.keys = journals
    if restore_times:
        stepper.created_at = float(ckpt.header["created_at"])
        stepper.updated_at = float(ckpt.header["updated_at"])


def build(ckpt: Checkpoint, device: torch.device, name: str | None = None) -> Stepper:
    """A new stepper on ``device`` equal to the checkpoint (optionally under another name).

    Everything is validated by the stepper itself (groups, options through PyTorch, every
    state tensor); a checkpoint that does not load raises :class:`InvalidCheckpoint`.
    """
    options = [g.options for g in ckpt.groups]
    journals = _journals(ckpt)
    try:
        stepper = Stepper(name or ckpt.name, ckpt.kind, device, ckpt.params, {}, ckpt.groups)
        with stepper.lock:
            stepper.put_state(ckpt.state, options, replace=True)
            _finish(stepper, ckpt, journals, restore_times=True)
    except (InvalidCheckpoint, StepperExists):
        raise
    except EngineError as e:
        raise InvalidCheckpoint(f"checkpoint of {ckpt.name!r} does not load: {e.detail}") from None
    except (TypeError, ValueError) as e:  # a value of the right JSON type PyTorch still refuses
        raise InvalidCheckpoint(f"checkpoint of {ckpt.name!r} does not load: {e}") from None
    return stepper


def check_layout(stepper: Stepper, ckpt: Checkpoint) -> None:
    """The checkpoint has the stepper's optimizer, parameters (order, shapes, dtypes) and
    groups: only its values and options may differ."""
    problems = []
    if ckpt.kind != stepper.kind:
        problems.append(f"optimizer {ckpt.kind!r} vs {stepper.kind!r}")
    if [n for n, _ in ckpt.params] != stepper.names:
        problems.append("different parameter names or order")
    else:
        for n, t in ckpt.params:
            shape, dtype = stepper.param_meta(n)
            if list(t.shape) != shape or t.dtype != dtype:
                problems.append(
                    f"parameter {n!r} is {codec.dtype_name(t.dtype)}{list(t.shape)}, "
                    f"stepper has {codec.dtype_name(dtype)}{shape}"
                )
    if [g.params for g in ckpt.groups] != stepper.group_names:
        problems.append("different param groups")
    if problems:
        raise InvalidCheckpoint(
            f"checkpoint of {ckpt.name!r} does not fit stepper {stepper.name!r}: "
            + "; ".join(problems)
        )


def load_into(stepper: Stepper, ckpt: Checkpoint) -> None:
    """Make an existing stepper equal to the checkpoint (a roll back), atomically: the
    layout and the whole state are validated before anything changes."""
    with stepper.lock:
        check_layout(stepper, ckpt)
        journals = _journals(ckpt)
        try:
            stepper.put_state(ckpt.state, [g.options for g in ckpt.groups], replace=True)
        except EngineError as e:
            raise InvalidCheckpoint(
                f"checkpoint of {ckpt.name!r} does not load: {e.detail}"
            ) from None
        stepper.put_params(dict(ckpt.params))
        _finish(stepper, ckpt, journals, restore_times=False)
