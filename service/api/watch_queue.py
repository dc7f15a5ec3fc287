"""The app's desks of watched runs, each loaded from the data directory when first needed.

A run's queue (:mod:`.watching`) is kept by a
:class:`~adamscope.service.persistence.commands.CommandJournal`; after a restart the first
request that needs the run's desk reads it back: settled commands keep their status, and
pending ones are sent to the trainer again with their ids, which it applies once only (it
remembers the ids it applied and acknowledges them again). A pending restore gets its
tensors from its snapshot file again; one whose snapshot or body is gone fails, saying so.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from ..engine.errors import EngineError
from ..persistence import watched as snapshot_files
from ..persistence.commands import CommandJournal
from .deps import persistence, registry
from .watching import Command, Desk, Desks, desk_of

__all__ = ["desk", "desks"]


def desks(request: Request) -> Desks:
    found: Desks | None = getattr(request.app.state, "watch_desks", None)
    if found is None:
        found = request.app.state.watch_desks = Desks(lambda name: _load(request, name))
    return found


def desk(request: Request, name: str) -> Desk:
    return desk_of(desks(request), name)


def _load(request: Request, name: str) -> Desk:
    journal = CommandJournal(persistence(request).store, name)
    loaded = Desk(journal)
    for e in journal.load():
        c = Command(e["id"], e["op"], e["args"], None, e["created"])
        c.status, c.step, c.detail = e["status"], e["step"], e["detail"]
        if c.status == "pending" and e["body"] is not None:
            c.body, missing = _body(request, name, journal, e)
            if c.body is None:
                loaded.settle(c, "failed", f"lost in a restart of the service: {missing}")
        if c.status != "pending":
            c.done.set()
        loaded.commands[c.id] = c
    return loaded


def _body(
    request: Request, name: str, journal: CommandJournal, entry: dict[str, Any]
) -> tuple[bytes | None, str]:
    if entry["body"] == "snapshot":
        try:
            stepper = registry(request).get(name)
            snap = str(entry["args"].get("snapshot"))
            return snapshot_files.trainer_body(persistence(request), stepper, snap), ""
        except EngineError as e:
            return None, e.detail
    found = journal.read_body(entry["id"])
    return found, "" if found is not None else "its tensors are not in the data directory"
