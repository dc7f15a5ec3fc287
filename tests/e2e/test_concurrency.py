"""The concurrency bar: 8 writers and 4 readers against a real uvicorn, with threads and with
asyncio tasks. Every read is one consistent snapshot, and the final state is the serial one.

Six steppers are each stepped by one writer with gradients that depend on the step number
(the writer is alone, so it knows it); a seventh is shared by two writers that send the same
gradient every time, so its trajectory does not depend on how their steps interleave. Two
steppers exceed the service's inline-step size, so their steps run in the thread pool while
the event loop keeps serving reads.

Every local ``torch.optim`` trajectory is computed before the run. A read asks for the state
*with the parameters* (``GET .../state?with_params=true``: both copied under one engine lock)
and must equal, bit for bit and in every tensor, the trajectory at the step the response
reports; a read that mixed two steps cannot. Writers check what their steps return the same
way, the shared stepper's step numbers are each handed out exactly once, and at the end every
stepper equals its serial trajectory at its last step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import torch
from conftest import LiveServer

from adamscope.client import AsyncClient, Client, codec
from adamscope.client.errors import StepperNotFoundError
from adamscope.client.protocol import META_STEP
from adamscope.service.api.serving import INLINE_NUMEL

pytestmark = pytest.mark.e2e

Snapshot = dict[str, dict[str, torch.Tensor]]  # param -> {"param", "step", "exp_avg", ...}

#: Hard bounds: no loop here runs longer or more often than this.
DEADLINE_S = 120.0
MAX_READS_PER_READER = 5000
#: Each reader reads at least this often, so the checks run even on a very fast machine.
MIN_READS_PER_READER = 20


@dataclass(frozen=True)
class Spec:
    """A stepper of the run: its parameters, options, writers and durability policy."""

    key: str
    shapes: dict[str, tuple[int, ...]]
    optimizer: str = "adam"
    dtype: torch.dtype = torch.float32
    hyper: dict[str, Any] = field(default_factory=dict)
    groups: list[dict[str, Any]] | None = None
    steps_per_writer: int = 12
    writers: int = 1
    durability: str = "manual"

    @property
    def total_steps(self) -> int:
        return self.steps_per_writer * self.writers

    @property
    def numel(self) -> int:
        return sum(torch.Size(s).numel() for s in self.shapes.values())


BIG = (300, 256)  # 76,800 elements: above INLINE_NUMEL, so stepped in the thread pool

SPECS = [
    Spec("plain", {"w": (4, 5), "b": (5,)}, hyper={"lr": 1e-2}),
    Spec(
        "amsgrad",
        {"w": (6,), "v": (2, 3)},
        hyper={"lr": 3e-2, "amsgrad": True},
        durability="every_step",
    ),
    Spec(
        "groups",
        {"w": (3, 4), "b": (4,), "h": (7,)},
        optimizer="adamw",
        hyper={"lr": 1e-2, "weight_decay": 0.1},
        groups=[{"params": ["w", "b"]}, {"params": ["h"], "lr": 5e-2, "amsgrad": True}],
    ),
    Spec(
        "foreach64",
        {"w": (5, 5)},
        dtype=torch.float64,
        hyper={"lr": 2e-2, "foreach": True, "maximize": True},
    ),
    Spec("big", {"w": BIG, "b": (256,)}, hyper={"lr": 1e-3}, durability="every_step"),
    Spec("wd", {"w": (8,)}, hyper={"lr": 1e-2, "weight_decay": 0.05, "betas": (0.8, 0.95)}),
    Spec(
        "shared",
        {"w": BIG, "b": (256,)},
        hyper={"lr": 1e-3, "amsgrad": True},
        writers=2,
        steps_per_writer=10,
    ),
]
assert sum(s.writers for s in SPECS) == 8
assert sum(s.numel > INLINE_NUMEL for s in SPECS) == 2


def _seed(*parts: object) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


def initial_values(spec: Spec) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(_seed(spec.key, "init"))
    return {
        n: torch.randn(s, generator=g, dtype=torch.float64).to(spec.dtype)
        for n, s in spec.shapes.items()
    }


def gradients(spec: Spec, t: int) -> dict[str, torch.Tensor]:
    """The gradients of step ``t``; the same for every step on a shared stepper (its writers
    cannot know which step number the service will give them)."""
    g = torch.Generator().manual_seed(_seed(spec.key, "grad", t if spec.writers == 1 else 0))
    return {
        n: torch.randn(s, generator=g, dtype=torch.float64).to(spec.dtype)
        for n, s in spec.shapes.items()
    }


def trajectory(spec: Spec) -> list[Snapshot]:
    """Parameters and state after each step 0..total_steps, from a local torch optimizer."""
    leaves = {n: t.clone().requires_grad_(True) for n, t in initial_values(spec).items()}
    cls = torch.optim.AdamW if spec.optimizer == "adamw" else torch.optim.Adam
    groups = spec.groups or [{"params": list(spec.shapes)}]
    optimizer = cls(
        [{**g, "params": [leaves[n] for n in g["params"]]} for g in groups], **spec.hyper
    )

    def snapshot() -> Snapshot:
        return {
            n: {
                "param": p.detach().clone(),
                **{k: v.clone() for k, v in optimizer.state.get(p, {}).items()},
            }
            for n, p in leaves.items()
        }

    out = [snapshot()]
    for t in range(1, spec.total_steps + 1):
        for n, g in gradients(spec, t).items():
            leaves[n].grad = g
        optimizer.step()
        out.append(snapshot())
    return out


@dataclass
class Run:
    """The steppers of one run (names unique on the shared server) and their trajectories."""

    prefix: str
    trajectories: dict[str, list[Snapshot]]
    specs: dict[str, Spec]

    @classmethod
    def new(cls, label: str) -> Run:
        prefix = f"conc-{label}-{uuid.uuid4().hex[:8]}"
        specs = {f"{prefix}-{s.key}": s for s in SPECS}
        return cls(prefix, {n: trajectory(s) for n, s in specs.items()}, specs)

    def create_all(self, client: Client) -> None:
        for name, spec in self.specs.items():
            client.create(
                name,
                initial_values(spec),
                optimizer=spec.optimizer,
                groups=spec.groups,
                durability=spec.durability,
                **spec.hyper,
            )

    def writer_jobs(self) -> list[tuple[str, Spec]]:
        return [(name, spec) for name, spec in self.specs.items() for _ in range(spec.writers)]

    def check(self, name: str, t: int, got: Snapshot, what: str) -> None:
        """``got`` equals the trajectory of ``name`` at step ``t`` in every tensor."""
        expected = self.trajectories[name]
        assert 0 <= t < len(expected), f"{what}: {name} reported step {t}"
        want = expected[t]
        assert set(got) == set(want), f"{what}: {name}@{t} parameters {sorted(got)}"
        for pname, tensors in want.items():
            assert set(got[pname]) == set(tensors), (
                f"{what}: {name}@{t} {pname} keys {sorted(got[pname])} != {sorted(tensors)}"
            )
            for key, value in tensors.items():
                g = got[pname][key]
                assert g.dtype == value.dtype and torch.equal(g, value), (
                    f"{what}: {name}@{t} {pname}.{key} is not the trajectory's step {t}"
                )

    def check_params(
        self, name: str, t: int, params: Mapping[str, torch.Tensor], what: str
    ) -> None:
        want = self.trajectories[name][t]
        for pname, value in params.items():
            assert torch.equal(value, want[pname]["param"]), (
                f"{what}: {name}@{t} returned {pname} is not the trajectory's step {t}"
            )


def nest(flat: Mapping[str, torch.Tensor]) -> Snapshot:
    out: Snapshot = {}
    for key, t in flat.items():
        pname, _, which = key.rpartition(".")
        out.setdefault(pname, {})[which] = t
    return out


def state_step(snap: Snapshot) -> int:
    """The step a client-side read belongs to, from its state (0: no state yet)."""
    steps = {float(s["step"]) for s in snap.values() if "step" in s}
    assert len(steps) <= 1, f"parameters of one read are at different steps: {steps}"
    return int(steps.pop()) if steps else 0


def decode_raw(response: httpx.Response) -> tuple[int, Snapshot]:
    """A raw ``?with_params=true`` response: the step its metadata and header report."""
    assert response.status_code == 200, response.text
    tensors, meta = codec.decode(response.content)
    t = int(meta[META_STEP])
    assert response.headers["x-adamscope-step"] == str(t)
    return t, nest(tensors)


def check_writer_reply(
    run: Run, name: str, spec: Spec, reply: Any, t_expected: int | None, what: str
) -> int:
    if t_expected is not None:
        assert reply.step == t_expected, f"{what}: {name} step {reply.step} != {t_expected}"
    assert reply.stepped == list(spec.shapes) and reply.skipped == []
    if reply.params is not None:
        run.check_params(name, reply.step, reply.params, what)
    return int(reply.step)


def check_final(run: Run, client: Client, shared_steps: dict[str, list[int]]) -> None:
    """Final state is the serial result; the shared stepper's steps went out once each."""
    for name, spec in run.specs.items():
        total = spec.total_steps
        run.check(name, total, client.get_state(name, with_params=True), "final state")
        run.check_params(name, total, client.get_params(name), "final params")
        assert client.get(name).step == total
        if spec.writers > 1:
            assert sorted(shared_steps[name]) == list(range(1, total + 1))


