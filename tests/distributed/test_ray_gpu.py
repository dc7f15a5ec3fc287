"""The distributed mode on one GPU: ``serve --ray --slots 2 --device cuda`` shares the GPU
between the two slot actors (half a GPU each), both start, and steppers on a slot and
sharded over both step bit for bit like torch.optim on the same GPU. Skipped without CUDA.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "client"))

from conftest import spawn_server  # noqa: E402
from remote_support import Case, cases, plain_and_all_on, run_parity  # noqa: E402

from adamscope.client import Client  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.ray, pytest.mark.e2e, pytest.mark.timeout(600)]

#: Both keep the step counts on the GPU: fused, and foreach with capturable=True.
CASES = cases(["fused"], [(torch.float32,)], plain_and_all_on) + cases(
    ["foreach"], [(torch.float32,)], plain_and_all_on, {"capturable": True}
)


@pytest.fixture(scope="module")
def ray_gpu_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("ray-gpu")
    with spawn_server(
        data, "--ray", "--slots", "2", "--device", "cuda", timeout=300, stop_timeout=120
    ) as url:
        yield url


def test_two_slots_share_one_gpu(ray_gpu_url: str) -> None:
    health = httpx.get(f"{ray_gpu_url}/healthz", timeout=60).json()
    slots = health["slots"]
    assert [s["state"] for s in slots] == ["ok", "ok"], health
    assert all(str(s["device"]).startswith("cuda") for s in slots)
    total = slots[0]["device_total_bytes"]
    if torch.cuda.device_count() == 1:
        assert all(s["capacity_bytes"] <= total / 2 for s in slots)  # each its half


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cuda_parity_on_a_slot_and_sharded(case: Case, ray_gpu_url: str) -> None:
    with Client(ray_gpu_url, timeout=300) as client:
        run_parity(case, client, steps=10, device="cuda", remote_device="cuda")
        run_parity(case, client, steps=10, device="cuda", remote_device="cuda", shards=2)
