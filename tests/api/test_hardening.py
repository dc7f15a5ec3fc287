"""Hostile requests: every class the attack on the service found is a 4xx problem+json that
changes nothing, and no request can stall or exhaust the server.

- JSON nested ~1,000 levels deep, wherever JSON is parsed: safetensors headers (step, PUT
  params/state, dry run, create, import), the ``adamscope.param_groups`` and
  ``adamscope.spec`` metadata, and JSON bodies.
- Integers past int64: slice indices, shape dimensions (``[2**64, 0]`` holds no element yet
  no tensor can be laid out) in JSON and safetensors bodies, steps and counts.
- Names followed by a newline (``re.match`` with ``$`` accepted them): always a 4xx.
- A ``detail`` never carries a stack trace, a source path or an address; an unexpected error
  is logged under a reference and answered with only that; an allocator failure is 507.
- Shapes the machine cannot hold are refused (507, what was asked and what is left) before
  anything is allocated; the default budget is the memory the machine has available.
- A header larger than its stepper can need is refused after its 8-byte length alone, a
  declared length reserves nothing, and a body that stalls is answered 408.
- ``/healthz`` names steppers whose restore failed only to callers who could list them.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from api_support import OCTET, PROBLEM, SPEC, V1, create, create_body, initial_values, step
from conftest import run_uvicorn
from fastapi import Depends
from fastapi.testclient import TestClient
from httpx import Response

from adamscope.client import codec
from adamscope.client.errors import CODES
from adamscope.client.protocol import META_GROUPS, META_SPEC
from adamscope.service.api.access import require
from adamscope.service.app import create_app
from adamscope.service.engine import Registry, Stepper
from adamscope.service.settings import Settings

JSON = {"content-type": "application/json"}
DEEP = 1000
#: What a detail must never show: traces (Python, C++), addresses, source files.
LEAK = re.compile(
    r"Traceback|Exception raised from|frame #\d|0x[0-9a-fA-F]{6,}|"
    r"[\w/]+\.(py|so|cpp|h)\b|site-packages|/__w/"
)


def deep(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def header_body(header: str, data: bytes = b"") -> bytes:
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + data


def assert_clean_problem(r: Response) -> dict[str, Any]:
    """A 4xx RFC 9457 problem (or 507: a quota or the machine's memory is full, retrying
    cannot help) with a documented code and a detail that leaks nothing."""
    assert 400 <= r.status_code < 500 or r.status_code == 507, (r.status_code, r.text[:500])
    assert r.headers["content-type"].split(";")[0] == PROBLEM, r.headers
    body = r.json()
    assert body["code"] in CODES and CODES[body["code"]][0] == r.status_code, body
    assert LEAK.search(body["detail"]) is None, body["detail"]
    return body  # type: ignore[no-any-return]


def everything(client: TestClient) -> dict[str, Any]:
    """All a client can observe about every stepper (timestamps aside) and its snapshots."""
    out: dict[str, Any] = {}
    for s in client.get(V1).json()["steppers"]:
        n = s["name"]
        summary = client.get(f"{V1}/{n}").json()
        for k in ("created_at", "updated_at", "persisted_at"):
            summary.pop(k, None)
        snaps = [
            (x["name"], x["step"], x["size"])
            for x in client.get(f"{V1}/{n}/snapshots").json()["snapshots"]
        ]
        out[n] = (
            client.get(f"{V1}/{n}/params").content,
            client.get(f"{V1}/{n}/state").content,
            summary,
            snaps,
        )
    return out


@pytest.fixture
def net(app_client: TestClient) -> TestClient:
    """The app with stepper 'net' (stepped twice) and its snapshot 'snap1'."""
    values = initial_values()
    create(app_client, SPEC, values)
    for k in range(2):
        assert (
            step(app_client, "net", {n: t * (k + 1) for n, t in values.items()}).status_code == 200
        )
    assert app_client.post(f"{V1}/net/snapshots", json={"name": "snap1"}).status_code == 201
    return app_client


def _cases() -> list[tuple[str, str, str, dict[str, Any]]]:
    w = torch.ones(2, 3)
    spec = json.dumps({"name": "fresh", "optimizer": "adam", "params": [{"name": "w"}]})
    big = 2**64
    empty_big = {"w": {"dtype": "F32", "shape": [big, 0], "data_offsets": [0, 0]}}
    state_big = {"w.exp_avg": {"dtype": "F32", "shape": [big, 0], "data_offsets": [0, 0]}}

    def st(entries: dict[str, Any], meta: dict[str, str] | None = None) -> dict[str, Any]:
        head = dict(entries)
        if meta is not None:
            head["__metadata__"] = meta
        return {"content": header_body(json.dumps(head)), "headers": OCTET}

    deep_header = {"content": header_body('{"w":' + deep() + "}"), "headers": OCTET}
    deep_meta_header = {
        "content": header_body('{"__metadata__":{"a":' + deep() + "}}"),
        "headers": OCTET,
    }
    groups_deep = {"content": codec.encode({"w": w}, {META_GROUPS: deep()}), "headers": OCTET}
    state_groups_deep = {
        "content": codec.encode({"w.exp_avg": w}, {META_GROUPS: deep()}),
        "headers": OCTET,
    }
    spec_deep = {"content": codec.encode({"w": w}, {META_SPEC: deep()}), "headers": OCTET}
    # Past MAX_JSON_DEPTH, well short of Python's recursion limit: refused all the same.
    spec_70 = {
        "content": codec.encode({"w": w}, {META_SPEC: '{"name":' + deep(70) + "}"}),
        "headers": OCTET,
    }

    def js(text: str) -> dict[str, Any]:
        return {"content": text.encode(), "headers": JSON}

    step_r, params_r, state_r = f"{V1}/net/step", f"{V1}/net/params", f"{V1}/net/state"
    dry_r, imp_r = f"{V1}/net/dry-run", f"{V1}/import"
    return [
        # -- deep nesting, in every JSON the service parses
        *[
            (f"deep-header-{m}-{r.rsplit('/', 1)[-1]}", m, r, body)
            for m, r in [
                ("POST", step_r),
                ("PUT", params_r),
                ("PUT", state_r),
                ("POST", dry_r),
                ("POST", imp_r),
                ("POST", V1),
            ]
            for body in (deep_header, deep_meta_header)
        ],
        ("deep-groups-step", "POST", step_r, groups_deep),
        ("deep-groups-dry-run", "POST", dry_r, groups_deep),
        ("deep-groups-state", "PUT", state_r, state_groups_deep),
        ("deep-spec-create", "POST", V1, spec_deep),
        ("depth-70-spec-create", "POST", V1, spec_70),
        ("deep-json-create", "POST", V1, js(deep())),
        (
            "deep-json-create-data",
            "POST",
            V1,
            js(
                '{"name": "x", "optimizer": "adam", "params": [{"name": "w", "shape": [1], '
                '"data": ' + deep() + "}]}"
            ),
        ),
        ("deep-json-params", "PUT", params_r, js('{"params": {"w": ' + deep() + "}}")),
        ("deep-json-state", "PUT", state_r, js('{"state": {"w": {"exp_avg": ' + deep() + "}}}")),
        ("deep-json-state-groups", "PUT", state_r, js('{"param_groups": ' + deep() + "}")),
        ("deep-json-hyper", "PATCH", f"{V1}/net/hyperparameters", js('{"lr": ' + deep() + "}")),
        ("deep-json-alerts", "PUT", f"{V1}/net/alerts", js('{"rules": ' + deep() + "}")),
        ("deep-json-loss", "POST", f"{V1}/net/loss", js('{"loss": ' + deep() + "}")),
        ("deep-json-durability", "PUT", f"{V1}/net/durability", js('{"mode": ' + deep() + "}")),
        ("deep-json-snapshot", "POST", f"{V1}/net/snapshots", js('{"name": ' + deep() + "}")),
        # -- integers past int64
        ("slice-index-huge", "GET", f"{V1}/net/slice?name=w&index=99999999999999999999999", {}),
        (
            "slice-index-huge-negative",
            "GET",
            f"{V1}/net/slice?name=w&index=-99999999999999999999999",
            {},
        ),
        ("slice-index-int64-max", "GET", f"{V1}/net/slice?name=w&index={2**63 - 1}", {}),
        (
            "slice-rows-huge-step",
            "GET",
            f"{V1}/net/slice?name=w&rows=0:3:99999999999999999999999",
            {},
        ),
        ("slice-rows-4300-digits", "GET", f"{V1}/net/slice?name=w&rows=0:{'9' * 5000}", {}),
        (
            "json-params-shape",
            "PUT",
            params_r,
            {"json": {"params": {"w": {"shape": [big, 0], "data": []}}}},
        ),
        (
            "json-state-shape",
            "PUT",
            state_r,
            {"json": {"state": {"w": {"exp_avg": {"shape": [big, 0], "data": []}}}}},
        ),
        (
            "json-create-shape",
            "POST",
            V1,
            {
                "json": {
                    "name": "x",
                    "optimizer": "adam",
                    "params": [{"name": "w", "shape": [big, 0]}],
                }
            },
        ),
        (
            "json-create-shape-int64",
            "POST",
            V1,
            {
                "json": {
                    "name": "x",
                    "optimizer": "adam",
                    "params": [{"name": "w", "shape": [2**63 - 1, 2**63 - 1, 0]}],
                }
            },
        ),
        ("st-create-shape", "POST", V1, st(empty_big, {META_SPEC: spec})),
        ("st-import-shape", "POST", imp_r, st(empty_big)),
        ("st-params-shape", "PUT", params_r, st(empty_big)),
        ("st-state-shape", "PUT", state_r, st(state_big)),
        ("st-step-shape", "POST", step_r, st(empty_big)),
        ("st-dry-run-shape", "POST", dry_r, st(empty_big)),
        (
            "st-too-many-dims",
            "PUT",
            params_r,
            st({"w": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}),
        ),
        ("loss-step", "POST", f"{V1}/net/loss", {"json": {"step": 10**30, "loss": 1.0}}),
        ("durability-n", "PUT", f"{V1}/net/durability", {"json": {"mode": "every_n", "n": 10**30}}),
        ("history-since", "GET", f"{V1}/net/history?since={10**30}", {}),
        (
            "expected-step",
            "POST",
            f"{step_r}?expected_step={10**30}",
            {"content": codec.encode({"w": w}), "headers": OCTET},
        ),
        # -- names followed by a newline
        ("diff-snapshot-newline", "GET", "/v1/diff?a=net&b=net/snap1%0A", {}),
        ("diff-stepper-newline", "GET", "/v1/diff?a=net%0A&b=net", {}),
        ("diff-both-newline", "GET", "/v1/diff?a=net%0A/snap1%0A&b=net", {}),
        ("snapshot-newline", "GET", f"{V1}/net/snapshots/snap1%0A", {}),
        ("restore-newline", "POST", f"{V1}/net/snapshots/snap1%0A/restore", {}),
        (
            "import-name-newline",
            "POST",
            f"{imp_r}?name=copy%0A",
            {"content": b"x", "headers": OCTET},
        ),
        (
            "create-name-newline",
            "POST",
            V1,
            {"json": {"name": "x\n", "optimizer": "adam", "params": [{"name": "w", "shape": [1]}]}},
        ),
    ]


CASES = _cases()


@pytest.mark.parametrize(
    ("method", "url", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_request_is_a_clean_4xx_and_changes_nothing(
    net: TestClient, method: str, url: str, kwargs: dict[str, Any]
) -> None:
    before = everything(net)
    assert_clean_problem(net.request(method, url, **kwargs))
    assert everything(net) == before


# ---------------------------------------------------------------------- unexpected errors


def _app_with(settings: Settings, fail: Any) -> TestClient:
    app = create_app(settings)

    @app.get("/boom", dependencies=[Depends(require("public"))])
    async def boom() -> None:
        fail()

    return TestClient(app, raise_server_exceptions=False)


def _torch_error() -> None:
    torch.zeros([2**64, 0])  # PyTorch's own C++ error: a backtrace with paths and addresses


def test_an_unexpected_error_is_logged_with_a_reference_and_leaks_nothing(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with _app_with(settings, _torch_error) as client, caplog.at_level(logging.ERROR):
        r = client.get("/boom")
    assert r.status_code == 500 and r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["code"] == "internal_error" and LEAK.search(body["detail"]) is None
    assert body["reference"] in body["detail"] and "zeros" not in body["detail"]
    logged = "\n".join(rec.getMessage() + str(rec.exc_info) for rec in caplog.records)
    assert body["reference"] in logged and "Overflow" in logged


def test_an_allocator_failure_is_507_not_a_crash(settings: Settings) -> None:
    def allocate() -> None:
        torch.empty(2**62, dtype=torch.uint8)  # the real allocator refuses 4 EiB

    with _app_with(settings, allocate) as client:
        r = client.get("/boom")
    assert r.status_code == 507 and r.json()["code"] == "memory_budget_exceeded"
    assert LEAK.search(r.json()["detail"]) is None


# ---------------------------------------------------------------------- memory


def _bytes_of(numel: int, itemsize: int = 4, count: int = 1) -> int:
    """The footprint total (service.engine.footprint) of ``count`` such parameters of a
    default CPU Adam: what the machine-memory check compares with what is left."""
    from adamscope.service.engine.footprint import footprint
    from adamscope.service.engine.options import default_options

    return footprint([([numel * itemsize] * count, default_options("adam"))], "cpu").total


def test_a_create_the_machine_cannot_hold_is_507_before_anything_is_allocated(
    app_client: TestClient,
) -> None:
    # 64 float64 parameters of 2**32 elements: 6.6 TB with their Adam state.
    spec = {
        "name": "huge",
        "optimizer": "adam",
        "params": [{"name": f"p{i}", "shape": [2**32], "dtype": "float64"} for i in range(64)],
    }
    r = app_client.post(V1, json=spec)
    body = assert_clean_problem(r)
    assert body["code"] == "memory_budget_exceeded" and r.status_code == 507
    assert body["needed"] == _bytes_of(2**32, 8, count=64)
    assert f"needs {body['needed']} bytes on cpu" in body["detail"]
    assert f"{body['left']} bytes are left" in body["detail"]
    assert app_client.get(V1).json()["steppers"] == []


def test_the_66_byte_create_of_the_attack_is_refused(app_client: TestClient) -> None:
    """``[2147483648]`` fp32: 8 GiB of zeros and 16 GiB of state from a 66-byte body."""
    from adamscope.service.api import budget

    needed = _bytes_of(2**31)
    available = budget.available_bytes(torch.device("cpu"))
    assert available is not None
    if available * budget.HEADROOM >= needed:
        pytest.skip(f"this machine has {available} bytes available: it could hold it")
    body = b'{"name":"h","optimizer":"adam","params":[{"name":"w","shape":[2147483648]}]}'
    r = app_client.post(V1, content=body, headers=JSON)
    assert r.status_code == 507 and r.json()["needed"] == needed
    assert app_client.get(V1).json()["steppers"] == []


def test_steppers_that_have_not_stepped_count_the_state_they_will_take() -> None:
    from adamscope.service.api import budget

    registry = Registry()
    cpu = torch.device("cpu")
    s = registry.create(
        "a",
        lambda: Stepper(
            "a",
            "adam",
            cpu,
            [("w", torch.zeros(10)), ("h", torch.zeros(4, dtype=torch.float64))],
            {},
            None,
        ),
    )
    assert budget.pending_bytes(registry, cpu) == (10 * 4 + 4 * 8) * 2 + 2 * 4
    s.step({"w": torch.ones(10)})
    assert budget.pending_bytes(registry, cpu) == 4 * 8 * 2 + 4
    s.step({"h": torch.ones(4, dtype=torch.float64)})
    assert budget.pending_bytes(registry, cpu) == 0


# ---------------------------------------------------------------------- slow and big headers


@pytest.fixture
def live(tmp_path: Path) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path / "data", device="cpu", body_timeout=1.0)
    with run_uvicorn(settings) as server:
        r = httpx.post(
            f"{server.url}{V1}", content=create_body(SPEC, initial_values()), headers=OCTET
        )
        assert r.status_code == 201, r.text
        yield server.url


def _raw_request(
    url: str, method: str, path: str, headers: dict[str, str], body: bytes
) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def _status(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


def test_a_header_larger_than_its_stepper_needs_is_refused_after_8_bytes(live: str) -> None:
    """Ten connections declare a 100 MB header and send only its length: each is answered
    413 at once (before: the server reserved ~950 MB and waited for the bytes)."""
    socks = [
        _raw_request(
            live,
            "POST",
            f"{V1}/net/dry-run",
            {"Content-Type": "application/octet-stream", "Content-Length": str(100_000_008 + 64)},
            struct.pack("<Q", 100_000_000 - 8),
        )
        for _ in range(10)
    ]
    try:
        for sock in socks:
            status, data = _status(sock)
            assert status == 413 and b"a body for this stepper needs at most" in data
    finally:
        for sock in socks:
            sock.close()


def test_a_header_of_700000_empty_entries_is_refused_unparsed(live: str) -> None:
    header = (
        "{"
        + ",".join(
            f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(700_000)
        )
        + "}"
    )
    r = httpx.post(
        f"{live}{V1}/net/dry-run", content=header_body(header), headers=OCTET, timeout=60
    )
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert httpx.get(f"{live}/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("what", ["header", "data", "json"])
def test_a_stalled_body_is_answered_408(live: str, what: str) -> None:
    body = codec.encode(initial_values())
    if what == "json":
        path, ctype, sent = V1, "application/json", b'{"name": "x", "optim'
    else:
        path, ctype = f"{V1}/net/params", "application/octet-stream"
        sent = body[:20] if what == "header" else body[:-4]
    sock = _raw_request(
        live,
        "PUT" if what != "json" else "POST",
        path,
        {"Content-Type": ctype, "Content-Length": str(len(body))},
        sent,
    )
    try:
        started = time.monotonic()
        status, data = _status(sock)
        assert status == 408 and b"request_timeout" in data
        assert time.monotonic() - started < 14  # answered, not left to the socket timeout
    finally:
        sock.close()


# ---------------------------------------------------------------------- /healthz


def test_healthz_names_failed_steppers_only_to_callers_who_could_list_them(
    tmp_path: Path,
) -> None:
    tokens = [
        {"token": "admin-token-0123456789abcdef", "scope": "admin", "name": "op"},
        {
            "token": "team-b-token-0123456789abcdef",
            "scope": "read",
            "prefix": "team-b",
            "name": "b",
        },
    ]
    settings = Settings(data_dir=tmp_path / "data", device="cpu", tokens=tokens)
    admin = {"Authorization": f"Bearer {tokens[0]['token']}"}
    with TestClient(create_app(settings), headers=admin) as client:
        create(client, {**SPEC, "name": "team-a-secret"}, initial_values())
    broken = settings.data_dir / "steppers" / "team-a-secret" / "checkpoint.safetensors"
    broken.write_bytes(broken.read_bytes()[:100])
    with TestClient(create_app(settings)) as client:
        for headers, shown in (
            ({}, False),
            ({"Authorization": "Bearer not-a-valid-token"}, False),
            ({"Authorization": f"Bearer {tokens[1]['token']}"}, False),
            (admin, True),
        ):
            r = client.get("/healthz", headers=headers)
            assert r.status_code == 200
            assert ("team-a-secret" in r.text) is shown, (headers, r.text)
            assert r.json()["persistence"]["failed_count"] == 1
