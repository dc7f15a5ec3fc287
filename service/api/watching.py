"""Commands for watched runs: queued by the service, applied by their trainers.

A watched run's optimizer lives in a training job, so what would change or read a hosted
stepper's tensors is queued here as a command with an id; the trainer's sender receives the
pending commands in the reply to each report, its training thread applies them between two
steps (exactly once: it remembers the ids it applied, across reconnects) and acknowledges
each with the step at which it applied; a read (``state``) is answered by an upload of the
tensors as of that step, a ``snapshot`` by an upload of all of the state and parameters,
written to the data directory (:mod:`adamscope.service.persistence.watched`); ``restore``
queues a ``load`` of a stored snapshot. The queue is kept in the data directory
(:mod:`.watch_queue`): a restarted service still has it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Command", "Desk", "Desks", "Journal", "desk_of"]

#: Commands kept per run (applied ones beyond this are forgotten, oldest first).
KEEP = 256
#: Commands a restart forgets: a state read's requester waits on this process.
UNKEPT = ("state",)


class Journal(Protocol):
    """Where a run's queue outlives a restart (:class:`...persistence.commands.CommandJournal`)."""

    def write(self, entries: list[dict[str, Any]]) -> None: ...
    def write_body(self, cid: str, data: bytes) -> None: ...
    def drop_body(self, cid: str) -> None: ...


@dataclass
class Command:
    id: str
    op: str
    args: dict[str, Any]
    body: bytes | None = None
    created: float = field(default_factory=time.time)
    #: ``pending``, ``applied`` or ``failed``; ``step``: the trainer's step when applied.
    status: str = "pending"
    step: int | None = None
    detail: str = ""
    #: A state read's answer: the safetensors the trainer uploaded.
    upload: bytes | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def wire(self) -> dict[str, Any]:
        """What the trainer receives."""
        return {"id": self.id, "op": self.op, **self.args, "body": self.body is not None}

    def saved(self) -> dict[str, Any]:
        """What the data directory keeps of it (:mod:`...persistence.commands`): its body
        as where it comes from, a restore's snapshot or a file beside the queue."""
        source = (
            None
            if self.body is None
            else ("snapshot" if self.op == "load" and self.args.get("snapshot") else "file")
        )
        return {**self.public(), "body": source}

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "op": self.op,
            "args": self.args,
            "status": self.status,
            "step": self.step,
            "detail": self.detail,
            "created": self.created,
        }


class Desk:
    """One watched run's commands (used on the event loop only)."""

    _ids = itertools.count(1)

    def __init__(self, journal: Journal | None = None) -> None:
        self.commands: dict[str, Command] = {}
        #: Where the queue is kept across restarts (none: in memory only).
        self.journal = journal

    def add(self, op: str, args: dict[str, Any], body: bytes | None = None) -> Command:
        c = Command(f"c{next(self._ids)}-{int(time.time() * 1000)}", op, args, body)
        if self.journal is not None and op not in UNKEPT and c.saved()["body"] == "file":
            assert body is not None
            self.journal.write_body(c.id, body)
        self.commands[c.id] = c
        done = [k for k, v in self.commands.items() if v.status != "pending"]
        for k in done[: max(0, len(self.commands) - KEEP)]:
            del self.commands[k]
        if op not in UNKEPT:
            self.save()
        return c

    def save(self) -> None:
        """Write the queue (a small JSON file, atomically) where it is kept, if anywhere:
        after every change of a command that outlives a restart."""
        if self.journal is not None:
            self.journal.write([c.saved() for c in self.commands.values() if c.op not in UNKEPT])

    def settle(self, c: Command, status: str, detail: str = "", step: int | None = None) -> None:
        c.status, c.step, c.detail = status, step, detail
        if self.journal is not None and c.saved()["body"] == "file":
            self.journal.drop_body(c.id)

    def pending(self) -> list[dict[str, Any]]:
        return [c.wire() for c in self.commands.values() if c.status == "pending"]

    def ack(self, acks: Any) -> list[Command]:
        """Apply the trainer's acknowledgements; returns the commands newly settled."""
        settled = []
        for a in acks if isinstance(acks, list) else []:
            c = self.commands.get(str(a.get("id"))) if isinstance(a, dict) else None
            if c is None or c.status != "pending":
                continue
            step = int(a["step"]) if isinstance(a.get("step"), int) else None
            status = "applied" if a.get("ok") else "failed"
            self.settle(c, status, str(a.get("detail") or ""), step)
            if c.op not in ("state", "snapshot") or c.status == "failed":
                c.done.set()
            settled.append(c)
        if any(c.op not in UNKEPT for c in settled):
            self.save()
        return settled

    def answer(self, command: str, body: bytes) -> bool:
        c = self.commands.get(command)
        if c is None:
            return False
        c.upload = body
        c.done.set()
        return True


class Desks(dict[str, Desk]):
    """The desks of every watched run, each made by ``make(name)`` when first needed (the
    app's: loaded from the data directory)."""

    def __init__(self, make: Callable[[str], Desk]) -> None:
        super().__init__()
        self.make = make


def desk_of(desks: dict[str, Desk], name: str) -> Desk:
    found = desks.get(name)
    if found is None:
        found = desks[name] = desks.make(name) if isinstance(desks, Desks) else Desk()
    return found
