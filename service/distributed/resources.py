"""What each slot actor asks Ray for, and what room a slot has for steppers.

Decided before anything is deployed, from the cluster's resources, so that a request Ray
can never satisfy is refused at once with a message saying why (an actor whose resources
cannot be had would otherwise wait for them forever, and the service with it):

* with GPUs in the cluster and no ``--slot-gpus``, every slot gets a GPU: one each when
  there are at least as many GPUs as slots, else the slots packed onto the GPUs, ``k`` to
  a GPU taking ``1/k`` each (``--slots 2`` on one GPU: half a GPU each, both on it; 3
  slots on 2 GPUs: half a GPU each);
* ``--slots 0`` (the default) means one slot per GPU, or 2 without GPUs;
* Ray takes a fraction of a GPU only up to 1 and to four decimals, and a fraction must fit
  on one GPU: ``k`` slots of ``f`` GPUs fit ``floor(1 / f)`` to a GPU.

A slot's room (:func:`slot_capacity`) is what its device had free when its service started
(with its own steppers added back), less what steppers placed since take by their footprint
(:mod:`adamscope.service.engine.footprint`); a slot on a shared GPU gets at most its share of the
device, less one CUDA context.

Where a slot's actor goes (:func:`preferred_node`): the live node holding the fewest other
slots among those with the resources a slot asks for, so that the slots spread over the
nodes and losing one loses as few as it can; never the node a lost actor was on while
another will do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.footprint import CONTEXT_BYTES

__all__ = [
    "SlotRequest",
    "SlotResourceError",
    "preferred_node",
    "slot_capacity",
    "slot_nodes",
    "slot_request",
]

#: Ray's resolution for fractional resources.
_GRAIN = 10_000


class SlotResourceError(ValueError):
    """The slots cannot be had from this cluster (the message says why)."""


@dataclass(frozen=True)
class SlotRequest:
    slots: int
    num_gpus: float
    num_cpus: float


def slot_request(
    slots: int, slot_gpus: float, slot_cpus: float, cluster: Mapping[str, float]
) -> SlotRequest:
    """The slot count and each slot actor's resources for a cluster with ``cluster``'s
    resources (``ray.cluster_resources()``); raises :class:`SlotResourceError` when Ray
    could never place them all."""
    if slots < 0 or slot_gpus < 0 or slot_cpus < 0:
        raise SlotResourceError("--slots, --slot-gpus and --slot-cpus cannot be negative")
    gpus = float(cluster.get("GPU", 0.0))
    cpus = float(cluster.get("CPU", 0.0))
    if slots == 0:
        slots = int(gpus) if gpus >= 1 else 2
    if slot_gpus == 0 and gpus > 0:
        # Slots are packed onto whole GPUs: k slots to a GPU take 1/k each.
        per_gpu = 1 if gpus >= slots else -(-slots // max(int(gpus), 1))
        slot_gpus = math.floor(_GRAIN / per_gpu) / _GRAIN
        if slot_gpus == 0 or int(gpus) == 0:
            raise SlotResourceError(
                f"{slots} slots cannot share {gpus:g} GPU(s): Ray hands "
                f"out at least 1/{_GRAIN} of a GPU, to slots on one GPU"
            )
    if slot_gpus > 1 and slot_gpus != int(slot_gpus):
        raise SlotResourceError(
            f"--slot-gpus {slot_gpus:g}: Ray takes a fraction of a GPU "
            "only up to 1, else a whole number"
        )
    if slot_gpus > 0:
        per_gpu = 1 if slot_gpus >= 1 else math.floor(1 / slot_gpus + 1e-9)
        placeable = (int(gpus) * per_gpu) if slot_gpus <= 1 else int(gpus // slot_gpus)
        if placeable < slots:
            raise SlotResourceError(
                f"{slots} slot(s) of {slot_gpus:g} GPU each cannot be placed: the Ray cluster "
                f"has {gpus:g} GPU(s); use fewer --slots, a smaller --slot-gpus, or add GPUs"
            )
    if slot_cpus * slots > cpus + 1e-9:
        raise SlotResourceError(
            f"{slots} slot(s) of {slot_cpus:g} CPU each need {slot_cpus * slots:g} CPUs; the "
            f"Ray cluster has {cpus:g}"
        )
    return SlotRequest(slots, slot_gpus, slot_cpus)


def slot_capacity(info: Mapping[str, Any], held_at_start: int, gpu_share: float) -> int | None:
    """Device bytes a slot's steppers may take in all (None: not a GPU slot): what was
    free when its service started plus what its steppers held then (``held_at_start``:
    device bytes by their footprints), capped on a shared GPU (``0 < gpu_share < 1``) at
    its share of the device less one CUDA context."""
    free, total = info.get("device_free_bytes"), info.get("device_total_bytes")
    if free is None:
        return None
    capacity = int(free) + held_at_start
    if total is not None and 0 < gpu_share < 1:
        capacity = min(capacity, int(int(total) * gpu_share) - CONTEXT_BYTES)
    return max(capacity, 0)


def slot_nodes(nodes: Sequence[Mapping[str, Any]], num_cpus: float, num_gpus: float) -> list[str]:
    """The IDs of the live nodes (``ray.nodes()``) with the resources a slot asks for."""
    return [
        str(n["NodeID"])
        for n in nodes
        if n.get("Alive")
        and n.get("Resources", {}).get("GPU", 0.0) >= num_gpus
        and n.get("Resources", {}).get("CPU", 0.0) >= num_cpus
    ]


def preferred_node(
    nodes: Sequence[str], held: Sequence[str | None], avoid: str | None = None
) -> str | None:
    """Of ``nodes``, the one where fewest of the other slots are (``held``: each other
    slot's node), the first listed on a tie, ``avoid`` only if it is the only one; None
    without nodes."""
    left = [n for n in nodes if n != avoid] or list(nodes)
    if not left:
        return None
    return min(left, key=lambda n: (held.count(n), left.index(n)))
