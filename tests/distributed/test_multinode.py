"""The distributed mode on several Ray nodes: a multi-node cluster on this one machine.

``ray.cluster_utils.Cluster`` starts a head node and two worker nodes (each its own raylet
and node ID); ``adamscope serve --ray --ray-address`` joins it as on a real cluster. The
slots go to different nodes. A worker node removed in
the middle of a sharded run takes one shard's actor with it: the next step succeeds once
the slot is restored on a surviving node from the shared data directory, no acknowledged
step is lost (every-step durability), the run equals local Adam bit for bit, and the
stepper's summary says which node the slot moved from and to.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import spawn_server  # noqa: E402

from adamscope.client import Client, RemoteAdam  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.timeout(600)]

#: Nodes declared dead within about two seconds of their raylet's end (Ray's default
#: takes 15 s or more), so that the lost slot's replacement is placed elsewhere quickly.
FAST_HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
}


@pytest.fixture
def cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": FAST_HEALTH},
    )
    try:
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


def slots(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{url}/healthz", timeout=60).json()["slots"])


def test_slots_spread_over_nodes_and_a_lost_node_loses_no_step(
    cluster: Any, tmp_path: Path
) -> None:
    head = cluster.head_node.node_id
    workers = {n.node_id: n for n in cluster.worker_nodes}
    with spawn_server(
        tmp_path / "data",
        "--ray",
        "--ray-address",
        cluster.address,
        "--slots",
        "2",
        "--slot-bind",
        "127.0.0.1",
        timeout=300,
        stop_timeout=120,
    ) as url:
        before = slots(url)
        nodes = [s["node_id"] for s in before]
        assert len(set(nodes)) == 2, before  # SPREAD: one slot per node
        assert all(n in workers or n == head for n in nodes)
        victim_slot = next(s for s in before if s["node_id"] in workers)
        victim = victim_slot["node_id"]

        g = torch.Generator().manual_seed(7)
        shapes = [(16, 8), (8,), (8, 4), (4,)]
        init = [torch.randn(s, generator=g) for s in shapes]
        local = [p.clone().requires_grad_() for p in init]
        remote = [p.clone().requires_grad_() for p in init]
        ref = torch.optim.Adam(local, lr=1e-2, amsgrad=True)
        with Client(url, timeout=300) as c:
            opt = RemoteAdam(
                [(f"p{i}", p) for i, p in enumerate(remote)],
                lr=1e-2,
                amsgrad=True,
                client=c,
                name="across-nodes",
                shards=2,
            )

            def step() -> None:
                grads = [torch.randn(s, generator=g) for s in shapes]
                for a, b, gr in zip(local, remote, grads, strict=True):
                    a.grad, b.grad = gr.clone(), gr.clone()
                ref.step()
                opt.step()

            for _ in range(8):
                step()
            placement = c.get("across-nodes").placement
            assert placement is not None
            assert {s["node_id"] for s in placement["shards"]} == set(nodes)

            cluster.remove_node(workers[victim], allow_graceful=False)
            for _ in range(8):  # the first waits for the slot to come back elsewhere
                step()
            assert all(torch.equal(a, b) for a, b in zip(local, remote, strict=True))
            summary = c.get("across-nodes")
            assert summary.step == 16
            moved = [r for r in summary.placement["recoveries"] if r["slot"] == victim_slot["slot"]]
            assert moved and moved[-1]["from"]["node_id"] == victim
            assert moved[-1]["to"]["node_id"] != victim and moved[-1]["restored"]
            after = {s["slot"]: s for s in slots(url)}
            alive = ({head} | set(workers)) - {victim}
            assert after[victim_slot["slot"]]["node_id"] in alive
            assert all(s["state"] == "ok" for s in after.values())
