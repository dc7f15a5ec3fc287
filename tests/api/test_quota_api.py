"""Quotas: tensor elements per parameter (413 tensor_too_large), number of steppers
(507 stepper_limit) and the memory budget (507 memory_budget_exceeded); and stepper names
that try path tricks, which never create anything nor touch the filesystem.

A refused create registers nothing and leaves every existing stepper as it was.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from api_support import (
    OCTET,
    SPEC,
    V1,
    assert_problem,
    create,
    create_body,
    initial_values,
    registered,
    snapshot,
    step,
)
from conftest import run_uvicorn
from fastapi.testclient import TestClient

from adamscope.client import Client, codec
from adamscope.client.errors import (
    InsufficientStorageError,
    MemoryBudgetExceededError,
    PayloadTooLargeError,
    ServerError,
    StepperLimitError,
    TensorTooLargeError,
)
from adamscope.service.api.quota import STEP_BYTES, projected_bytes
from adamscope.service.app import create_app
from adamscope.service.settings import Settings

MAX_ELEMENTS = 100
MAX_STEPPERS = 3


def cpu_footprint(state: int, largest: int, param_bytes: int, copies: int = 2) -> int:
    """A CPU stepper's footprint total as service.engine.footprint defines it: parameters
    and state, the gradient buffer (the parameter bytes) and the for-loop step's workspace
    (``copies`` temporaries of the largest tensor: denom's two, a third for maximize or L2
    weight decay)."""
    return state + param_bytes + copies * largest


#: A 10-float32 Adam stepper: state 3 * 40 + 4, gradients 40, workspace 2 * 40.
ADAM10 = cpu_footprint(3 * 40 + STEP_BYTES, 40, 40)
#: A 10-float32 AMSGrad stepper: state 4 * 40 + 4, gradients 40, workspace 2 * 40.
AMS10 = cpu_footprint(4 * 40 + STEP_BYTES, 40, 40)
#: A 1-float32 Adam stepper.
TINY = cpu_footprint(3 * 4 + STEP_BYTES, 4, 4)
#: Room for exactly: a 10-float32 Adam stepper and a 10-float32 AMSGrad one.
BUDGET = ADAM10 + AMS10


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Overrides the shared fixture: ``app_client`` serves with small quotas."""
    return Settings(
        data_dir=tmp_path / "data",
        device="cpu",
        max_tensor_elements=MAX_ELEMENTS,
        max_steppers=MAX_STEPPERS,
        memory_budget_bytes=BUDGET,
    )


def spec(
    name: str,
    *shapes: list[int],
    amsgrad: bool = False,
    dtype: str = "float32",
    groups: list[dict[str, Any]] | None = None,
    **options: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "hyperparameters": {"lr": 0.1, "amsgrad": amsgrad, **options},
        "params": [{"name": f"p{i}", "shape": s, "dtype": dtype} for i, s in enumerate(shapes)],
    }
    if groups is not None:
        out["groups"] = groups
    return out


def zeros(s: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        p["name"]: torch.zeros(p["shape"], dtype=codec.dtype_from_name(p["dtype"]))
        for p in s["params"]
    }


# ---------------------------------------------------------------------- tensor elements


@pytest.mark.parametrize("form", ["json", "safetensors"])
def test_a_parameter_over_the_element_limit_is_413(tmp_path: Path, form: str) -> None:
    ok = spec("ok", [MAX_ELEMENTS], [10, 10])
    big = spec("big", [3], [MAX_ELEMENTS + 1])
    settings = Settings(data_dir=tmp_path, device="cpu", max_tensor_elements=MAX_ELEMENTS)
    with TestClient(create_app(settings)) as c:
        if form == "json":
            r = c.post(V1, json=big)
        else:
            r = c.post(V1, content=create_body(big, zeros(big)), headers=OCTET)
        body = assert_problem(
            r,
            "tensor_too_large",
            "parameter 'p1' has 101 elements; the limit (max_tensor_elements) is 100",
        )
        assert body["parameter"] == "p1" and body["limit"] == MAX_ELEMENTS
        assert registered(c) == []
        create(c, ok, zeros(ok) if form == "safetensors" else None)  # at the limit: fine
        assert registered(c) == ["ok"]


