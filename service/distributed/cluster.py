"""The slots of a distributed service, their Ray actors, placement and recovery.

A **slot** is a numbered place for steppers with its own files on the shared data
directory (``<data dir>/hosts/slot-<k>``) and one live :class:`~.host.SlotHost` actor at
a time. Placement puts a new stepper on the slot with the most room (on a GPU slot the
device memory free when it started less the footprints of the steppers placed since, see
:func:`~.resources.slot_capacity`; the memory budget less the footprints held; else the
fewest bytes held); a stepper larger than the room of one slot, or created with
``?shards=N``, is split by parameter tensors over several slots (:class:`ShardedRecord`,
kept in ``<data dir>/sharded/<name>.json``). A stepper being created counts against its
slot from the moment it is placed.

Every call to an actor has a timeout: an actor Ray cannot place (its resources are taken)
fails the start after ``place_timeout`` seconds saying so, a service that does not come up
after ``start_timeout``, any other call after ``call_timeout``.

Recovery: a slot whose actor is found dead (a failed request or the monitor's ping) gets
a new actor, started on any node that has the resources; it restores the slot's steppers
from their files, so under the ``every_step`` durability policy no acknowledged step is
lost. Each recovery is recorded per stepper (``recoveries``, shown in its summary) and
published on ``/v1/events`` as a ``recovered`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.footprint import Footprint
from ..persistence.store import atomic_write
from .host import host_actor_class, slot_dir
from .records import Shard, ShardedRecord, Slot
from .resources import preferred_node, slot_nodes

__all__ = ["Cluster", "ClusterConfig", "Shard", "ShardedRecord", "Slot", "SlotStartError"]

log = logging.getLogger("adamscope.distributed")

#: Seconds between the monitor's liveness checks of every slot's actor.
MONITOR_TICK = 1.0
#: Seconds a live actor has to answer a ping.
PING_TIMEOUT = 10.0


@dataclass
class ClusterConfig:
    """What the ingress needs to run the slots (JSON-able: it travels to Ray Serve)."""

    settings: dict[str, Any]  # the service settings (JSON), data_dir the shared one
    slots: int = 2
    bind: str = "127.0.0.1"  # the address each slot's service listens on
    num_cpus: float = 0.0  # Ray resources per slot actor
    num_gpus: float = 0.0
    namespace: str = "adamscope"
    place_timeout: float = 120.0  # seconds for Ray to place a slot's actor
    start_timeout: float = 600.0  # seconds for its service to start (restoring steppers)
    call_timeout: float = 60.0  # seconds for any other call to an actor

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.get("data_dir", "adamscope-data"))


def _at(info: dict[str, Any]) -> dict[str, Any]:
    """Where a slot's actor ran: its process, host name and Ray node."""
    return {k: info.get(k) for k in ("pid", "node", "node_id")}


class SlotStartError(RuntimeError):
    """A slot's actor could not be placed or its service did not start."""


