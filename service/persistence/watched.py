"""A watched run's snapshots in the data directory, as a hosted stepper's are.

A watched run's trainer answers a ``snapshot`` command with an upload of its state and
parameters (safetensors, keys ``"<param>/<key>"`` and ``"<param>/param"``,
``step`` in the metadata). :func:`keep` writes it as a checkpoint file of the
run's layout (:func:`~adamscope.service.engine.checkpoint.encode_held_elsewhere`) to
``<stepper>/snapshots/<snapshot>.safetensors``, atomically, as a hosted stepper's snapshot:
it survives a restart, lists and downloads through the snapshot routes. :func:`trainer_body`
reads one back (decoded and validated as any checkpoint; nothing unpickled) as the upload
a ``load`` command carries to the trainer: a ``restore``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from adamscope.client import codec

from ..engine import Stepper
from ..engine import checkpoint as checkpoints
from ..engine.errors import InvalidCheckpoint
from ..engine.state import STATE_KEYS

if TYPE_CHECKING:
    from .manager import Persistence

__all__ = ["keep", "trainer_body"]

PARAM = "param"
#: The metadata key of the trainer's step in its uploads (``_watch_sender``).
UPLOAD_STEP = "step"


def _split(
    stepper: Stepper, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The upload's parameter values and state, each checked against the run's layout."""
    params: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        n, _, k = key.rpartition("/")
        if n not in stepper.index or (k != PARAM and k not in STATE_KEYS):
            raise InvalidCheckpoint(
                f"snapshot tensor {key!r} is not '<parameter>/<key>' of a parameter of "
                f"{stepper.name!r} with key 'param' or one of {', '.join(STATE_KEYS)}"
            )
        if k != "step":
            shape, dtype = stepper.param_meta(n)
            if list(t.shape) != shape or (k == PARAM and t.dtype != dtype):
                raise InvalidCheckpoint(
                    f"snapshot tensor {key!r} is {codec.dtype_name(t.dtype)}{list(t.shape)}; "
                    f"the parameter is {codec.dtype_name(dtype)}{shape}"
                )
        if k == PARAM:
            params[n] = t
        else:
            state.setdefault(n, {})[k] = t
    missing = [n for n in stepper.names if n not in params]
    if missing:
        raise InvalidCheckpoint(f"the snapshot lacks the values of parameter(s) {missing}")
    return params, state


def keep(persistence: Persistence, stepper: Stepper, snap: str, upload: bytes) -> dict[str, Any]:
    """Write the trainer's ``upload`` as snapshot ``snap`` of the watched run ``stepper``
    (409 ``snapshot_exists`` if the name is taken); its listing entry."""
    try:
        tensors, metadata = codec.decode(upload)
        step = int(metadata.get(UPLOAD_STEP, ""))
    except (codec.CodecError, ValueError) as e:
        raise InvalidCheckpoint(f"the trainer's snapshot is not readable: {e}") from None
    params, state = _split(stepper, tensors)
    enc = checkpoints.encode_held_elsewhere(stepper, step, params, state, {"snapshot": snap})
    del tensors, params, state
    return persistence.keep_snapshot(stepper, snap, enc)


def trainer_body(persistence: Persistence, stepper: Stepper, snap: str) -> bytes:
    """Snapshot ``snap`` of the watched run as its trainer loads it (keys
    ``"<param>/<key>"``, the values under ``"<param>/param"``); 404 ``snapshot_not_found``,
    422 ``invalid_checkpoint`` when it does not fit the run's layout."""
    f, _ = persistence.open_snapshot(stepper, snap)
    with f:
        data = f.read()
    ckpt = checkpoints.decode(data)
    del data
    checkpoints.check_layout(stepper, ckpt)
    tensors = {f"{n}/{PARAM}": t for n, t in ckpt.params}
    for n, entries in ckpt.state.items():
        tensors.update({f"{n}/{k}": t for k, t in entries.items()})
    return codec.encode(tensors, {UPLOAD_STEP: str(ckpt.step)})
