"""Optimizer checkpoints into and out of a service, as a sequence of ordinary requests.

An import reads the checkpoint here, on the client (:mod:`.checkpoints`), and sends it
through the endpoints every stepper has: create (its layout, groups, options, kind and
step count; zeros), then the values (``PUT params``) and the Adam state (``PUT state``) in
chunks of about :data:`CHUNK_BYTES`, so a progress bar moves and no request holds the whole
checkpoint. The service never opens a path a caller names. If any request fails, the
half-made stepper is deleted again.

An export reads the summary, then values and state in chunks, then the summary again: if
the stepper changed in between (a step, an edit) the export is refused rather than
written inconsistent.

Both are generators of :class:`~._base.Call` (each ``yield`` sends one and receives its
result), so :class:`~.sync.Client` and :class:`~.aio.AsyncClient` drive the same code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from . import _calls, codec
from ._base import Call
from .checkpoints import (
    CheckpointError,
    OptimizerCheckpoint,
    OptimizerKind,
    ParamGroup,
    ParamState,
    Provenance,
    read_checkpoint,
    write_dcp,
    write_torch,
)
from .constants import API_PREFIX, OPTION_NAMES
from .progress import Progress
from .protocol import StepperSummary

__all__ = [
    "CHUNK_BYTES",
    "CheckpointFormatName",
    "StepInto",
    "export_flow",
    "import_flow",
    "read_source",
    "write_checkpoint",
]

#: Bytes of tensors per request of an import or export.
CHUNK_BYTES = 64 << 20

StepInto = Literal["hosted", "frozen"]
CheckpointFormatName = Literal["auto", "dcp", "torch", "hf"]
Flow = Generator[Call[Any], Any, Any]


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _chunks(sizes: Sequence[tuple[str, int]], limit: int) -> Iterator[list[str]]:
    """Names in order, grouped so that each group holds at most ``limit`` bytes (or one)."""
    batch: list[str] = []
    held = 0
    for name, size in sizes:
        if batch and held + size > limit:
            yield batch
            batch, held = [], 0
        batch.append(name)
        held += size
    if batch:
        yield batch


def stepper_options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """A saved group's options as a stepper takes them: PyTorch's Adam options only.

    Extras a scheduler added (``initial_lr``) are not options of the optimizer and are
    dropped; so is AdamW's ``decoupled_weight_decay``, which AdamW always sets itself.
    """
    out = {k: v for k, v in options.items() if k in OPTION_NAMES}
    if kind == "adamw":
        out.pop("decoupled_weight_decay", None)
    if isinstance(out.get("betas"), list):
        out["betas"] = tuple(out["betas"])
    return out


def _create(
    ckpt: OptimizerCheckpoint,
    name: str,
    step_into: StepInto,
    device: str | None,
    durability: Mapping[str, Any] | None,
) -> Call[StepperSummary]:
    params = []
    for p in ckpt:
        if p.value is None:
            raise CheckpointError(
                f"the checkpoint has no value for {p.name!r} (optimizer state alone): pass "
                "the model's weights (weights=, --weights) to import it"
            )
        params.append(
            {"name": p.name, "shape": list(p.value.shape), "dtype": codec.dtype_name(p.value.dtype)}
        )
    spec: dict[str, Any] = {
        "name": name,
        "optimizer": ckpt.kind,
        "params": params,
        "groups": [
            {
                "params": list(g.names),
                **_calls.jsonable_options(stepper_options(ckpt.kind, g.options)),
            }
            for g in ckpt.groups
        ],
        "kind": step_into,
        "step": ckpt.global_step if ckpt.global_step is not None else 0,
    }
    if device is not None:
        spec["device"] = device
    if durability is not None:
        spec["durability"] = dict(durability)
    return Call("POST", f"{API_PREFIX}/steppers", _calls.summary_of, json_body=spec)


def import_flow(
    ckpt: OptimizerCheckpoint,
    name: str,
    step_into: StepInto,
    device: str | None,
    durability: Mapping[str, Any] | None,
    progress: bool | None,
) -> Flow:
    """Create stepper ``name`` holding ``ckpt``; returns its summary."""
    if step_into not in ("hosted", "frozen"):
        raise ValueError(f"step_into must be 'hosted' or 'frozen', not {step_into!r}")
    ckpt.validate()
    create = _create(ckpt, name, step_into, device, durability)
    values = [(p.name, _nbytes([p.value])) for p in ckpt if p.value is not None]
    states = [(p.name, _nbytes(list(p.state.values()))) for p in ckpt if p.state]
    total = sum(s for _, s in values) + sum(s for _, s in states)
    yield create
    try:
        with Progress(total, f"import {name}", progress) as bar:
            for batch in _chunks(values, CHUNK_BYTES):
                tensors = {n: v for n in batch if (v := ckpt.params[n].value) is not None}
                yield _calls.put_params(name, tensors)
                bar.update(_nbytes(list(tensors.values())))
            for batch in _chunks(states, CHUNK_BYTES):
                state = {n: ckpt.params[n].state for n in batch}
                yield _calls.put_state(name, state, None, False)
                bar.update(sum(_nbytes(list(s.values())) for s in state.values()))
    except BaseException:
        with contextlib.suppress(Exception):  # the delete failing too: the first error counts
            yield _calls.delete(name)  # nothing half-imported stays behind
        raise
    summary: StepperSummary = yield _calls.get(name)
    return summary


def checkpoint_of(
    summary: StepperSummary, state: Mapping[str, Mapping[str, torch.Tensor]]
) -> OptimizerCheckpoint:
    """A stepper's summary and state (with ``"param"`` values) in the neutral form."""
    params = {}
    for info in summary.params:
        entries = dict(state[info.name])
        value = entries.pop("param", None)
        params[info.name] = ParamState(info.name, value, entries)
    groups = []
    for g in summary.groups:
        options = g.model_dump(include=set(OPTION_NAMES))
        options["betas"] = tuple(options["betas"])
        groups.append(ParamGroup(list(g.params), options))
    provenance = Provenance(
        "adamscope",
        summary.name,
        details={"stepper": summary.name, "kind": summary.kind, "step": summary.step},
    )
    return OptimizerCheckpoint(summary.optimizer, params, groups, summary.step, provenance)


