"""What the cluster keeps about its slots and its sharded steppers.

A :class:`Slot` is a numbered place for steppers with one live actor at a time; a
:class:`ShardedRecord` is a stepper split by parameter tensors over several slots, kept as
JSON in ``<data dir>/sharded/<name>.json`` (on every slot its part is a stepper of the same
name holding that shard's tensors).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .resources import slot_capacity

__all__ = ["Shard", "ShardedRecord", "Slot"]


@dataclass
class Shard:
    slot: int
    params: list[str]


@dataclass
class ShardedRecord:
    """A stepper split over slots by parameter tensors; on every slot its part is a stepper
    of the same name holding that shard's tensors."""

    name: str
    params: list[str]  # every parameter, in the stepper's order
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]
    shards: list[Shard]
    created_at: float = field(default_factory=time.time)

    def shard_of(self, param: str) -> int:
        for i, s in enumerate(self.shards):
            if param in s.params:
                return i
        raise KeyError(param)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @staticmethod
    def from_json(raw: bytes) -> ShardedRecord:
        data = json.loads(raw)
        data["shards"] = [Shard(**s) for s in data["shards"]]
        return ShardedRecord(**data)


@dataclass
class Slot:
    index: int
    actor: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    generation: int = 0
    steppers: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: str = "starting"  # starting | ok | recovering | failed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Device bytes its steppers may take in all (None: not a GPU slot); set at start.
    capacity: int | None = None

    @property
    def url(self) -> str:
        return str(self.info["url"])

    @property
    def device_type(self) -> str:
        return str(self.info.get("device") or "cpu").split(":", 1)[0]

    def held_bytes(self) -> int:
        """Footprint totals of its steppers (those being created included)."""
        return sum(int(s.get("bytes", 0)) for s in self.steppers.values())

    def held_device_bytes(self) -> int:
        return sum(int(s.get("device_bytes", s.get("bytes", 0))) for s in self.steppers.values())

    def started(
        self, info: dict[str, Any], steppers: dict[str, dict[str, Any]], gpu_share: float
    ) -> None:
        """Its (new) actor's service is up: what it runs on and holds now."""
        self.info, self.steppers = info, steppers
        self.capacity = slot_capacity(info, self.held_device_bytes(), gpu_share)

    def describe(self) -> dict[str, Any]:
        keep = (
            "url",
            "pid",
            "node",
            "node_id",
            "address",
            "device",
            "device_free_bytes",
            "device_total_bytes",
        )
        return {
            "slot": self.index,
            "state": self.state,
            "generation": self.generation,
            "steppers": len(self.steppers),
            "bytes": self.held_bytes(),
            "device_bytes": self.held_device_bytes(),
            "capacity_bytes": self.capacity,
            **{k: self.info.get(k) for k in keep},
        }