def test_a_huge_json_shape_is_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    """2**40 float64 zeros would be 8 TiB: refused from the shape alone (the default limit)."""
    with TestClient(create_app(Settings(data_dir=tmp_path, device="cpu"))) as c:
        r = c.post(V1, json=spec("huge", [2**20, 2**20], dtype="float64"))
        assert_problem(r, "tensor_too_large", f"has {2**40} elements", f"is {2**32}")
        assert registered(c) == []


# ---------------------------------------------------------------------- stepper count


def test_the_stepper_limit_is_507_and_a_delete_makes_room(app_client: TestClient) -> None:
    for i in range(MAX_STEPPERS):
        create(app_client, spec(f"s{i}", [1]))
    before = [snapshot(app_client, f"s{i}") for i in range(MAX_STEPPERS)]
    for form in ("json", "safetensors"):
        s = spec("one-more", [1])
        r = (
            app_client.post(V1, json=s)
            if form == "json"
            else app_client.post(V1, content=create_body(s, zeros(s)), headers=OCTET)
        )
        body = assert_problem(
            r,
            "stepper_limit",
            f"already holds {MAX_STEPPERS} steppers",
            "delete one to create 'one-more'",
        )
        assert body["limit"] == MAX_STEPPERS
    # A taken name is still a 409 conflict, not a quota problem.
    assert_problem(app_client.post(V1, json=spec("s0", [1])), "stepper_exists")
    assert registered(app_client) == ["s0", "s1", "s2"]
    assert [snapshot(app_client, f"s{i}") for i in range(MAX_STEPPERS)] == before
    assert app_client.delete(f"{V1}/s1").status_code == 204
    create(app_client, spec("one-more", [1]))


