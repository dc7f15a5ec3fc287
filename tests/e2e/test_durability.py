"""End to end durability: real server processes killed with SIGKILL, restarted, and compared
bit for bit with a local ``torch.optim.Adam`` replica.

THE crash test: a client thread steps a stepper (policy ``every_step``) continuously while
the server process is SIGKILLed after a random delay, again and again. The client advances
its local replica only on acknowledged steps. After each restart the stepper must equal the
replica exactly (parameters and every state tensor), or, when the kill landed after the
step was written but before its reply left, the replica advanced by exactly that one step.
Anything else (a lost acknowledged step, a torn mix of two steps) fails.

Servers are forked from a fork server (complete service processes: the restart runs the
same start-up restore as ``adamscope serve``), so the many restarts fit in seconds; other
tests run ``python -m adamscope.service.cli serve`` itself.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from crash_support import Forked, ForkServer

from adamscope.client import codec

pytestmark = pytest.mark.e2e

V1 = "/v1/steppers"
OCTET = {"content-type": "application/octet-stream"}
KILLS = 24
NAME = "crash"


# ---------------------------------------------------------------------- a local replica


SHAPES = {"w": (8, 4), "b": (4,), "h": (6,)}
DTYPES = {"w": torch.float32, "b": torch.float32, "h": torch.bfloat16}


def initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        n: torch.randn(s, generator=g, dtype=torch.float64).to(DTYPES[n]) for n, s in SHAPES.items()
    }


def grads(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + k)
    return {
        n: torch.randn(s, generator=g, dtype=torch.float64).to(DTYPES[n]) for n, s in SHAPES.items()
    }


SPEC: dict[str, Any] = {
    "name": NAME,
    "optimizer": "adam",
    "hyperparameters": {"lr": 0.01, "foreach": False},
    "params": [{"name": n} for n in SHAPES],
    "groups": [{"params": ["w", "b"]}, {"params": ["h"], "lr": 0.05, "amsgrad": True}],
}


class Replica:
    """The same optimizer locally, advanced only on acknowledged steps."""

    def __init__(self) -> None:
        self.params = {n: t.clone().requires_grad_(True) for n, t in initial().items()}
        p = self.params
        self.opt = torch.optim.Adam(
            [{"params": [p["w"], p["b"]]}, {"params": [p["h"]], "lr": 0.05, "amsgrad": True}],
            lr=0.01,
            foreach=False,
        )
        self.step_count = 0

    def step(self, k: int) -> None:
        assert k == self.step_count + 1
        for n, g in grads(k).items():
            self.params[n].grad = g
        self.opt.step()
        self.step_count = k

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {n: dict(self.opt.state[p]) for n, p in self.params.items() if self.opt.state.get(p)}


def create(url: str, durability: dict[str, Any] | None = None) -> None:
    spec = {**SPEC, **({"durability": durability} if durability else {})}
    body = codec.encode(initial(), {"adamscope.spec": json.dumps(spec)})
    r = httpx.post(f"{url}{V1}", content=body, headers=OCTET, timeout=30)
    assert r.status_code == 201, r.text


def remote(
    url: str, name: str = NAME
) -> tuple[int, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(step, params, state) of the stepper, each read as safetensors."""
    with httpx.Client(base_url=url, timeout=30) as h:
        summary = h.get(f"{V1}/{name}")
        assert summary.status_code == 200, summary.text
        params, _ = codec.decode(h.get(f"{V1}/{name}/params").content)
        flat, _ = codec.decode(h.get(f"{V1}/{name}/state").content)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        pname, _, which = key.rpartition(".")
        state.setdefault(pname, {})[which] = t
    return summary.json()["step"], params, state


def assert_equals_replica(url: str, replica: Replica) -> None:
    step, params, state = remote(url)
    assert step == replica.step_count
    for n, p in replica.params.items():
        assert params[n].dtype == p.dtype and torch.equal(params[n], p.detach()), n
    expected = replica.state()
    assert set(state) == set(expected)
    for n, entries in expected.items():
        assert set(state[n]) == set(entries), n
        for key, t in entries.items():
            assert state[n][key].dtype == t.dtype and torch.equal(state[n][key], t), (n, key)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def forkserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path_factory.mktemp("forkserver") / "log.txt")
    try:
        yield server
    finally:
        server.close()


