"""The ranks of a distributed watched run: one run, whatever the number of ranks.

Every rank of a torch.distributed job reports (``rank``, ``world_size`` and ``layout`` in
each report, see :mod:`adamscope.client._watch_dist`):

- ``replicated`` (DDP): rank 0's reports are recorded; the others' only say their step and
  carry their acknowledgements.
- ``sharded`` (FSDP2): each step's reports wait here until every rank's is in, then one
  report with the merged signals (:func:`~adamscope.service.inspect.watched_merge.merge_signals`)
  is recorded. The wait is bounded: each rank sends its reports in order, so once every
  rank has reported a later step an earlier one still incomplete never will be (a report
  dropped by a full queue or a failed request): it is recorded with what came, marked
  ``merge.partial``; so is the oldest step when :data:`MAX_PENDING` steps are waiting, or
  when it has waited :data:`STALE` seconds (a rank that stopped reporting).

Commands: each is given an apply step ``at`` (:meth:`Ranks.apply_step`): every rank
applies it at exactly that step boundary, or acknowledges it as missed when it got it
after; the command is applied when every rank acknowledged it applied at ``at``, failed
when any did not (its detail names the ranks). A state read is answered when the ranks
that hold the state (every rank when sharded, rank 0 when replicated) uploaded their
part: the shards are put together (:func:`~..inspect.watched_merge.assemble`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from adamscope.client import codec

from ..engine.errors import InvalidSpec
from ..inspect.watched import clean_signals
from ..inspect.watched_merge import assemble, merge_signals
from .watching import UNKEPT, Command, Desk

__all__ = ["MAX_PENDING", "STALE", "Ranks", "Steps", "ranks_of"]

#: A step to record: its number and its ranks' reports, by rank.
Steps = tuple[int, dict[int, dict[str, Any]]]

#: Steps of a sharded run waiting for a rank's report before the oldest is recorded partial.
MAX_PENDING = 32
#: Seconds a step waits for a rank's report before it is recorded partial.
STALE = 30.0
#: The apply step's lead over the latest step reported: at least this many steps, at least
#: twice the reports' stride, and the steps the run takes in :data:`LEAD_SECONDS`.
MIN_LEAD, LEAD_SECONDS = 2, 0.5
LAYOUTS = ("sharded", "replicated")


@dataclass
class Ranks:
    """One distributed watched run's ranks (used on the event loop only)."""

    world: int
    layout: str
    #: Each rank's latest reported step, and each shard's place by tensor name.
    latest: dict[int, int] = field(default_factory=dict)
    places: dict[int, dict[str, Any]] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    #: A sharded run's reports waiting for the other ranks': step -> rank -> report.
    waiting: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)
    since: dict[int, float] = field(default_factory=dict)
    recorded: int = -1
    #: (time, step) of recent reports, and the largest step between two of one rank's.
    pace: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))
    stride: int = 1
    acks: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    #: Held while steps are merged and recorded: two ranks' reports completing two steps
    #: at once record them in step order.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    uploads: dict[str, dict[int, bytes]] = field(default_factory=dict)
    #: Gathered answers not yet delivered (see :meth:`take_ready`).
    ready: list[tuple[Command, bytes]] = field(default_factory=list)

    # ------------------------------------------------------------ reports

    def collect(self, report: dict[str, Any], now: float | None = None) -> list[Steps]:
        """The steps to record now, in step order, after ``report`` came in: each step's
        reports by rank, for :meth:`merge` (off the event loop: it costs CPU)."""
        now = time.time() if now is None else now
        rank, step = int(report["rank"]), int(report["step"])
        before = self.latest.get(rank)
        if before is not None and step < before:  # the job started again: forget the last
            self.latest, self.waiting, self.since, self.recorded = {}, {}, {}, -1
            before = None
        if before is not None and step > before:
            self.stride = max(self.stride, step - before)
        self.latest[rank] = max(step, before if before is not None else step)
        self.pace.append((now, step))
        params = [p for p in report.get("params") or [] if isinstance(p, dict)]
        self.places[rank] = {str(p.get("name")): _place(p.get("shard")) for p in params}
        if not self.shapes:
            self.shapes = {str(p.get("name")): _shape(p.get("shape")) for p in params}
        if self.layout != "sharded":
            return [(step, {0: report})] if rank == 0 else []
        if step <= self.recorded:
            return []
        self.waiting.setdefault(step, {})[rank] = report
        self.since.setdefault(step, now)
        return self._ready(now)

    def _ready(self, now: float) -> list[Steps]:
        out = []
        done = min(self.latest.values()) if len(self.latest) == self.world else -1
        while self.waiting:
            step = min(self.waiting)
            found = self.waiting[step]
            complete = len(found) == self.world
            overdue = (
                step < done or len(self.waiting) > MAX_PENDING or now - self.since[step] > STALE
            )
            if not (complete or overdue):
                break
            del self.waiting[step]
            del self.since[step]
            self.recorded = step
            out.append((step, found))
        return out

    def merge(self, step: int, found: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """One report of the whole run from its ranks' reports of ``step``: a replicated
        run's rank 0's, a sharded run's with the signals merged."""
        if self.layout != "sharded":
            return found[0]
        ranks = sorted(found)
        first = found[ranks[0]]
        parts = [
            (r, clean_signals(found[r].get("signals"), step) or {}, self.places.get(r, {}))
            for r in ranks
        ]
        merged = dict(first)
        merged["signals"] = merge_signals(parts, self.shapes, self.world)
        merged["scalars"] = found[0].get("scalars", []) if 0 in found else []
        return merged

    # ------------------------------------------------------------ commands

    def lead(self) -> int:
        """The steps ahead of the latest reported that a command is placed by default."""
        rate = 0.0
        if len(self.pace) > 1:
            (t0, s0), (t1, s1) = self.pace[0], self.pace[-1]
            rate = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
        return max(MIN_LEAD, 2 * self.stride, math.ceil(rate * LEAD_SECONDS) + self.stride)

    def apply_step(self, lead: int | None = None) -> int:
        """The step boundary at which every rank is to apply a new command."""
        return max(self.latest.values(), default=0) + (self.lead() if lead is None else lead)

    def settle(self, desk: Desk, rank: int, acks: Any) -> list[Command]:
        """Record ``rank``'s acknowledgements; returns the commands newly settled."""
        settled = []
        for a in acks if isinstance(acks, list) else []:
            c = desk.commands.get(str(a.get("id"))) if isinstance(a, dict) else None
            if c is None or c.status != "pending":
                continue
            mine = self.acks.setdefault(c.id, {})
            mine[rank] = a
            if len(mine) < self.world:
                continue
            bad = {r: x for r, x in mine.items() if not x.get("ok")}
            steps = {x.get("step") for x in mine.values()}
            step = int(a["step"]) if len(steps) == 1 and isinstance(a.get("step"), int) else None
            if bad or step is None:
                applied = sorted(r for r in mine if r not in bad)
                detail = "; ".join(f"rank {r}: {x.get('detail')}" for r, x in sorted(bad.items()))
                detail += f" (applied on ranks {applied} at steps {sorted(map(str, steps))})"
                desk.settle(c, "failed", detail, step)
                c.done.set()
            else:
                desk.settle(c, "applied", "", step)
                if c.op not in ("state", "snapshot"):
                    c.done.set()
                else:
                    self._try_answer(c)
            settled.append(c)
        if any(c.op not in UNKEPT for c in settled):
            desk.save()  # the queue in the data directory says they settled
        for gone in [k for k in self.acks if k not in desk.commands]:  # forgotten there
            del self.acks[gone]
            self.uploads.pop(gone, None)
        return settled

    def missed(self, c: Command) -> bool:
        return any(a.get("missed") for a in self.acks.get(c.id, {}).values())

    def answer(self, c: Command, body: bytes) -> None:
        """A rank's upload for the state read or snapshot ``c``."""
        try:
            rank = int(codec.decode(body)[1].get("rank", "0"))
        except (codec.CodecError, ValueError) as e:
            raise InvalidSpec(f"upload: {e}") from None
        self.uploads.setdefault(c.id, {})[rank] = body
        self._try_answer(c)

    def take_ready(self) -> list[tuple[Command, bytes]]:
        """The commands whose ranks' uploads are all in, with the gathered answer (the
        caller delivers them: a snapshot to the data directory, a read to its waiter)."""
        ready, self.ready = self.ready, []
        return ready

    def _try_answer(self, c: Command) -> None:
        got = self.uploads.get(c.id, {})
        need = range(self.world) if self.layout == "sharded" else (0,)
        if c.status != "applied" or any(r not in got for r in need):
            return
        try:
            body = assemble([got[r] for r in need])
        except (ValueError, KeyError, TypeError) as e:  # shards that do not fit together
            c.status, c.detail = "failed", f"the ranks' answers do not fit together: {e}"
            c.done.set()
            return
        finally:
            self.uploads.pop(c.id, None)
        self.ready.append((c, body))


def _shape(value: Any) -> list[int]:
    try:
        return codec.check_shape(value, "shape")
    except codec.CodecError as e:
        raise InvalidSpec(str(e)) from None


def _place(value: Any) -> dict[str, list[int]] | None:
    """A shard's place as reported (offset and local shape, as many of each), or None."""
    if value is None:
        return None
    try:
        offset, shape = _shape(value["offset"]), _shape(value["shape"])
    except (KeyError, TypeError):
        raise InvalidSpec("a shard's place needs its offset and shape") from None
    if len(offset) != len(shape):
        raise InvalidSpec(f"a shard's offset {offset} and shape {shape} differ in length")
    return {"offset": offset, "shape": shape}


def ranks_of(found: dict[str, Ranks], name: str, report: dict[str, Any]) -> Ranks | None:
    """The run's ranks, if ``report`` comes from a distributed job (created by the first)."""
    world = report.get("world_size")
    if not isinstance(world, int) or world <= 1:
        found.pop(name, None)  # a single process reports under the name now
        return None
    rank, step = report.get("rank"), report.get("step")
    layout = report.get("layout")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InvalidSpec(f"report's step must be an integer >= 0, got {step!r}")
    if not isinstance(rank, int) or not 0 <= rank < world or layout not in LAYOUTS:
        raise InvalidSpec(f"a distributed report needs rank in [0, {world}) and a layout")
    for p in report.get("params") or []:  # each shard's place, checked before anything
        if isinstance(p, dict):
            _place(p.get("shard"))
    ranks = found.get(name)
    if ranks is None or (ranks.world, ranks.layout) != (world, layout):
        ranks = found[name] = Ranks(world, layout)  # a new job under the same name
    return ranks
