"""A long keyed run stays restorable: the idempotency journal does not grow the checkpoint.

Every keyed step is remembered in the stepper's journal, which travels in every checkpoint.
It once recorded the names of every stepped and skipped parameter per key, so a stepper of
hundreds of long-named tensors grew its checkpoint header by tens of KB per step, until the
header passed the 100 MB that safetensors readers accept and the stepper was lost at the next
restart. Here a real server process steps such a stepper 1,500 times with a fresh key per
step (some steps skip a few tensors), is killed with SIGKILL, restarts, and must come back
bit for bit equal to a local ``torch.optim.Adam``, with the checkpoint small and readable
by the reference library, and every remembered key still answered as the step it applied.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from crash_support import ForkServer

from adamscope.client import codec

pytestmark = pytest.mark.e2e

V1 = "/v1/steppers"
OCTET = {"content-type": "application/octet-stream"}
NAME = "long"
#: 256 tensors with 300-character names: the old journal added ~78 KB per keyed step, and
#: its checkpoint header passed 100 MB before step 1,300.
TENSORS = 256
STEPS = 1500
#: The policy writes every 250 steps, so the last step (1,500) is on disk when it is killed.
EVERY = 250


def names() -> list[str]:
    return [
        f"model.decoder.layers.{i // 8}.block_{i % 8}.".ljust(293, "x") + ".weight"
        for i in range(TENSORS)
    ]


NAMES = names()


def initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return dict(zip(NAMES, torch.randn(TENSORS, 4, generator=g).unbind(), strict=True))


def grads(k: int) -> dict[str, torch.Tensor]:
    """Step k's gradients: every tensor, except on every 7th step, where a few (a different
    few each time) get none and skip the step."""
    g = torch.Generator().manual_seed(10_000 + k)
    out = dict(zip(NAMES, torch.randn(TENSORS, 4, generator=g).unbind(), strict=True))
    if k % 7 == 0:
        for i in range(k % 5 + 1):
            out.pop(NAMES[(k * 31 + i * 17) % TENSORS], None)
    return out


class Replica:
    def __init__(self) -> None:
        self.params = {n: t.clone().requires_grad_(True) for n, t in initial().items()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=0.01, fused=True)

    def step(self, k: int) -> None:
        sent = grads(k)
        for n, p in self.params.items():
            p.grad = sent.get(n)
        self.opt.step()


@pytest.fixture(scope="module")
def forkserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path_factory.mktemp("forkserver") / "log.txt")
    try:
        yield server
    finally:
        server.close()


def step(h: httpx.Client, k: int, key: str) -> dict[str, Any]:
    r = h.post(
        f"{V1}/{NAME}/step",
        content=codec.encode(grads(k)),
        headers={**OCTET, "Idempotency-Key": key},
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def assert_equal(h: httpx.Client, replica: Replica, expected_step: int) -> None:
    assert h.get(f"{V1}/{NAME}").json()["step"] == expected_step
    params, _ = codec.decode(h.get(f"{V1}/{NAME}/params").content)
    flat, _ = codec.decode(h.get(f"{V1}/{NAME}/state").content)
    for n, p in replica.params.items():
        assert torch.equal(params[n], p.detach()), n
        for key, t in replica.opt.state[p].items():
            assert torch.equal(flat[f"{n}.{key}"], t), (n, key)
    assert len(flat) == 3 * TENSORS


def test_thousands_of_keyed_steps_survive_sigkill_bit_exact(
    forkserver: ForkServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = forkserver.spawn(data, signals=False)
    spec = {
        "name": NAME,
        "optimizer": "adam",
        "hyperparameters": {"lr": 0.01, "fused": True},
        "params": [{"name": n} for n in NAMES],
        "durability": {"mode": "every_n", "n": EVERY},
    }
    replica = Replica()
    keys: dict[int, str] = {}
    replies: dict[int, dict[str, Any]] = {}
    with httpx.Client(base_url=server.url, timeout=60) as h:
        r = h.post(
            V1, content=codec.encode(initial(), {"adamscope.spec": json.dumps(spec)}), headers=OCTET
        )
        assert r.status_code == 201, r.text
        for k in range(1, STEPS + 1):
            keys[k] = uuid.uuid4().hex
            replies[k] = step(h, k, keys[k])
            assert replies[k]["step"] == k and not replies[k]["replayed"]
            replica.step(k)
        assert h.get(f"{V1}/{NAME}").json()["persisted_step"] == STEPS
    server.kill()

    checkpoint = data / "steppers" / NAME / "checkpoint.safetensors"
    with open(checkpoint, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    assert header < 2_000_000, f"a {header}-byte header after {STEPS} steps"
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        assert len(list(f.keys())) == 4 * TENSORS  # param + step, exp_avg, exp_avg_sq

    server = forkserver.spawn(data, signals=False)
    with httpx.Client(base_url=server.url, timeout=60) as h:
        assert h.get("/healthz").json()["persistence"]["failed"] == []
        assert_equal(h, replica, STEPS)
        # The restored journal answers retries as the steps they applied, skips included.
        for k in (1, 7, 14, 1001, STEPS - 3, STEPS):
            again = step(h, k, keys[k])
            assert again["replayed"], k
            assert (again["step"], again["stepped"], again["skipped"]) == (
                k,
                replies[k]["stepped"],
                replies[k]["skipped"],
            ), k
        assert_equal(h, replica, STEPS)
        # ... and the run goes on bit for bit.
        for k in range(STEPS + 1, STEPS + 4):
            step(h, k, uuid.uuid4().hex)
            replica.step(k)
        assert_equal(h, replica, STEPS + 3)
    server.kill()