class Cluster:
    """The slots and their actors (created in the ingress replica)."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.slots: list[Slot] = []
        self.sharded: dict[str, ShardedRecord] = {}
        #: name -> recoveries of that stepper (newest last).
        self.recoveries: dict[str, list[dict[str, Any]]] = {}
        #: Called with every event the cluster publishes (the ingress's SSE fan-out).
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._actor_class = host_actor_class(config.num_cpus, config.num_gpus)
        self._monitor: asyncio.Task[None] | None = None
        #: The node chosen for each slot's latest actor (see :meth:`_where_to`).
        self._chosen: dict[int, str] = {}

    # ------------------------------------------------------------------ start and stop

    def _existing_slots(self) -> int:
        hosts = self.config.data_dir / "hosts"
        found = (
            [
                int(p.name.split("-", 1)[1])
                for p in hosts.glob("slot-*")
                if p.name.split("-", 1)[1].isdigit()
            ]
            if hosts.is_dir()
            else []
        )
        return max(found) + 1 if found else 0

    def _spawn(self, index: int, avoid: str | None = None) -> Any:
        return self._actor_class.options(
            name=f"adamscope-slot-{index}-{time.monotonic_ns()}",
            namespace=self.config.namespace,
            scheduling_strategy=self._where_to(index, avoid),
        ).remote(index, self.config.settings, self.config.bind)

    def _where_to(self, index: int, avoid: str | None = None) -> Any:
        """Where slot ``index``'s new actor should go (:func:`.resources.preferred_node`),
        as a Ray scheduling strategy: a preference for that node, or SPREAD."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        try:
            nodes = slot_nodes(ray.nodes(), self.config.num_cpus, self.config.num_gpus)
        except Exception:  # noqa: BLE001 - no node list: let Ray spread them
            nodes = []
        # Where each other slot is: its actor's node once it answered, else the node
        # chosen for it (slots started together have not answered yet).
        held = [
            s.info.get("node_id") or self._chosen.get(s.index)
            for s in self.slots
            if s.index != index and s.state != "failed"
        ]
        node = preferred_node(nodes, held, avoid)
        if node is None:
            return "SPREAD"
        self._chosen[index] = node
        return NodeAffinitySchedulingStrategy(node_id=node, soft=True)

    async def _call(self, slot: Slot, method: str, timeout: float | None = None, *args: Any) -> Any:
        """``slot.actor.<method>(*args)``, at most ``timeout`` seconds (default:
        call_timeout)."""
        limit = self.config.call_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(getattr(slot.actor, method).remote(*args), limit)
        except TimeoutError:
            raise TimeoutError(
                f"slot {slot.index}: {method}() did not answer in {limit:.0f} s"
            ) from None

    def _unplaced(self, index: int) -> str:
        """Why a slot's actor may not have been placed, for the error."""
        want = f"{self.config.num_gpus:g} GPU and {self.config.num_cpus:g} CPU"
        try:
            import ray

            have = ray.cluster_resources()
            free = ray.available_resources()
            where = (
                f"; the cluster has {have.get('GPU', 0):g} GPU / {have.get('CPU', 0):g} "
                f"CPU, {free.get('GPU', 0):g} / {free.get('CPU', 0):g} free now"
            )
        except Exception:  # noqa: BLE001 - the message only
            where = ""
        return (
            f"slot {index}: Ray did not place its actor in {self.config.place_timeout:.0f}"
            f" s: it asks for {want}{where} (see `ray status`; --slots, --slot-gpus and "
            "--slot-cpus set what slots ask for)"
        )

    async def _start_actor(self, slot: Slot, deadline: float) -> None:
        """Wait for ``slot``'s new actor: placed by Ray, its service up, its state read."""
        try:
            await self._call(slot, "__ray_ready__", max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            raise SlotStartError(self._unplaced(slot.index)) from None
        try:
            await self._call(
                slot, "wait_started", self.config.start_timeout + 5, self.config.start_timeout
            )
        except TimeoutError as e:
            raise SlotStartError(str(e)) from None
        slot.started(
            await self._call(slot, "info"), await self._call(slot, "steppers"), self.config.num_gpus
        )

    async def start(self) -> None:
        """Start every slot's actor (in parallel); raises :class:`SlotStartError` (and
        removes the actors it started) when one cannot be placed or does not start."""
        import ray

        count = max(self.config.slots, self._existing_slots())
        self.slots = [Slot(i) for i in range(count)]
        for s in self.slots:
            s.actor = self._spawn(s.index)
        deadline = time.monotonic() + self.config.place_timeout
        try:
            await asyncio.gather(*(self._start_actor(s, deadline) for s in self.slots))
        except BaseException:
            for s in self.slots:
                with contextlib.suppress(Exception):
                    ray.kill(s.actor, no_restart=True)
            raise
        for s in self.slots:
            s.state = "ok"
        self._load_sharded()
        log.info(
            "distributed: %d slots up: %s",
            len(self.slots),
            ", ".join(f"{s.index}@{s.info['node']}:{s.info['pid']}" for s in self.slots),
        )

    def start_monitor(self) -> None:
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_TICK)
            for s in list(self.slots):
                try:
                    await self.check(s.index)
                except Exception:  # noqa: BLE001 - the monitor must outlive one failure
                    log.exception("slot %d: liveness check failed", s.index)

    async def stop(self) -> None:
        import ray

        if self._monitor is not None:
            self._monitor.cancel()

        async def stop_one(slot: Slot) -> None:
            with contextlib.suppress(Exception):  # best effort: it may be dead already
                await asyncio.wait_for(slot.actor.stop.remote(), 60)
            ray.kill(slot.actor)

        # All at once: each waits out its service's graceful shutdown (open streams: 5 s).
        await asyncio.gather(*(stop_one(s) for s in self.slots))

    # ------------------------------------------------------------------ liveness

    async def alive(self, index: int) -> bool:
        slot = self.slots[index]
        try:
            return bool(await asyncio.wait_for(slot.actor.ping.remote(), PING_TIMEOUT))
        except Exception:  # noqa: BLE001 - RayActorError, timeout: not alive
            return False

    async def check(self, index: int) -> bool:
        """Whether the slot is serving; recovers it first if its actor is dead. False when
        recovery failed."""
        slot = self.slots[index]
        if slot.state == "ok" and await self.alive(index):
            return True
        return await self.recover(index)

    async def recover(self, index: int) -> bool:
        """Replace the slot's actor (unless another caller already did) and restore its
        steppers from the slot's files."""
        import ray

        slot = self.slots[index]
        generation = slot.generation
        async with slot.lock:
            if slot.generation != generation or (slot.state == "ok" and await self.alive(index)):
                return slot.state == "ok"
            old_info, lost = dict(slot.info), dict(slot.steppers)
            slot.state = "recovering"
            log.warning(
                "slot %d: actor (pid %s on %s) is gone; restoring its %d stepper(s)",
                index,
                old_info.get("pid"),
                old_info.get("node"),
                len(lost),
            )
            started = time.time()
            with contextlib.suppress(Exception):  # it is dead already
                ray.kill(slot.actor, no_restart=True)
            try:
                slot.actor = self._spawn(index, old_info.get("node_id"))
                await self._start_actor(slot, time.monotonic() + self.config.place_timeout)
            except Exception as e:  # noqa: BLE001 - reported in the slot's state
                slot.state = "failed"
                slot.generation += 1
                log.exception("slot %d: recovery failed", index)
                self._publish("slot_failed", {"slot": index, "error": str(e), "time": time.time()})
                return False
            slot.state = "ok"
            slot.generation += 1
            took = time.time() - started
            for name in sorted(set(lost) | set(slot.steppers)):
                record = {
                    "slot": index,
                    "time": time.time(),
                    "seconds": round(took, 3),
                    "from": _at(old_info),
                    "to": _at(slot.info),
                    "restored": name in slot.steppers,
                }
                self.recoveries.setdefault(name, []).append(record)
                self._publish("recovered", {"stepper": name, **record})
            log.warning(
                "slot %d: recovered in %.1f s on %s (pid %s)",
                index,
                took,
                slot.info.get("node"),
                slot.info.get("pid"),
            )
            return True

    def _publish(self, kind: str, event: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(kind, event)
            except Exception:  # noqa: BLE001
                log.exception("event listener failed")

    # ------------------------------------------------------------------ placement

    async def refresh(self, index: int | None = None) -> None:
        """Re-read which steppers the slot (every slot by default) holds."""
        for s in self.slots if index is None else [self.slots[index]]:
            if s.state == "ok":
                try:
                    s.steppers = await self._call(s, "steppers")
                except Exception:  # noqa: BLE001 - the monitor will recover it
                    log.warning("slot %d did not answer", s.index)

    def slot_of(self, name: str) -> int | None:
        """The slot holding an unsharded stepper."""
        for s in self.slots:
            if name in s.steppers:
                return s.index
        return None

    def rooms(self, slot: Slot) -> tuple[int | None, int | None]:
        """(device bytes, budget bytes) a new stepper may still take on the slot (None: no
        limit of that kind): its capacity less the device footprints held, and the memory
        budget less the footprint totals held. Steppers being created count."""
        device = None if slot.capacity is None else slot.capacity - slot.held_device_bytes()
        budget = slot.info.get("budget_bytes")
        return device, None if budget is None else int(budget) - slot.held_bytes()

    def room(self, slot: Slot) -> int | None:
        """The smaller of :meth:`rooms` (None: no limit known)."""
        limits = [x for x in self.rooms(slot) if x is not None]
        return min(limits) if limits else None

    def share(self, slot: Slot, need: Footprint) -> float:
        """How much of a stepper of footprint ``need`` fits the slot (1.0: all of it)."""
        device, budget = self.rooms(slot)
        parts = [math.inf]
        if device is not None:
            parts.append(max(device, 0) / max(need.on_device, 1))
        if budget is not None:
            parts.append(max(budget, 0) / max(need.total, 1))
        return min(parts)

    def reserve(
        self,
        name: str,
        plan: list[Shard],
        sizes: list[tuple[str, int]],
        need: Callable[[list[int], str], Footprint],
    ) -> None:
        """Count the stepper ``plan`` places against its slots from now (until a refresh
        reads what the slots really hold)."""
        nbytes = dict(sizes)
        for sh in plan:
            slot = self.slots[sh.slot]
            fp = need([nbytes[n] for n in sh.params], slot.device_type)
            slot.steppers.setdefault(
                name,
                {
                    "params": list(sh.params),
                    "bytes": fp.total,
                    "device_bytes": fp.on_device,
                    "pending": True,
                },
            )

    def ranked(self) -> list[Slot]:
        """Live slots, the roomiest first (fewest bytes held, then fewest steppers)."""
        live = [s for s in self.slots if s.state == "ok"]
        return sorted(
            live, key=lambda s: (-(self.room(s) or 0), s.held_bytes(), len(s.steppers), s.index)
        )

    def plan(
        self,
        sizes: list[tuple[str, int]],
        need: Callable[[list[int], str], Footprint],
        shards: int | None,
    ) -> list[Shard]:
        """Where a new stepper's tensors go: one slot when it fits (and ``shards`` is not
        asked), else ``shards`` (or as many as needed) slots, tensors placed largest first
        on the slot with the fewest bytes so far. ``need(parameter bytes, device type)`` is
        the footprint of a stepper of those parameters
        (:mod:`adamscope.service.engine.footprint`)."""
        ranked = self.ranked()
        if not ranked:
            raise RuntimeError("no slot is serving")
        whole = [b for _, b in sizes]
        if shards is None:
            if self.share(ranked[0], need(whole, ranked[0].device_type)) >= 1:
                return [Shard(ranked[0].index, [n for n, _ in sizes])]
            shards, have = 0, 0.0
            while have < 1 and shards < len(ranked):
                have += self.share(ranked[shards], need(whole, ranked[shards].device_type))
                shards += 1
            if have < 1:
                fp = need(whole, ranked[0].device_type)
                raise MemoryError(
                    f"the stepper needs about {fp.on_device:,} bytes on its device "
                    f"({fp.total:,} with its host buffers); all {len(ranked)} slots together "
                    f"hold about {have:.0%} of it"
                )
        shards = max(1, min(shards, len(ranked), len(sizes)))
        chosen = [Shard(s.index, []) for s in ranked[:shards]]
        load = [0] * shards
        for n, b in sorted(sizes, key=lambda x: -x[1]):
            i = min(range(shards), key=lambda k: (load[k], k))
            chosen[i].params.append(n)
            load[i] += b
        order = {n: i for i, (n, _) in enumerate(sizes)}
        for c in chosen:
            c.params.sort(key=order.__getitem__)
        return chosen

    # ------------------------------------------------------------------ sharded records

    def _sharded_dir(self) -> Path:
        return self.config.data_dir / "sharded"

    def _load_sharded(self) -> None:
        folder = self._sharded_dir()
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                record = ShardedRecord.from_json(path.read_bytes())
            except (OSError, ValueError, TypeError, KeyError):
                log.exception("unreadable sharded-stepper record %s", path)
                continue
            self.sharded[record.name] = record

    def save_sharded(self, record: ShardedRecord) -> None:
        folder = self._sharded_dir()
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{record.name}.json", record.to_json())
        self.sharded[record.name] = record

    def drop_sharded(self, name: str) -> None:
        self.sharded.pop(name, None)
        (self._sharded_dir() / f"{name}.json").unlink(missing_ok=True)

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.slots]

    def placement(self, name: str) -> dict[str, Any] | None:
        """Where a stepper lives, for its summary."""
        record = self.sharded.get(name)
        if record is not None:
            shards = [
                {"slot": sh.slot, "params": sh.params, **self._where(self.slots[sh.slot])}
                for sh in record.shards
            ]
        else:
            index = self.slot_of(name)
            if index is None:
                return None
            shards = [{"slot": index, "params": None, **self._where(self.slots[index])}]
        return {
            "mode": "ray",
            "sharded": record is not None,
            "shards": shards,
            "recoveries": self.recoveries.get(name, []),
        }

    @staticmethod
    def _where(slot: Slot) -> dict[str, Any]:
        return {
            "state": slot.state,
            "node": slot.info.get("node"),
            "node_id": slot.info.get("node_id"),
            "pid": slot.info.get("pid"),
            "device": slot.info.get("device"),
        }

    def slot_dir(self, index: int) -> Path:
        return slot_dir(self.config.data_dir, index)
