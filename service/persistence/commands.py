"""A watched run's command queue in the data directory, so that a restart loses none.

The queue of a watched run (:mod:`adamscope.service.api.watching`) is written, whenever a
command is queued or settles, to ``<stepper>/commands.json``: a small JSON list of the
commands (id, op, arguments, status, step, detail, time, and where a body comes from). A
command's tensors, when it carries some, are written beside it to
``<stepper>/commands/<id>.safetensors`` (a restore's come from its snapshot file instead,
read again after a restart), and removed once the command settles. Every file is written
atomically (:func:`~.store.atomic_write`); a file that does not parse is logged and ignored
(the run starts with an empty queue), never fatal.

A command is still applied once only across a restart: its id is kept, and the trainer
remembers the ids it applied (it acknowledges them again, never reapplies them).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from adamscope.client.constants import STEPPER_NAME_PATTERN

from .store import WATCHED_QUEUE, Store, atomic_write, fsync_dir

__all__ = ["COMMANDS_FILE", "CommandJournal"]

log = logging.getLogger("adamscope.persistence")

COMMANDS_FILE = WATCHED_QUEUE
BODIES = "commands"
SUFFIX = ".safetensors"
FORMAT = "adamscope-commands"
_ID = re.compile(STEPPER_NAME_PATTERN)
#: The fields of an entry and their types.
FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "op": str,
    "args": dict,
    "status": str,
    "step": (int, type(None)),
    "detail": str,
    "created": (int, float),
    "body": (str, type(None)),
}


class CommandJournal:
    """One watched run's queue on disk (callers serialize its operations: the event loop)."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name

    def _dir(self) -> Path:
        d = self.store.stepper_dir(self.name)
        if not d.is_dir():
            self.store.open()
            d.mkdir(parents=True, exist_ok=True)
            fsync_dir(d.parent)
        return d

    def _body_path(self, cid: str) -> Path:
        if _ID.fullmatch(cid) is None:  # a single path component that is not hidden
            raise ValueError(f"invalid command id {cid!r}")
        return self._dir() / BODIES / (cid + SUFFIX)

    def load(self) -> list[dict[str, Any]]:
        """The stored entries (each checked), oldest first; [] without a valid file."""
        path = self.store.stepper_dir(self.name) / COMMANDS_FILE
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            log.error("ignoring the command queue of %r: %s", self.name, e)
            return []
        entries = raw.get("commands") if isinstance(raw, dict) else None
        if not isinstance(entries, list) or raw.get("format") != FORMAT:
            log.error("ignoring the command queue of %r: not a %s file", self.name, FORMAT)
            return []
        return [e for e in entries if _valid(e)]

    def write(self, entries: list[dict[str, Any]]) -> None:
        data = json.dumps({"format": FORMAT, "version": 1, "commands": entries})
        atomic_write(self._dir() / COMMANDS_FILE, data.encode())

    def write_body(self, cid: str, data: bytes) -> None:
        path = self._body_path(cid)
        if not path.parent.is_dir():
            path.parent.mkdir(exist_ok=True)
            fsync_dir(path.parent.parent)
        atomic_write(path, data)

    def read_body(self, cid: str) -> bytes | None:
        try:
            return self._body_path(cid).read_bytes()
        except FileNotFoundError:
            return None

    def drop_body(self, cid: str) -> None:
        path = self._body_path(cid)
        if path.exists():
            path.unlink()
            fsync_dir(path.parent)


def _valid(entry: Any) -> bool:
    ok = isinstance(entry, dict) and all(
        isinstance(entry.get(k), t) and not isinstance(entry.get(k), bool)
        for k, t in FIELDS.items()
    )
    if ok and entry["body"] == "file":
        ok = _ID.fullmatch(entry["id"]) is not None
    if not ok:
        log.error("ignoring a malformed stored command: %.200r", entry)
    return ok
