"""A watched run costs the service its metadata only, and its create is admitted like a
hosted one: the real app in process, reports posted as ``adamscope.watch`` posts them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from api_support import assert_problem
from fastapi.testclient import TestClient

from adamscope.service.app import create_app
from adamscope.service.settings import Settings

W = "/v1/watch"
S = "/v1/steppers"
BIG = 50_000_000


def report(shapes: list[list[int]], step: int = 0, dtype: str = "float32") -> dict[str, Any]:
    names = [f"p{i}" for i in range(len(shapes))]
    return {
        "optimizer": "adamw",
        "step": step,
        "params": [
            {"name": n, "shape": s, "dtype": dtype} for n, s in zip(names, shapes, strict=True)
        ],
        "groups": [
            {"params": names, "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
        ],
        "signals": None,
        "scalars": [{"step": step, "name": "loss", "value": 0.5}] if step else [],
    }


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _reports(c: TestClient, name: str, shapes: list[list[int]]) -> None:
    for step in range(3):
        r = c.post(f"{W}/{name}/report", json=report(shapes, step))
        assert r.status_code == 200, r.text
        assert c.get(f"{S}/{name}").status_code == 200
        assert c.get(f"{S}/{name}/history").status_code == 200


def test_a_large_watched_run_costs_the_service_no_tensor_memory(app_client: TestClient) -> None:
    # Warm every code path on a small run first, so that what grows is the large run's.
    _reports(app_client, "small", [[3], [4]])
    before = rss()
    _reports(app_client, "large", [[BIG], [BIG]])
    grown = rss() - before
    # Two float32 tensors of 50M elements are 400 MB; a zero-filled mirror took twice that.
    assert grown < 40 * 2**20, f"the service grew by {grown} bytes"
    s = app_client.get(f"{S}/large").json()
    assert s["kind"] == "watched" and s["step"] == 2 and s["numel"] == 2 * BIG
    assert [(p["name"], p["shape"], p["dtype"]) for p in s["params"]] == [
        ("p0", [BIG], "float32"),
        ("p1", [BIG], "float32"),
    ]
    assert s["state_bytes"] == 0 and s["footprint"]["total"] == 0
    assert s["groups"][0]["lr"] == 1e-3


def test_every_read_route_answers_for_a_large_watched_run(app_client: TestClient) -> None:
    c = app_client
    _reports(c, "large", [[BIG], [BIG]])
    listed = {s["name"]: s for s in c.get(S).json()["steppers"]}
    assert listed["large"]["kind"] == "watched"
    bc = c.get(f"{S}/large/bias-correction").json()
    assert bc["step"] == 2 and bc["groups"][0]["bias_correction1"] == 1 - 0.9**2
    assert c.get(f"{S}/large/signals").json()["step"] == 2
    history = c.get(f"{S}/large/history").json()
    assert history["loss"]["values"] == [0.5, 0.5]
    assert c.get(f"{S}/large/alerts").status_code == 200
    h = c.get(f"{S}/large/histograms", params={"tensor": "p0"})
    assert h.status_code == 200 and h.json()["steps"] == []
    metrics = c.get("/metrics").text
    assert 'stepper="large"' in metrics
    assert c.get(f"{W}/large/snapshots").json() == {"snapshots": []}
    for route, query in (
        ("stats", None),
        ("slice", {"name": "p0"}),
        ("params", None),
        ("state", None),
    ):
        assert_problem(c.get(f"{S}/large/{route}", params=query), "stepper_watched")
    assert_problem(c.get("/v1/diff", params={"a": "large", "b": "large"}), "stepper_watched")


def test_a_watched_run_counts_towards_the_stepper_limit_but_not_the_memory_budget(
    tmp_path: Path,
) -> None:
    settings = Settings(
        data_dir=tmp_path / "d", device="cpu", max_steppers=2, memory_budget_bytes=10_000
    )
    with TestClient(create_app(settings)) as c:
        r = c.post(f"{W}/big/report", json=report([[BIG], [BIG]]))
        assert r.status_code == 200, r.text
        hosted = {"name": "h", "optimizer": "adam", "params": [{"name": "w", "shape": [8]}]}
        assert c.post(S, json=hosted).status_code == 201
        assert_problem(c.post(f"{W}/third/report", json=report([[4]])), "stepper_limit")
        assert c.get(f"{S}/third").status_code == 404


def test_a_watched_create_is_refused_where_a_hosted_one_would_be(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", device="cpu", max_tensor_elements=1000)
    with TestClient(create_app(settings)) as c:
        assert_problem(
            c.post(f"{W}/big/report", json=report([[10], [1001]])), "tensor_too_large", "'p1'"
        )
        assert_problem(c.post(f"{W}/neg/report", json=report([[-3]])), "invalid_spec", "[-3]")
        assert_problem(
            c.post(f"{W}/.hidden/report", json=report([[3]])), "request_validation_error"
        )
        assert_problem(
            c.post(f"{W}/{'x' * 129}/report", json=report([[3]])), "request_validation_error"
        )
        body = report([[3]])
        body["groups"][0]["params"] = ["p0", "nope"]
        assert_problem(c.post(f"{W}/groups/report", json=body), "unknown_parameter", "'nope'")
        assert c.get(S).json()["steppers"] == []


def test_deleting_a_watched_run_unregisters_it(app_client: TestClient) -> None:
    _reports(app_client, "gone", [[3]])
    assert app_client.delete(f"{S}/gone").status_code == 204
    assert_problem(app_client.get(f"{S}/gone"), "stepper_not_found")