@contextlib.contextmanager
def cleanup(run: Run, url: str) -> Iterator[None]:
    try:
        yield
    finally:
        with Client(url) as c:
            for name in run.specs:
                with contextlib.suppress(StepperNotFoundError):
                    c.delete(name)


# ------------------------------------------------------------------------ with_params


def test_state_with_params_is_one_snapshot_in_both_formats(live_server: LiveServer) -> None:
    """``with_params`` adds '<param>.param' (JSON: 'param'), honours ``name``, and without it
    the state is as before: the flag the concurrency checks rely on, on its own."""
    spec = SPECS[2]  # two groups, amsgrad in one
    run = Run.new("flag")
    name = f"{run.prefix}-{spec.key}"
    with cleanup(run, live_server.url), Client(live_server.url) as c:
        c.create(
            name,
            initial_values(spec),
            optimizer=spec.optimizer,
            groups=spec.groups,
            durability="manual",
            **spec.hyper,
        )
        run.check(name, 0, c.get_state(name, with_params=True), "before any step")
        assert c.get_state(name) == {}
        for t in (1, 2):
            c.step(name, gradients(spec, t))
        run.check(name, 2, c.get_state(name, with_params=True), "client")
        assert all("param" not in s for s in c.get_state(name).values())

        url = f"{live_server.url}/v1/steppers/{name}/state"
        t, snap = decode_raw(httpx.get(url, params={"with_params": "true"}))
        assert t == 2
        run.check(name, 2, snap, "raw safetensors")
        only_h = httpx.get(url, params={"with_params": "true", "name": "h", "key": "step"})
        _, snap = decode_raw(only_h)
        assert set(snap) == {"h"} and set(snap["h"]) == {"param", "step"}

        body = httpx.get(url, params={"with_params": "true", "format": "json"}).json()
        assert body["step"] == 2
        want = run.trajectories[name][2]
        for pname, tensors in want.items():
            assert set(body["state"][pname]) == set(tensors)
            wire = body["state"][pname]["param"]
            assert wire["dtype"] == "float32" and wire["shape"] == list(spec.shapes[pname])
            got = codec.tensor_from_json(wire["data"], spec.dtype, wire["shape"])
            assert torch.equal(got, tensors["param"])


