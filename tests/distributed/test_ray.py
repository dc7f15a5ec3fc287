"""The distributed mode: ``adamscope serve --ray`` on a local Ray, through its real ingress.

One module-scoped service (Ray Serve ingress, two slot actors, every-step durability) is
spawned as the CLI runs it. The parity cases are tests/client's, run against it for
steppers on one slot and for steppers sharded over both; the reliability tests refuse bad
requests to a sharded stepper (every shard stays byte-identical), replay a step by its
key, and kill slot actors during training (the next steps succeed after recovery, the
result equals an uninterrupted run, and the stream and summaries say what happened).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

# The parity helpers of tests/client and the browser helpers of tests/browser.
for _helpers in ("client", "browser"):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / _helpers))

from conftest import spawn_server  # noqa: E402
from remote_support import (  # noqa: E402
    SHAPES,
    Case,
    cases,
    make_params,
    option_rows,
    plain_and_all_on,
    run_parity,
    twin,
    unique,
)

from adamscope.client import Client, RemoteAdam, codec  # noqa: E402
from adamscope.client.protocol import META_SPEC  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.timeout(900)]

F32 = [(torch.float32,)]
UNSHARDED = (
    cases(["forloop", "foreach", "fused"], F32, option_rows)
    + cases(["forloop"], [(torch.float64,), (torch.bfloat16,)], plain_and_all_on)
    + cases(
        ["foreach"],
        [(torch.complex64, torch.float32, torch.complex64, torch.complex64)],
        plain_and_all_on,
    )
)
SHARDED = cases(["forloop", "foreach", "fused"], F32, option_rows)


@pytest.fixture(scope="module")
def ray_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("ray")
    with spawn_server(data, "--ray", "--slots", "2", timeout=300, stop_timeout=120) as url:
        yield url


@pytest.fixture(scope="module")
def client(ray_url: str) -> Iterator[Client]:
    with Client(ray_url, timeout=300) as c:
        yield c


def slots(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{url}/healthz", timeout=60).json()["slots"])


def test_the_service_runs_on_two_slot_actors(ray_url: str) -> None:
    health = httpx.get(f"{ray_url}/healthz", timeout=60).json()
    assert health["mode"] == "ray"
    assert [s["slot"] for s in health["slots"]] == [0, 1]
    assert all(s["state"] == "ok" for s in health["slots"])
    assert len({s["pid"] for s in health["slots"]}) == 2
    assert all(s["pid"] != os.getpid() for s in health["slots"])
    # What no slot holds is answered by a slot's service: the dashboard, the API document.
    assert httpx.get(f"{ray_url}/dashboard", timeout=60).status_code == 200
    assert (
        "/v1/steppers/{name}/step"
        in httpx.get(f"{ray_url}/openapi.json", timeout=60).json()["paths"]
    )


@pytest.mark.parametrize("case", UNSHARDED, ids=lambda c: c.id)
def test_parity_on_one_slot(case: Case, client: Client) -> None:
    run_parity(case, client, steps=30)


@pytest.mark.parametrize("case", SHARDED, ids=lambda c: c.id)
def test_parity_sharded_over_two_slots(case: Case, client: Client) -> None:
    run_parity(case, client, steps=30, shards=2)


def sharded(client: Client, name: str, **options: Any) -> tuple[list[torch.Tensor], Any]:
    params = make_params(SHAPES, torch.float32, seed=3)
    remote_params = twin(params)
    opt = RemoteAdam(
        list(zip([f"p{i}" for i in range(len(SHAPES))], remote_params, strict=True)),
        lr=1e-2,
        client=client,
        name=name,
        shards=2,
        **options,
    )
    return remote_params, opt


def test_a_sharded_stepper_shows_its_shards_and_aggregates(client: Client) -> None:
    name = unique("shown")
    params, opt = sharded(client, name, amsgrad=True)
    try:
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        summary = client.get(name)
        placement = summary.placement
        assert placement is not None and placement["sharded"] is True
        shards = placement["shards"]
        assert sorted(s["slot"] for s in shards) == [0, 1]
        held = [n for s in shards for n in s["params"]]
        assert sorted(held) == [f"p{i}" for i in range(len(SHAPES))]
        assert {s["pid"] for s in shards} == {s["pid"] for s in slots(client.url)}
        # One stepper, its tensors and sizes added up across the shards.
        assert [p.name for p in summary.params] == [f"p{i}" for i in range(len(SHAPES))]
        assert summary.numel == sum(p.numel() for p in params) and summary.step == 1
        assert [s.name for s in client.list()].count(name) == 1
        values = client.get_params(name)
        assert all(torch.equal(values[f"p{i}"], p.detach()) for i, p in enumerate(params))
        # Whole-stepper statistics merge exactly where they can (counts, norm, mean, std,
        # extremes of all tensors together) ...
        stats = httpx.get(
            f"{client.url}/v1/steppers/{name}/stats", params={"key": "param"}, timeout=60
        ).json()
        assert sorted(stats["tensors"]) == [f"p{i}" for i in range(len(SHAPES))]
        every = torch.cat([p.detach().reshape(-1).double() for p in params])
        agg = stats["aggregate"]["param"]
        assert agg["numel"] == every.numel() and agg["shards"] == 2
        assert agg["mean"] == pytest.approx(float(every.mean()), rel=1e-6)
        assert agg["std"] == pytest.approx(float(every.std(unbiased=False)), rel=1e-6)
        assert agg["norm"] == pytest.approx(float(every.norm()), rel=1e-6)
        assert (agg["min"], agg["max"]) == (float(every.min()), float(every.max()))
        # ... as do the last step's signals (every tensor here is taken whole: exact) ...
        sig = httpx.get(f"{client.url}/v1/steppers/{name}/signals", timeout=60).json()
        assert sig["step"] == 1 and sorted(sig["tensors"]) == sorted(held)
        grad_norm = float(torch.cat([torch.ones(s).reshape(-1) for s in SHAPES]).norm())
        assert sig["aggregate"]["grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
        # ... and a route about one tensor goes to its shard; what does not merge says so.
        one = httpx.get(
            f"{client.url}/v1/steppers/{name}/slice",
            params={"name": "p0", "key": "param", "index": "0"},
            timeout=60,
        )
        assert one.status_code == 200, one.text
        r = httpx.post(
            f"{client.url}/v1/steppers/{name}/dry-run",
            content=b"",
            headers={"content-type": "application/octet-stream"},
            timeout=60,
        )
        assert r.status_code == 501
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "not_supported_sharded"
    finally:
        client.delete(name)
    assert name not in [s.name for s in client.list()]


#: Every read that picks a sharded stepper's tensors by name, with the query naming them
#: (the API's ``name``, the history's ``tensor``) and what else it needs.
NAME_FILTERED_READS: dict[str, tuple[str, dict[str, str]]] = {
    "/v1/steppers/{name}/params": ("name", {}),
    "/v1/steppers/{name}/state": ("name", {}),
    "/v1/steppers/{name}/stats": ("name", {"key": "exp_avg_sq"}),
    "/v1/steppers/{name}/slice": ("name", {"key": "exp_avg", "index": "0"}),
    "/v1/steppers/{name}/history": ("tensor", {"signal": "grad_norm"}),
    "/v1/steppers/{name}/histograms": ("tensor", {"key": "exp_avg"}),
}
#: Reads of one tensor each.
ONE_TENSOR = ("/slice", "/histograms")


def documented_name_filters() -> set[str]:
    """The GET routes about one hosted stepper whose OpenAPI query names tensors (a
    watched run's, under /v1/watch, is never sharded: those answer 501 under Ray)."""
    from adamscope.service.app import create_app
    from adamscope.service.settings import Settings

    paths = create_app(Settings.model_construct()).openapi()["paths"]
    return {
        path
        for path, ops in paths.items()
        if "get" in ops
        and path.startswith("/v1/steppers/{name}")
        and any(
            p["in"] == "query" and p["name"] in ("name", "tensor")
            for p in ops["get"].get("parameters", [])
        )
    }


def read(
    url: str, route: str, stepper: str, names: list[str], accept: str = "json"
) -> httpx.Response:
    by, extra = NAME_FILTERED_READS[route]
    query = [*extra.items(), *((by, n) for n in names)]
    if accept == "json" and route.endswith(("/params", "/state")):
        query.append(("format", "json"))
    return httpx.get(url + route.replace("{name}", stepper), params=query, timeout=60)


def comparable(route: str, r: httpx.Response) -> Any:
    """The parts of a reply that a sharded stepper and its one-slot twin share."""
    assert r.status_code == 200, (route, r.status_code, r.text)
    if r.headers["content-type"].startswith("application/octet-stream"):
        tensors, _ = codec.decode(r.content)
        return {k: (t.dtype, t.tolist()) for k, t in tensors.items()}
    body = r.json()
    body.pop("stepper", None)
    if route.endswith("/stats"):
        return body["tensors"]  # per tensor; the aggregate merges (see above)
    if route.endswith("/history"):
        return {n: t["values"] for n, t in body["tensors"].items()}
    return body


def test_every_name_filtered_read_works_on_a_sharded_stepper(client: Client) -> None:
    """The API filters by ``name=`` (and the history by ``tensor=``): every such read of a
    sharded stepper answers what the same stepper on one slot answers, for one tensor of
    each shard and for tensors of both at once. (The ingress once filtered by ``names=``:
    every shard got the filter, and the shards without the tensor refused it.)"""
    assert documented_name_filters() == set(NAME_FILTERED_READS)
    name, single = unique("filtered"), unique("filtered")
    params, opt = sharded(client, name)
    client.create(single, {f"p{i}": p.detach() for i, p in enumerate(params)}, lr=1e-2)
    try:
        for k in range(3):
            grads = {f"p{i}": torch.full(s, 0.25 * (k + 1)) for i, s in enumerate(SHAPES)}
            for i, p in enumerate(params):
                p.grad = grads[f"p{i}"].clone()
            opt.step()
            client.step(single, grads)
        shards = client.get(name).placement["shards"]  # type: ignore[index]
        firsts = [s["params"][0] for s in shards]
        assert len(firsts) == 2
        for route in NAME_FILTERED_READS:
            picks = [[firsts[0]], [firsts[1]]]
            if not route.endswith(ONE_TENSOR):  # a slice, histograms: of one tensor
                picks.append(firsts)
            for names in picks:
                for accept in ("json", "safetensors"):
                    if accept == "safetensors" and not route.endswith(("/params", "/state")):
                        continue
                    got = read(client.url, route, name, names, accept)
                    want = read(client.url, route, single, names, accept)
                    assert comparable(route, got) == comparable(route, want), (route, names)
            unknown = read(client.url, route, name, ["nope"])
            assert unknown.status_code == 422 and unknown.json()["code"] == "unknown_parameter"
    finally:
        client.delete(name)
        client.delete(single)


def state_bytes(url: str, name: str) -> tuple[bytes, int]:
    r = httpx.get(f"{url}/v1/steppers/{name}/state", params={"with_params": "true"}, timeout=60)
    r.raise_for_status()
    summary = httpx.get(f"{url}/v1/steppers/{name}", timeout=60).json()
    return r.content, int(summary["step"])


def step_body(grads: dict[str, torch.Tensor]) -> bytes:
    return codec.encode(grads)


def test_rejected_steps_leave_every_shard_byte_identical(client: Client) -> None:
    name = unique("refused")
    params, opt = sharded(client, name)
    try:
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        before = state_bytes(client.url, name)
        good = {f"p{i}": torch.ones(s) for i, s in enumerate(SHAPES)}
        url = f"{client.url}/v1/steppers/{name}/step"
        octet = {"content-type": "application/octet-stream"}
        bad: list[tuple[str, bytes, dict[str, str], dict[str, str], int]] = [
            ("unknown tensor", step_body({**good, "nope": torch.ones(2)}), octet, {}, 422),
            ("wrong shape", step_body({**good, "p0": torch.ones(7)}), octet, {}, 422),
            (
                "wrong dtype",
                step_body({**good, "p1": torch.ones(SHAPES[1], dtype=torch.float64)}),
                octet,
                {},
                422,
            ),
            ("stale expected_step", step_body(good), octet, {"expected_step": "1"}, 409),
            ("not safetensors", b"\x05\x00\x00\x00\x00\x00\x00\x00{}", octet, {}, 400),
            ("JSON body", b'{"grads": {}}', {"content-type": "application/json"}, {}, 415),
            ("accumulate mode", step_body(good), octet, {"contributors": "2", "worker": "0"}, 501),
        ]
        for what, body, headers, query, status in bad:
            r = httpx.post(url, content=body, headers=headers, params=query, timeout=60)
            assert r.status_code == status, (what, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json"), what
            assert r.json()["detail"], what
            assert state_bytes(client.url, name) == before, what
    finally:
        client.delete(name)


def test_a_sharded_step_is_applied_once_per_key(client: Client) -> None:
    name = unique("once")
    params, opt = sharded(client, name)
    try:
        grads = {f"p{i}": torch.full(s, 0.5) for i, s in enumerate(SHAPES)}
        headers = {"content-type": "application/octet-stream", "idempotency-key": "k-1"}
        url = f"{client.url}/v1/steppers/{name}/step"
        first = httpx.post(url, content=step_body(grads), headers=headers, timeout=60)
        assert first.status_code == 200 and first.json()["replayed"] is False
        after_first = state_bytes(client.url, name)
        again = httpx.post(url, content=step_body(grads), headers=headers, timeout=60)
        assert again.status_code == 200 and again.json()["replayed"] is True
        assert again.json()["step"] == first.json()["step"] == 1
        assert state_bytes(client.url, name) == after_first
    finally:
        client.delete(name)


class EventLog:
    """The ingress's /v1/events, read on a thread."""

    def __init__(self, url: str) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.response: httpx.Response | None = None
        self.thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self.thread.start()
        assert self.ready.wait(60)

    def _read(self, url: str) -> None:
        try:
            with httpx.stream("GET", f"{url}/v1/events", timeout=httpx.Timeout(5, read=None)) as r:
                self.response = r
                self.ready.set()
                kind = None
                for line in r.iter_lines():
                    if self.stop.is_set():
                        return
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind is not None:
                        self.events.append((kind, json.loads(line[6:])))
        except Exception:  # the service stopped under the stream, or close() closed it
            if not self.stop.is_set():
                raise

    def close(self) -> None:
        """End the stream now. Waiting for its next line to notice ``stop`` left it open
        until the module's service stopped when no line came (a slot's stream gone quiet),
        and Ray Serve's graceful shutdown then waited for it."""
        self.stop.set()
        if self.response is not None:
            with contextlib.suppress(Exception):
                self.response.close()
        self.thread.join(timeout=30)

    def wait_for(self, kind: str, stepper: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for k, e in self.events:
                if k == kind and e.get("stepper") == stepper:
                    return e
            time.sleep(0.1)
        raise AssertionError(f"no {kind} event for {stepper}: {self.events[-5:]}")


def test_killed_actors_are_replaced_and_training_matches_an_uninterrupted_run(
    client: Client,
) -> None:
    """SIGKILL the actor of a slot holding a shard of one stepper and all of another,
    between steps; then the actor of the other slot in the middle of a step."""
    split_name, whole_name = unique("split"), unique("whole")
    init = make_params([(64, 33), (40,), (17, 5), (9, 9)], torch.float32, seed=5)
    names = [f"w{i}" for i in range(len(init))]
    local = [twin(init), twin(init)]
    remote = [twin(init), twin(init)]
    opts = [
        torch.optim.Adam(local[0], lr=1e-2, amsgrad=True),
        torch.optim.AdamW(local[1], lr=1e-2, weight_decay=0.1),
    ]
    remote_opts = [
        RemoteAdam(
            list(zip(names, remote[0], strict=True)),
            lr=1e-2,
            amsgrad=True,
            client=client,
            name=split_name,
            shards=2,
        ),
        None,
    ]
    victim = client.get(split_name).placement["shards"][1]["slot"]  # type: ignore[index]
    # The unsharded stepper goes where placement puts it; it is moved by nothing, so look.
    from adamscope.client import RemoteAdamW

    remote_opts[1] = RemoteAdamW(
        list(zip(names, remote[1], strict=True)),
        lr=1e-2,
        weight_decay=0.1,
        client=client,
        name=whole_name,
    )
    whole_slot = client.get(whole_name).placement["shards"][0]["slot"]  # type: ignore[index]
    events = EventLog(client.url)
    gen = torch.Generator().manual_seed(7)
    try:
        for step in range(24):
            for a, b in zip(local, remote, strict=True):
                for pa, pb in zip(a, b, strict=True):
                    g = torch.randn(pa.shape, generator=gen)
                    pa.grad, pb.grad = g.clone(), g.clone()
            if step == 8:  # between steps: the slot holding shard 1 (and maybe `whole`)
                os.kill(int(slots(client.url)[victim]["pid"]), signal.SIGKILL)
            killer = None
            if step == 16:  # during a step: the other slot
                other = 1 - victim
                pid = int(slots(client.url)[other]["pid"])
                killer = threading.Timer(0.005, os.kill, (pid, signal.SIGKILL))
                killer.start()
            for o in opts:
                o.step()
            for o in remote_opts:
                o.step()  # type: ignore[union-attr]
            if killer is not None:
                killer.join()
            for a, b in zip(local, remote, strict=True):
                assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), step
        for o, ro in zip(opts, remote_opts, strict=True):
            expected, got = o.state_dict(), ro.state_dict()  # type: ignore[union-attr]
            for i, st in expected["state"].items():
                for k, v in st.items():
                    assert torch.equal(v, got["state"][i][k]), (i, k)
        recovered = events.wait_for("recovered", split_name)
        assert recovered["slot"] in (0, 1) and recovered["restored"] is True
        summary = client.get(split_name)
        assert summary.step == 24
        recoveries = summary.placement["recoveries"]  # type: ignore[index]
        assert {r["slot"] for r in recoveries} == {0, 1}
        assert all(r["from"]["pid"] != r["to"]["pid"] for r in recoveries)
        assert client.get(whole_name).placement["recoveries"]  # type: ignore[index]
        assert whole_slot in {r["slot"] for r in client.get(whole_name).placement["recoveries"]}  # type: ignore[index]
        health = slots(client.url)
        assert all(s["state"] == "ok" and s["generation"] >= 1 for s in health)
    finally:
        events.close()
        for n in (split_name, whole_name):
            client.delete(n)


def test_a_create_body_split_by_shard_keeps_every_tensor(tmp_path: Path) -> None:
    """The ingress's splitting in isolation: every tensor lands in exactly one shard body,
    byte for byte, with the spec narrowed to it."""
    from adamscope.service.distributed.creation import _shard_create_body
    from adamscope.service.distributed.shards import merge, parse

    tensors = {
        "a": torch.randn(3, 4),
        "b.weight": torch.arange(5.0),
        "c": torch.randn(2, dtype=torch.float64),
    }
    spec = {
        "name": "x",
        "optimizer": "adam",
        "params": [{"name": n} for n in tensors],
        "groups": [{"params": list(tensors), "lr": 0.1}],
    }
    body = codec.encode(tensors, {META_SPEC: json.dumps(spec)})
    parsed = parse(body)
    parts = [_shard_create_body(spec, parsed, names) for names in (["b.weight"], ["a", "c"])]
    decoded = [codec.decode(p) for p in parts]
    assert list(decoded[0][0]) == ["b.weight"] and list(decoded[1][0]) == ["a", "c"]
    for got, meta in decoded:
        sub = json.loads(meta[META_SPEC])
        assert [p["name"] for p in sub["params"]] == list(got)
        assert sub["groups"][0]["params"] == list(got) and sub["groups"][0]["lr"] == 0.1
        for n, t in got.items():
            assert torch.equal(t, tensors[n])
    joined, _ = codec.decode(merge([parse(p) for p in parts], list(tensors)))
    assert list(joined) == list(tensors)
    assert all(torch.equal(joined[n], tensors[n]) for n in tensors)


@pytest.mark.browser
def test_the_dashboard_shows_where_each_shard_lives(client: Client) -> None:
    """The real dashboard in the system Chromium, through the Ray ingress: a sharded
    stepper's row and detail say which slots hold it, and every panel loads (history,
    alerts, histogram and snapshots merged or routed across the shards) without an error
    in the console."""
    from browser_support import system_chromium, watched_page

    name = unique("dash")
    params, opt = sharded(client, name)
    gen = torch.Generator().manual_seed(11)
    try:
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        shards = client.get(name).placement["shards"]  # type: ignore[index]
        pids = sorted(s["pid"] for s in shards)
        with system_chromium() as browser, watched_page(browser, "ray-dashboard") as w:
            page = w.page
            page.goto(f"{client.url}/dashboard")
            row = page.locator(f'#steppers tr[data-id="{name}"]')
            row.wait_for()
            assert "2 shards" in row.inner_text()
            row.click()
            box = page.locator("#detail-placement")
            box.wait_for(state="visible")
            assert "sharded over 2 slots" in box.inner_text()
            items = box.locator("li")
            assert items.count() == 2
            shown = " ".join(items.all_inner_texts())
            assert all(f"pid {pid}" in shown for pid in pids)
            assert all(f"(node {s['node_id'][:8]})" in shown for s in shards)  # Ray's node
            # The panels filled from the merged reads: the aggregate chart has the 5 steps.
            page.wait_for_function(
                "() => { const v = window.adamscope.state.view; "
                "return v && v.summary && v.summary.step === 5; }"
            )
            page.wait_for_timeout(1500)  # the history, table and histogram requests
            assert w.unexpected() == [], w.unexpected()
            w.shot("ray-dashboard")
    finally:
        client.delete(name)


def test_sharded_history_combines_the_shards_aggregates(client: Client) -> None:
    name = unique("hist")
    params, opt = sharded(client, name)
    gen = torch.Generator().manual_seed(12)
    try:
        grads = []
        for _ in range(4):
            step_grads = [torch.randn(p.shape, generator=gen) for p in params]
            grads.append(step_grads)
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g
            opt.step()
        h = httpx.get(
            f"{client.url}/v1/steppers/{name}/history", params={"tensor": "*"}, timeout=60
        ).json()
        assert h["aggregate"]["steps"] == [1, 2, 3, 4]
        assert sorted(h["tensors"]) == [f"p{i}" for i in range(len(SHAPES))]
        # Every tensor here is small enough to be taken whole, so the aggregate gradient
        # norm is exact: the norm of all gradients of that step together.
        for k, step_grads in enumerate(grads):
            want = float(torch.cat([g.reshape(-1).double() for g in step_grads]).norm())
            assert h["aggregate"]["values"]["grad_norm"][k] == pytest.approx(want, rel=1e-6)
            per = [h["tensors"][f"p{i}"]["values"]["grad_norm"][k] for i in range(len(SHAPES))]
            assert sum(x * x for x in per) ** 0.5 == pytest.approx(want, rel=1e-6)
        alerts = httpx.get(f"{client.url}/v1/steppers/{name}/alerts", timeout=60)
        assert alerts.status_code == 200 and "rules" in alerts.json()
        snap = httpx.post(
            f"{client.url}/v1/steppers/{name}/snapshots", json={"name": "s1"}, timeout=60
        )
        assert snap.status_code == 201, snap.text
        listed = httpx.get(f"{client.url}/v1/steppers/{name}/snapshots", timeout=60).json()
        assert [s["name"] for s in listed["snapshots"]] == ["s1"]
        before = state_bytes(client.url, name)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        assert state_bytes(client.url, name) != before
        restored = httpx.post(f"{client.url}/v1/steppers/{name}/snapshots/s1/restore", timeout=60)
        assert restored.status_code == 200, restored.text
        assert state_bytes(client.url, name) == before
    finally:
        client.delete(name)


def test_metrics_and_errors_come_from_the_slots(client: Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    names = [unique("m"), unique("m")]
    made = []
    try:
        for n in names:
            made.append(client.create(n, {"w": torch.zeros(3)}, lr=0.1))
        assert {m.placement["shards"][0]["slot"] for m in made} == {0, 1}  # type: ignore[index]
        text = httpx.get(f"{client.url}/metrics", timeout=60).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        labelled = {s.labels.get("stepper") for f in families.values() for s in f.samples}
        assert set(names) <= labelled
        # A slot's own problem comes through unchanged; the ingress adds its own.
        r = httpx.get(f"{client.url}/v1/steppers/{unique('none')}", timeout=60)
        assert r.status_code == 404 and r.json()["code"] == "stepper_not_found"
        again = httpx.post(
            f"{client.url}/v1/steppers",
            json={"name": names[0], "optimizer": "adam", "params": [{"name": "w", "shape": [3]}]},
            timeout=60,
        )
        assert again.status_code == 409 and again.json()["code"] == "stepper_exists"
    finally:
        for n in names:
            client.delete(n)


def test_slots_off_loopback_need_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On a cluster the slots' services listen on their nodes' addresses: without tokens
    the CLI refuses, as it does for the single-process service, before starting anything."""
    from adamscope.service.cli import main

    code = main(["serve", "--ray", "--ray-address", "auto", "--data-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "slot services: refusing to serve on auto without access tokens" in err
    assert not (tmp_path / "hosts").exists()


def test_slots_ray_could_never_place_are_refused_at_start(tmp_path: Path) -> None:
    """Two slots of one GPU each on a cluster without (enough) GPUs: before, the second
    actor waited for a GPU forever and so did /healthz; now the CLI exits at once saying
    why, having deployed nothing."""
    import subprocess

    from conftest import ROOT

    from adamscope.service.testing import free_port

    gpus = torch.cuda.device_count()
    if gpus >= 2:
        pytest.skip("two GPUs here: two slots of one GPU each can be placed")
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "adamscope.service.cli",
            "serve",
            "--ray",
            "--slots",
            "2",
            "--slot-gpus",
            "1",
            "--port",
            str(free_port()),
            "--data-dir",
            str(tmp_path),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        f"2 slot(s) of 1 GPU each cannot be placed: the Ray cluster has {gpus} GPU(s)"
        in result.stderr
    )
    assert time.monotonic() - started < 240
    assert not (tmp_path / "hosts").exists()
