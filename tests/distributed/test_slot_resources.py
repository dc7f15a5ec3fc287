"""What the slots ask Ray for and the room a slot has (service.distributed.resources and
the cluster's placement), as pure functions of the cluster's resources: one GPU and two
slots, more slots than GPUs, requests Ray could never satisfy; a slot's room shrinking with
every stepper placed on it; and an actor Ray cannot place failing the start in time."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from adamscope.service.distributed.cluster import Cluster, ClusterConfig, Slot, SlotStartError
from adamscope.service.distributed.resources import (
    SlotRequest,
    SlotResourceError,
    preferred_node,
    slot_capacity,
    slot_nodes,
    slot_request,
)
from adamscope.service.engine.footprint import CONTEXT_BYTES, Footprint, footprint

GiB = 2**30


@pytest.mark.parametrize(
    ("asked", "cluster", "expected"),
    [
        ((0, 0.0, 0.0), {"CPU": 16.0}, SlotRequest(2, 0.0, 0.0)),
        ((0, 0.0, 0.0), {"CPU": 16.0, "GPU": 1.0}, SlotRequest(1, 1.0, 0.0)),
        ((0, 0.0, 0.0), {"CPU": 16.0, "GPU": 4.0}, SlotRequest(4, 1.0, 0.0)),
        ((2, 0.0, 0.0), {"CPU": 16.0, "GPU": 1.0}, SlotRequest(2, 0.5, 0.0)),  # the one-GPU case
        ((3, 0.0, 1.0), {"CPU": 16.0, "GPU": 1.0}, SlotRequest(3, 0.3333, 1.0)),
        ((3, 0.0, 0.0), {"CPU": 16.0, "GPU": 2.0}, SlotRequest(3, 0.5, 0.0)),  # 2 + 1 to a GPU
        ((2, 0.0, 0.0), {"CPU": 16.0, "GPU": 8.0}, SlotRequest(2, 1.0, 0.0)),
        ((2, 2.0, 0.0), {"CPU": 16.0, "GPU": 4.0}, SlotRequest(2, 2.0, 0.0)),
        ((4, 0.25, 0.0), {"CPU": 16.0, "GPU": 1.0}, SlotRequest(4, 0.25, 0.0)),
    ],
)
def test_what_each_slot_asks_for(
    asked: tuple[int, float, float], cluster: dict[str, float], expected: SlotRequest
) -> None:
    assert slot_request(*asked, cluster) == expected


@pytest.mark.parametrize(
    ("asked", "cluster", "message"),
    [
        ((2, 1.0, 0.0), {"CPU": 16.0, "GPU": 1.0}, "2 slot(s) of 1 GPU each cannot be placed"),
        ((1, 1.0, 0.0), {"CPU": 16.0}, "the Ray cluster has 0 GPU(s)"),
        ((3, 0.5, 0.0), {"CPU": 16.0, "GPU": 1.0}, "3 slot(s) of 0.5 GPU each"),
        ((2, 0.7, 0.0), {"CPU": 16.0, "GPU": 1.0}, "cannot be placed"),  # 0.7 + 0.7 > one GPU
        ((1, 1.5, 0.0), {"CPU": 16.0, "GPU": 4.0}, "only up to 1, else a whole number"),
        ((4, 0.0, 8.0), {"CPU": 16.0}, "need 32 CPUs; the Ray cluster has 16"),
        ((-1, 0.0, 0.0), {"CPU": 16.0}, "cannot be negative"),
        ((20_000, 0.0, 0.0), {"CPU": 16.0, "GPU": 1.0}, "cannot share 1 GPU"),
    ],
)
def test_requests_ray_could_never_place_are_refused_saying_why(
    asked: tuple[int, float, float], cluster: dict[str, float], message: str
) -> None:
    with pytest.raises(SlotResourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        slot_request(*asked, cluster)


def test_a_slots_capacity() -> None:
    info = {"device_free_bytes": 70 * GiB, "device_total_bytes": 80 * GiB}
    assert slot_capacity(info, 5 * GiB, 1.0) == 75 * GiB  # its restored steppers added back
    assert slot_capacity(info, 0, 0.5) == 40 * GiB - CONTEXT_BYTES  # its share of the GPU
    assert slot_capacity({"device_free_bytes": None}, 0, 1.0) is None
    assert slot_capacity({"device_free_bytes": 0, "device_total_bytes": 1}, 0, 0.5) == 0


def _cluster(tmp_path: Path, infos: list[dict[str, Any]], gpu_share: float = 1.0) -> Cluster:
    config = ClusterConfig(
        settings={"data_dir": str(tmp_path)}, slots=len(infos), num_gpus=gpu_share
    )
    cluster = Cluster.__new__(Cluster)  # placement only: no Ray, no actors
    cluster.config = config
    cluster.slots = []
    for i, info in enumerate(infos):
        slot = Slot(i, state="ok")
        slot.started({"device": "cuda:0", **info}, {}, gpu_share)
        cluster.slots.append(slot)
    return cluster


def need(sizes: list[int], device: str) -> Footprint:
    return footprint([(sizes, {})], device)


def test_the_room_shrinks_with_every_stepper_placed(tmp_path: Path) -> None:
    """Free memory is sampled once, at start: the room is that less the footprints of
    the steppers placed since (counted as soon as they are placed, before the slot
    reports them), not the same free memory again and again."""
    cluster = _cluster(tmp_path, [{"device_free_bytes": 10 * GiB, "device_total_bytes": 16 * GiB}])
    sizes = [("w", GiB)]  # 1 GiB of parameters: 7 GiB on the device with foreach
    placed = 0
    while True:
        try:
            plan = cluster.plan(sizes, need, None)
        except MemoryError as e:
            assert "slots together hold about" in str(e)
            break
        cluster.reserve(f"s{placed}", plan, sizes, need)
        placed += 1
    assert placed == 1  # 7 GiB fit in 10; a second would not
    assert cluster.rooms(cluster.slots[0])[0] == 10 * GiB - need([GiB], "cuda").on_device


def test_a_stepper_larger_than_one_slot_is_split_over_enough_slots(tmp_path: Path) -> None:
    info = {"device_free_bytes": 8 * GiB, "device_total_bytes": 16 * GiB}
    cluster = _cluster(tmp_path, [info, info, info])
    sizes = [(f"p{i}", GiB // 2) for i in range(8)]  # 4 GiB: 20 GiB on the device
    plan = cluster.plan(sizes, need, None)
    assert len(plan) == 3
    assert sorted(n for sh in plan for n in sh.params) == sorted(n for n, _ in sizes)


def test_two_slots_on_one_gpu_share_it(tmp_path: Path) -> None:
    info = {"device_free_bytes": 70 * GiB, "device_total_bytes": 80 * GiB}
    cluster = _cluster(tmp_path, [info, info], gpu_share=0.5)
    assert [s.capacity for s in cluster.slots] == [40 * GiB - CONTEXT_BYTES] * 2


def test_the_budget_room_counts_footprint_totals(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, [{"device_free_bytes": None, "budget_bytes": 10_000}])
    cluster.slots[0].info["device"] = "cpu"
    cluster.slots[0].steppers = {"a": {"bytes": 4_000, "device_bytes": 4_000}}
    assert cluster.rooms(cluster.slots[0]) == (None, 6_000)


class _NeverPlaced:
    """An actor handle whose methods never answer (Ray could not place the actor)."""

    def __getattr__(self, name: str) -> Any:
        class Method:
            def remote(self, *args: Any) -> Any:
                return asyncio.get_running_loop().create_future()

        return Method()


def test_an_actor_that_is_never_placed_fails_the_start_in_time(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, [{}])
    cluster.config.place_timeout = 0.2
    slot = cluster.slots[0]
    slot.actor = _NeverPlaced()

    async def start() -> None:
        await cluster._start_actor(slot, time.monotonic() + 0.2)

    with pytest.raises(SlotStartError, match="Ray did not place its actor"):
        asyncio.run(asyncio.wait_for(start(), 10))


def test_slots_prefer_the_live_node_holding_fewest_slots_with_room() -> None:
    nodes = [
        {"NodeID": "a", "Alive": True, "Resources": {"CPU": 4.0}},
        {"NodeID": "b", "Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
        {"NodeID": "c", "Alive": False, "Resources": {"CPU": 4.0, "GPU": 1.0}},
        {"NodeID": "d", "Alive": True, "Resources": {"CPU": 0.5, "GPU": 1.0}},
    ]
    assert slot_nodes(nodes, 0, 0) == ["a", "b", "d"]
    assert slot_nodes(nodes, 0, 1) == ["b", "d"]  # GPUs asked: a has none, c is dead
    assert slot_nodes(nodes, 1, 1) == ["b"]
    assert preferred_node(["a", "b"], []) == "a"  # a tie: the first listed
    assert preferred_node(["a", "b"], ["a"]) == "b"
    assert preferred_node(["a", "b"], ["a", "b", "b"]) == "a"
    assert preferred_node(["a", "b"], [None, "b"]) == "a"  # a slot not placed yet
    assert preferred_node(["a", "b"], ["b"], avoid="a") == "b"  # not back onto a lost node
    assert preferred_node(["a"], [], avoid="a") == "a"  # unless it is the only one
    assert preferred_node([], ["a"]) is None