# ---------------------------------------------------------------------- the crash test


class Stepping(threading.Thread):
    """Steps continuously from ``first`` until the server goes away; ``progressed`` is set
    once its first step is acknowledged."""

    def __init__(self, url: str, first: int) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.next = first
        self.acked: list[int] = []
        self.error: BaseException | None = None
        self.progressed = threading.Event()

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=10) as h:
                while True:
                    k = self.next
                    try:
                        r = h.post(
                            f"{V1}/{NAME}/step", content=codec.encode(grads(k)), headers=OCTET
                        )
                    except httpx.TransportError:
                        return  # killed: this step is not acknowledged
                    assert r.status_code == 200, r.text
                    assert r.json()["step"] == k, r.text
                    self.acked.append(k)
                    self.next = k + 1
                    self.progressed.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
            self.progressed.set()  # the test reports it


def test_sigkill_at_random_points_loses_no_acknowledged_step(
    forkserver: ForkServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    rng = random.Random(20240613)
    replica = Replica()
    server: Forked = forkserver.spawn(data)
    create(server.url, {"mode": "every_step"})
    outcomes = {"acked": 0, "one_more": 0}
    for _ in range(KILLS):
        stepping = Stepping(server.url, replica.step_count + 1)
        stepping.start()
        # A random point of a run that is stepping: after its first acknowledged step (a
        # fixed sleep alone could end before the first step on a loaded machine), somewhere
        # among the steps that follow it, in flight or between two.
        assert stepping.progressed.wait(timeout=60), "no step was acknowledged in 60 s"
        time.sleep(rng.uniform(0.0, 0.25))
        server.kill()
        stepping.join(timeout=30)
        assert not stepping.is_alive() and stepping.error is None, stepping.error
        for k in stepping.acked:
            replica.step(k)

        server = forkserver.spawn(data)
        step, _, _ = remote(server.url)
        if step == replica.step_count + 1:
            # Written before the kill, not acknowledged: exactly the step in flight.
            replica.step(step)
            outcomes["one_more"] += 1
        else:
            outcomes["acked"] += 1
        assert_equals_replica(server.url, replica)
    server.kill()
    assert sum(outcomes.values()) == KILLS
    assert replica.step_count >= KILLS, "the server was killed before it stepped at all"
    print(f"{KILLS} kills, {replica.step_count} steps, outcomes {outcomes}")


# ---------------------------------------------------------------------- other policies


def step_through(url: str, ks: range) -> None:
    with httpx.Client(base_url=url, timeout=30) as h:
        for k in ks:
            r = h.post(f"{V1}/{NAME}/step", content=codec.encode(grads(k)), headers=OCTET)
            assert r.status_code == 200 and r.json()["step"] == k, r.text


def history(upto: int) -> dict[int, Replica]:
    """Replicas at every step 0..upto (small tensors: cheap)."""
    out = {}
    for s in range(upto + 1):
        r = Replica()
        for k in range(1, s + 1):
            r.step(k)
        out[s] = r
    return out


def test_every_n_restores_the_last_written_step_after_sigkill(
    forkserver: ForkServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    replicas = history(16)
    server = forkserver.spawn(data)
    create(server.url, {"mode": "every_n", "n": 5})
    step_through(server.url, range(1, 13))  # written at 5 and 10
    server.kill()
    server = forkserver.spawn(data)
    assert_equals_replica(server.url, replicas[10])
    step_through(server.url, range(11, 14))  # 3 steps after the restore: none written
    server.kill()
    server = forkserver.spawn(data)
    assert_equals_replica(server.url, replicas[10])
    step_through(server.url, range(11, 17))  # written at 15
    server.kill()
    server = forkserver.spawn(data)
    assert_equals_replica(server.url, replicas[15])
    step_through(server.url, range(16, 17))
    server.terminate()  # graceful: the unwritten step 16 is flushed
    server = forkserver.spawn(data)
    assert_equals_replica(server.url, replicas[16])
    server.kill()


def test_manual_restores_the_last_checkpoint_after_any_stop(
    forkserver: ForkServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    replicas = history(5)
    server = forkserver.spawn(data)
    create(server.url, {"mode": "manual"})
    step_through(server.url, range(1, 4))
    r = httpx.post(f"{server.url}{V1}/{NAME}/checkpoint", timeout=30)
    assert r.status_code == 200 and r.json()["step"] == 3
    step_through(server.url, range(4, 6))
    server.terminate()  # graceful, but a manual stepper is written only when asked
    server = forkserver.spawn(data)
    assert_equals_replica(server.url, replicas[3])
    step_through(server.url, range(4, 5))
    server.kill()
    server = forkserver.spawn(data)
    assert_equals_replica(server.url, replicas[3])
    server.kill()


# ---------------------------------------------------------------------- adamscope serve + CLI


def test_serve_restart_restores_all_steppers_and_the_cli_manages_snapshots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``adamscope serve`` stopped and started again on its data directory restores every
    stepper; the ``adamscope`` snapshot commands work against it."""
    from conftest import spawn_server

    from adamscope.client import Client
    from adamscope.service import cli
    from adamscope.service.cli.snapshots import parse_durability

    data = tmp_path / "data"
    policies = {"s-step": "every_step", "s-n": "every_n:4", "s-time": "interval:60"}
    exported = tmp_path / "export.safetensors"

    def run(*argv: str) -> str:
        assert cli.main([*argv, "--url", url]) == 0
        return capsys.readouterr().out

    with (
        spawn_server(data, "--device", "cpu", "--durability", "every_n:100") as url,
        Client(url) as c,
    ):
        for name, policy in policies.items():
            c.create(
                name,
                initial(),
                lr=0.01,
                foreach=False,
                durability=parse_durability(policy).model_dump(exclude_none=True),
            )
            for k in range(1, 4):
                c.step(name, grads(k))
        c.create("s-default", initial(), lr=0.01)
        assert c.get("s-default").durability is not None
        assert c.get("s-default").durability.model_dump() == {
            "mode": "every_n",
            "n": 100,
            "seconds": None,
        }

        assert "snapshot first of s-step at step 3" in run("snapshot", "s-step", "--as", "first")
        c.step("s-step", grads(4))
        listing = run("snapshots", "s-step")
        assert listing.splitlines()[0].split()[:3] == ["NAME", "STEP", "SIZE"]
        assert listing.splitlines()[1].split()[:2] == ["first", "3"]
        assert "wrote" in run("export", "s-step", "first", str(exported), "--quiet")
        assert "imported stepper copy at step 3" in run(
            "import", str(exported), "--name", "copy", "--quiet"
        )
        assert "restored s-step to snapshot first: step 3" in run("restore", "s-step", "first")
        assert "wrote s-n at step 3" in run("checkpoint", "s-n")
        assert "durability manual" in run("durability", "s-time", "manual")
        assert "deleted snapshot first of s-step" in run("rm-snapshot", "s-step", "first")
        assert cli.main(["rm-snapshot", "s-step", "first", "--url", url]) == 1
        assert "snapshot_not_found" in capsys.readouterr().err
        before = {
            s.name: (c.get_params(s.name), c.get_state(s.name), s.step, s.durability)
            for s in c.list()
        }

    with spawn_server(data, "--device", "cpu") as url, Client(url) as c:
        assert c.health()["persistence"] == {"restored": 5, "failed": [], "failed_count": 0}
        after = {
            s.name: (c.get_params(s.name), c.get_state(s.name), s.step, s.durability)
            for s in c.list()
        }
        assert set(after) == set(before) == {*policies, "s-default", "copy"}
        for name, (params, state, step, durability) in before.items():
            a_params, a_state, a_step, a_durability = after[name]
            assert (a_step, a_durability) == (step, durability), name
            for n, t in params.items():
                assert torch.equal(a_params[n], t), (name, n)
            for n, entries in state.items():
                for k, t in entries.items():
                    assert torch.equal(a_state[n][k], t), (name, n, k)
        # The imported copy and the rolled-back original are the same step-3 state.
        for n in SHAPES:
            assert torch.equal(after["copy"][0][n], after["s-step"][0][n])