# ------------------------------------------------------------------------ threads


class Failures:
    """Exceptions raised in worker threads, re-raised in the test thread."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()

    def wrap(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported by raise_first
                with self.lock:
                    self.errors.append(e)

        return run

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]


def test_threads_eight_writers_four_readers(live_server: LiveServer) -> None:
    run = Run.new("thr")
    url = live_server.url
    failures = Failures()
    writers_done = threading.Event()
    shared_steps: dict[str, list[int]] = {n: [] for n, s in run.specs.items() if s.writers > 1}
    names = list(run.specs)
    reads = [0, 0, 0, 0]
    start = threading.Barrier(len(run.writer_jobs()) + len(reads))
    deadline = time.monotonic() + DEADLINE_S

    def writer(name: str, spec: Spec, index: int) -> Callable[[], None]:
        def go() -> None:
            with Client(url) as c:
                start.wait(timeout=30)
                for k in range(1, spec.steps_per_writer + 1):
                    assert time.monotonic() < deadline, "writer ran past the deadline"
                    t = k if spec.writers == 1 else None
                    reply = c.step(
                        name, gradients(spec, k if t else 0), return_params=(k + index) % 2 == 0
                    )
                    got = check_writer_reply(run, name, spec, reply, t, f"writer {index}")
                    if spec.writers > 1:
                        with failures.lock:
                            shared_steps[name].append(got)

        return go

    def reader(index: int) -> Callable[[], None]:
        def go() -> None:
            raw = index % 2 == 0  # half read raw responses (metadata step), half via Client
            with Client(url) as c, httpx.Client(base_url=url) as h:
                start.wait(timeout=30)
                while (not writers_done.is_set() or reads[index] < MIN_READS_PER_READER) and reads[
                    index
                ] < MAX_READS_PER_READER:
                    assert time.monotonic() < deadline, "reader ran past the deadline"
                    name = names[(reads[index] * 3 + index) % len(names)]
                    if raw:
                        t, snap = decode_raw(
                            h.get(f"/v1/steppers/{name}/state", params={"with_params": "true"})
                        )
                    else:
                        snap = c.get_state(name, with_params=True)
                        t = state_step(snap)
                    run.check(name, t, snap, f"reader {index}")
                    reads[index] += 1

        return go

    with cleanup(run, url):
        with Client(url) as c:
            run.create_all(c)
        writers = [
            threading.Thread(target=failures.wrap(writer(n, s, i)), daemon=True)
            for i, (n, s) in enumerate(run.writer_jobs())
        ]
        readers = [
            threading.Thread(target=failures.wrap(reader(i)), daemon=True)
            for i in range(len(reads))
        ]
        for th in writers + readers:
            th.start()
        for th in writers:
            th.join(timeout=DEADLINE_S)
        writers_done.set()
        for th in readers:
            th.join(timeout=DEADLINE_S)
        assert not any(th.is_alive() for th in writers + readers), "a thread did not finish"
        failures.raise_first()
        assert all(n >= MIN_READS_PER_READER for n in reads), reads
        with Client(url) as c:
            check_final(run, c, shared_steps)


# ------------------------------------------------------------------------ asyncio


async def _async_run(run: Run, url: str) -> tuple[list[int], dict[str, list[int]]]:
    writers_done = asyncio.Event()
    shared_steps: dict[str, list[int]] = {n: [] for n, s in run.specs.items() if s.writers > 1}
    names = list(run.specs)
    reads = [0, 0, 0, 0]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S

    async def writer(c: AsyncClient, name: str, spec: Spec, index: int) -> None:
        for k in range(1, spec.steps_per_writer + 1):
            assert loop.time() < deadline, "writer ran past the deadline"
            t = k if spec.writers == 1 else None
            reply = await c.step(
                name, gradients(spec, k if t else 0), return_params=(k + index) % 2 == 1
            )
            got = check_writer_reply(run, name, spec, reply, t, f"async writer {index}")
            if spec.writers > 1:
                shared_steps[name].append(got)

    async def reader(c: AsyncClient, h: httpx.AsyncClient, index: int) -> None:
        raw = index % 2 == 1
        while (not writers_done.is_set() or reads[index] < MIN_READS_PER_READER) and reads[
            index
        ] < MAX_READS_PER_READER:
            assert loop.time() < deadline, "reader ran past the deadline"
            name = names[(reads[index] * 5 + index) % len(names)]
            if raw:
                t, snap = decode_raw(
                    await h.get(f"/v1/steppers/{name}/state", params={"with_params": "true"})
                )
            else:
                snap = await c.get_state(name, with_params=True)
                t = state_step(snap)
            run.check(name, t, snap, f"async reader {index}")
            reads[index] += 1

    async with AsyncClient(url) as c, httpx.AsyncClient(base_url=url) as h:

        async def all_writers() -> None:
            try:
                await asyncio.gather(
                    *(writer(c, n, s, i) for i, (n, s) in enumerate(run.writer_jobs()))
                )
            finally:
                writers_done.set()

        await asyncio.wait_for(
            asyncio.gather(all_writers(), *(reader(c, h, i) for i in range(len(reads)))),
            DEADLINE_S,
        )
    return reads, shared_steps


def test_asyncio_eight_writers_four_readers(live_server: LiveServer) -> None:
    run = Run.new("aio")
    with cleanup(run, live_server.url):
        with Client(live_server.url) as c:
            run.create_all(c)
        reads, shared_steps = asyncio.run(_async_run(run, live_server.url))
        assert all(n >= MIN_READS_PER_READER for n in reads), reads
        with Client(live_server.url) as c:
            check_final(run, c, shared_steps)