def export_flow(name: str, progress: bool | None) -> Flow:
    """Read stepper ``name`` into an :class:`OptimizerCheckpoint`; returns it."""
    # A watched run (once it exists) is read the same way: its summary, then its values
    # and state by name; only its kind differs.
    summary: StepperSummary = yield _calls.get(name)
    sizes = []
    for info in summary.params:
        itemsize = codec.dtype_from_name(info.dtype).itemsize
        sizes.append((info.name, info.numel * itemsize * (1 + len(info.state))))
    state: dict[str, dict[str, torch.Tensor]] = {}
    with Progress(sum(s for _, s in sizes), f"export {name}", progress) as bar:
        for batch in _chunks(sizes, CHUNK_BYTES):
            part = yield _calls.get_state(name, batch, None, with_params=True)
            state.update(part)
            bar.update(sum(_nbytes(list(part[n].values())) for n in batch))
    after: StepperSummary = yield _calls.get(name)
    if (after.step, after.updated_at) != (summary.step, summary.updated_at):
        raise CheckpointError(
            f"stepper {name!r} changed while it was exported (step {summary.step} -> "
            f"{after.step}); export it again, or freeze it first (set_kind(name, 'frozen'))"
        )
    return checkpoint_of(summary, state)


def read_source(
    source: str | os.PathLike[str] | OptimizerCheckpoint,
    format: CheckpointFormatName,
    names: Sequence[str] | None,
    weights: str | os.PathLike[str] | None,
    kind: OptimizerKind | None,
) -> OptimizerCheckpoint:
    """``source`` itself if already read, else the checkpoint at that local path."""
    if isinstance(source, OptimizerCheckpoint):
        return source
    return read_checkpoint(
        Path(source),
        format,
        names=names,
        kind=kind,
        weights=None if weights is None else Path(weights),
    )


def write_checkpoint(
    ckpt: OptimizerCheckpoint, target: str | os.PathLike[str], format: Literal["dcp", "torch"]
) -> Path:
    """Write ``ckpt`` as a DCP directory or as ``optimizer.pt`` + ``model.safetensors``."""
    out = Path(target)
    if format == "dcp":
        write_dcp(ckpt, out)
    elif format == "torch":
        write_torch(ckpt, out)
    else:
        raise ValueError(f"format must be 'dcp' or 'torch', not {format!r}")
    return out
