"""Commands for watched runs: queued by the service, applied by their trainers.

A watched run's optimizer lives in a training job, so what would change or read a hosted
stepper's tensors is queued here as a command with an id; the trainer's sender receives the
pending commands in the reply to each report, its training thread applies them between two
steps (exactly once: it remembers the ids it applied, across reconnects) and acknowledges
each with the step at which it applied; a read (``state``) is answered by an upload of the
tensors as of that step, a ``snapshot`` by an upload of all of the state and parameters,
written to the data directory (:mod:`adamscope.service.persistence.watched`); ``restore``
queues a ``load`` of a stored snapshot.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Command", "Desk", "desk_of"]

#: Commands kept per run (applied ones beyond this are forgotten, oldest first).
KEEP = 256


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

    def __init__(self) -> None:
        self.commands: dict[str, Command] = {}

    def add(self, op: str, args: dict[str, Any], body: bytes | None = None) -> Command:
        c = Command(f"c{next(self._ids)}-{int(time.time() * 1000)}", op, args, body)
        self.commands[c.id] = c
        done = [k for k, v in self.commands.items() if v.status != "pending"]
        for k in done[: max(0, len(self.commands) - KEEP)]:
            del self.commands[k]
        return c

    def pending(self) -> list[dict[str, Any]]:
        return [c.wire() for c in self.commands.values() if c.status == "pending"]

    def ack(self, acks: Any) -> list[Command]:
        """Apply the trainer's acknowledgements; returns the commands newly settled."""
        settled = []
        for a in acks if isinstance(acks, list) else []:
            c = self.commands.get(str(a.get("id"))) if isinstance(a, dict) else None
            if c is None or c.status != "pending":
                continue
            c.status = "applied" if a.get("ok") else "failed"
            c.step = int(a["step"]) if isinstance(a.get("step"), int) else None
            c.detail = str(a.get("detail") or "")
            if c.op not in ("state", "snapshot") or c.status == "failed":
                c.done.set()
            settled.append(c)
        return settled

    def answer(self, command: str, body: bytes) -> bool:
        c = self.commands.get(command)
        if c is None:
            return False
        c.upload = body
        c.done.set()
        return True


def desk_of(desks: dict[str, Desk], name: str) -> Desk:
    found = desks.get(name)
    if found is None:
        found = desks[name] = Desk()
    return found
