"""A watched run's snapshots for its routes: named and checked when the command is queued,
written to the data directory when the trainer uploads them, read back for a restore
(:mod:`adamscope.service.persistence.watched` does the files)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import Request

from adamscope.client.constants import SNAPSHOT_NAME_PATTERN

from ..engine import Stepper
from ..engine.errors import EngineError, InvalidSpec
from ..persistence import watched as files
from ..persistence.store import SnapshotExists
from . import watch_queue as queue
from .deps import persistence
from .watching import Command

__all__ = ["check_new", "listing", "restore_body", "store"]

_NAME = re.compile(SNAPSHOT_NAME_PATTERN)


def _checked(snap: Any) -> str:
    if not isinstance(snap, str) or _NAME.fullmatch(snap) is None:
        raise InvalidSpec(f"snapshot: a name matching {SNAPSHOT_NAME_PATTERN}, got {snap!r}")
    return snap


def check_new(request: Request, stepper: Stepper, snap: Any) -> str:
    """The name a new snapshot of the run will have (422 ``invalid_spec`` for a name the
    snapshot rules refuse, 409 ``snapshot_exists`` for one taken)."""
    name = _checked(snap)
    if persistence(request).store.has_snapshot(stepper.name, name):
        raise SnapshotExists(
            f"stepper {stepper.name!r} already has a snapshot {name!r}",
            stepper=stepper.name,
            snapshot=name,
        )
    return name


async def store(request: Request, stepper: Stepper, c: Command, upload: bytes) -> None:
    """Write the trainer's upload for snapshot command ``c``; a refused one fails the
    command (its status says why) and raises."""
    try:
        await asyncio.to_thread(
            files.keep, persistence(request), stepper, str(c.args["snapshot"]), upload
        )
    except EngineError as e:
        run = queue.desk(request, stepper.name)
        run.settle(c, "failed", e.detail)
        run.save()
        raise


async def restore_body(request: Request, stepper: Stepper, snap: Any) -> bytes:
    """What a restore of ``snap`` sends to the trainer (404 ``snapshot_not_found``)."""
    name = _checked(snap)
    return await asyncio.to_thread(files.trainer_body, persistence(request), stepper, name)


async def listing(request: Request, stepper: Stepper) -> list[dict[str, Any]]:
    found = await asyncio.to_thread(persistence(request).list_snapshots, stepper)
    return [{**s, "bytes": s["size"]} for s in found]