def test_racing_creates_never_exceed_the_limit(tmp_path: Path) -> None:
    """16 threads create at once against a real server: exactly MAX_STEPPERS succeed."""
    settings = Settings(data_dir=tmp_path, device="cpu", max_steppers=MAX_STEPPERS)
    statuses: list[int] = []
    with run_uvicorn(settings) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        start = threading.Barrier(16, timeout=30)

        def create_one(i: int) -> None:
            start.wait()
            statuses.append(c.post(V1, json=spec(f"race{i}", [8])).status_code)

        threads = [threading.Thread(target=create_one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(statuses) == [201] * MAX_STEPPERS + [507] * (16 - MAX_STEPPERS)
        assert len(c.get(V1).json()["steppers"]) == MAX_STEPPERS


# ---------------------------------------------------------------------- memory budget


@pytest.mark.parametrize(
    ("s", "nbytes", "state"),
    [
        (spec("adam", [10]), ADAM10, 3 * 40 + STEP_BYTES),
        (spec("ams", [10], amsgrad=True), AMS10, 4 * 40 + STEP_BYTES),
        (
            spec("bf16", [2, 3], [5], dtype="bfloat16"),
            cpu_footprint(3 * 12 + 3 * 10 + 2 * STEP_BYTES, 12, 22),
            3 * 12 + 3 * 10 + 2 * STEP_BYTES,
        ),
        (
            spec("cplx", [4], dtype="complex64"),
            cpu_footprint(3 * 32 + STEP_BYTES, 32, 32),
            3 * 32 + STEP_BYTES,
        ),
        (
            spec(
                "mixed", [10], [5], groups=[{"params": ["p0"]}, {"params": ["p1"], "amsgrad": True}]
            ),
            cpu_footprint((3 * 40 + STEP_BYTES) + (4 * 20 + STEP_BYTES), 40, 60),
            (3 * 40 + STEP_BYTES) + (4 * 20 + STEP_BYTES),
        ),
        (
            spec(
                "mixed2",
                [10],
                [5],
                amsgrad=True,
                groups=[{"params": ["p0"], "amsgrad": False}, {"params": ["p1"]}],
            ),
            cpu_footprint((3 * 40 + STEP_BYTES) + (4 * 20 + STEP_BYTES), 40, 60),
            (3 * 40 + STEP_BYTES) + (4 * 20 + STEP_BYTES),
        ),
        # foreach: one sqrt temporary per tensor (all of them); fused: no workspace
        (
            spec("foreach", [10], [5], foreach=True),
            (3 * 60 + 2 * STEP_BYTES) + 60 + 60,
            3 * 60 + 2 * STEP_BYTES,
        ),
        (spec("fused", [10], fused=True), ADAM10 - 2 * 40, 3 * 40 + STEP_BYTES),
        # Adam's L2 weight decay copies the gradient (a third temporary); AdamW's is in place
        (
            spec("l2", [10], weight_decay=0.1),
            cpu_footprint(3 * 40 + STEP_BYTES, 40, 40, 3),
            3 * 40 + STEP_BYTES,
        ),
        (
            {**spec("decoupled", [10], weight_decay=0.1), "optimizer": "adamw"},
            ADAM10,
            3 * 40 + STEP_BYTES,
        ),
    ],
)
def test_the_budget_counts_the_footprint_the_summary_reports(
    tmp_path: Path, s: dict[str, Any], nbytes: int, state: int
) -> None:
    """The budget counts each stepper's footprint as it will be once every parameter has
    stepped: its state (exactly the summary's ``state_bytes`` after the first step), its
    gradient buffer and its step's workspace, as the summary's ``footprint`` reports.
    (It counted the state alone before: the gradient buffer and the workspace are memory
    the stepper takes too.)"""
    with TestClient(
        create_app(Settings(data_dir=tmp_path, device="cpu", memory_budget_bytes=nbytes))
    ) as c:
        create(c, s)
        summary = c.get(f"{V1}/{s['name']}").json()
        assert summary["footprint"]["total"] == nbytes
        assert summary["footprint"]["state"] == state and summary["footprint"]["pinned"] == 0
        assert summary["state_bytes"] < state  # no state yet
        grads = {k: torch.ones_like(v) for k, v in zeros(s).items()}
        assert step(c, s["name"], grads).status_code == 200
        assert c.get(f"{V1}/{s['name']}").json()["state_bytes"] == state
        assert_problem(
            c.post(V1, json=spec("tiny", [1])),
            "memory_budget_exceeded",
            f"{nbytes} of the {nbytes}-byte budget",
        )


def test_the_memory_budget_is_507_and_a_delete_frees_it(app_client: TestClient) -> None:
    create(app_client, spec("a", [10]))
    s = spec("b", [10], amsgrad=True)
    create(app_client, s, zeros(s))  # safetensors path; now exactly at the budget
    before = (snapshot(app_client, "a"), snapshot(app_client, "b"))
    for form in ("json", "safetensors"):
        extra = spec("c", [1])
        r = (
            app_client.post(V1, json=extra)
            if form == "json"
            else app_client.post(V1, content=create_body(extra, zeros(extra)), headers=OCTET)
        )
        body = assert_problem(
            r,
            "memory_budget_exceeded",
            f"stepper 'c' needs {TINY} bytes",
            f"{BUDGET} of the {BUDGET}-byte budget (memory_budget_bytes)",
        )
        assert body["needed"] == TINY and body["used"] == BUDGET and body["budget"] == BUDGET
    assert registered(app_client) == ["a", "b"]
    assert (snapshot(app_client, "a"), snapshot(app_client, "b")) == before
    assert app_client.delete(f"{V1}/a").status_code == 204
    create(app_client, spec("c", [1]))


def test_switching_amsgrad_on_counts_for_later_creates(app_client: TestClient) -> None:
    create(app_client, spec("a", [10]))
    create(app_client, spec("b", [10]))  # 2 x ADAM10 used: AMS10 - ADAM10 = 40 left
    assert BUDGET - 2 * ADAM10 >= TINY
    r = app_client.patch(f"{V1}/a/hyperparameters", json={"amsgrad": True})
    assert r.status_code == 200, r.text  # a now counts AMS10: 0 left
    assert_problem(
        app_client.post(V1, json=spec("c", [1])),
        "memory_budget_exceeded",
        f"{BUDGET} of the {BUDGET}-byte budget",
    )


def test_projected_bytes() -> None:
    assert projected_bytes([]) == 0
    assert projected_bytes([(40, False), (40, True)]) == 124 + 164


def test_clients_raise_the_quota_exceptions(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        device="cpu",
        max_tensor_elements=MAX_ELEMENTS,
        max_steppers=2,
        memory_budget_bytes=1000,
    )
    with run_uvicorn(settings) as server, Client(server.url) as c:
        with pytest.raises(TensorTooLargeError) as big:
            c.create("big", {"w": torch.zeros(MAX_ELEMENTS + 1)})
        assert isinstance(big.value, PayloadTooLargeError) and big.value.status == 413
        with pytest.raises(MemoryBudgetExceededError) as budget:
            c.create("fat", {"w": torch.zeros(MAX_ELEMENTS, dtype=torch.float64)})
        assert budget.value.status == 507
        c.create("one", {"w": torch.zeros(1)})
        c.create("two", {"w": torch.zeros(1)})
        with pytest.raises(StepperLimitError) as full:
            c.create("three", {"w": torch.zeros(1)})
        for e in (budget.value, full.value):
            assert isinstance(e, InsufficientStorageError) and isinstance(e, ServerError)


# ---------------------------------------------------------------------- names are not paths


TRICKS = [
    "..",
    ".",
    "../escape",
    "a/b",
    "/abs",
    "%2e%2e",
    "..%2f..",
    "a\\b",
    "a\x00b",
    "nul\x00",
    "x" * 129,
    "",
    " lead",
    "-dash",
    ".hidden",
    "ü",
    "a b",
    "a:b",
    "~",
]


def tree(root: Path) -> dict[str, tuple[bool, int]]:
    """Every path under ``root`` (relative), whether it is a directory, and its size."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = (p.is_dir(), 0 if p.is_dir() else p.stat().st_size)
    return out


@pytest.fixture
def watched(tmp_path: Path, app_client: TestClient) -> Iterator[TestClient]:
    """The app, with the whole temporary tree (data directory included) compared before
    and after the test: tricks create nothing anywhere."""
    sentinel = tmp_path / "outside" / "victim.txt"
    sentinel.parent.mkdir()
    sentinel.write_text("untouched")
    create(app_client, {**SPEC, "name": "keep"})
    before, kept = tree(tmp_path), snapshot(app_client, "keep")
    yield app_client
    assert tree(tmp_path) == before
    assert snapshot(app_client, "keep") == kept
    assert sentinel.read_text() == "untouched"
    assert registered(app_client) == ["keep"]


@pytest.mark.parametrize("name", TRICKS, ids=repr)
def test_tricky_names_never_create_anything(watched: TestClient, name: str) -> None:
    s = {**SPEC, "name": name}
    for r in (
        watched.post(V1, json=s),
        watched.post(V1, content=create_body(s, initial_values()), headers=OCTET),
    ):
        assert_problem(r, "request_validation_error", "name")


@pytest.mark.parametrize("raw", ["..", "%2e%2e", "..%2f..", "a%2Fb", "%00", "x" * 129, "%5C"])
def test_tricky_names_in_paths_find_nothing(watched: TestClient, raw: str) -> None:
    """Tricks in the URL path (raw or percent-encoded): 404 (no such stepper, or no route),
    never a file."""
    for method, suffix in (
        ("GET", ""),
        ("DELETE", ""),
        ("GET", "/params"),
        ("PUT", "/params"),
        ("POST", "/step"),
        ("DELETE", "/state"),
    ):
        r = watched.request(method, f"{V1}/{raw}{suffix}", content=b"", headers=OCTET)
        assert r.status_code in (404, 405), (method, raw, suffix, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
