"""Size limits: request bodies over ``max_body_bytes`` (with or without Content-Length) and
JSON answers over ``max_json_elements`` are refused with problems and change nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from api_support import (
    OCTET,
    V1,
    assert_problem,
    create,
    create_body,
    get_params,
    registered,
    snapshot,
    step,
)
from fastapi.testclient import TestClient

from adamscope.client import codec
from adamscope.service.settings import Settings

LIMIT = 4096
#: Parameters whose gradients alone are just under the limit: a full step body is over it.
SMALL_SPEC = {
    "name": "lim",
    "hyperparameters": {"lr": 0.1},
    "params": [{"name": "w", "shape": [1000]}, {"name": "b", "shape": [3]}],
}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Overrides the shared fixture, so ``app_client`` serves with small limits."""
    return Settings(
        data_dir=tmp_path / "data", device="cpu", max_body_bytes=LIMIT, max_json_elements=10
    )


@pytest.fixture
def limited(app_client: TestClient) -> TestClient:
    create(app_client, SMALL_SPEC)
    for grad in ({"w": torch.ones(1000)}, {"b": torch.ones(3)}):  # together they are too big
        assert step(app_client, "lim", grad).status_code == 200
    return app_client


def chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def over_limit_step_body() -> bytes:
    body = codec.encode({"w": torch.full((1000,), 0.5), "b": torch.ones(3)})
    assert len(body) > LIMIT
    return body


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"{V1}/lim/step"),
        ("PUT", f"{V1}/lim/params"),
        ("PUT", f"{V1}/lim/state"),
    ],
)
def test_oversized_bodies_are_413_and_change_nothing(
    limited: TestClient, method: str, path: str, streamed: bool
) -> None:
    body = over_limit_step_body()
    if path.endswith("/state"):
        body = codec.encode({"w.exp_avg": torch.ones(1000), "b.exp_avg": torch.ones(3)})
    before = snapshot(limited, "lim")
    content = chunks(body) if streamed else body
    r = limited.request(method, path, content=content, headers=OCTET)
    if streamed:
        assert "content-length" not in r.request.headers
        assert r.request.headers["transfer-encoding"] == "chunked"
    else:
        assert r.request.headers["content-length"] == str(len(body))
    detail = assert_problem(r, "payload_too_large", f"limit of {LIMIT} bytes")["detail"]
    if not streamed:
        assert f"body of {len(body)} bytes" in detail
    assert snapshot(limited, "lim") == before


def test_streamed_body_under_the_limit_is_read_whole(limited: TestClient) -> None:
    """The control for the chunked case: the same mechanism, under the limit, steps."""
    body = codec.encode({"w": torch.full((1000,), 0.5)})
    before = get_params(limited, "lim")
    r = limited.post(f"{V1}/lim/step", content=chunks(body, 512), headers=OCTET)
    assert "content-length" not in r.request.headers
    assert r.status_code == 200, r.text
    assert r.json()["stepped"] == ["w"]
    assert not torch.equal(get_params(limited, "lim")["w"], before["w"])


def test_body_exactly_at_the_limit_is_accepted_and_one_byte_more_is_not(
    limited: TestClient,
) -> None:
    g = {"w": torch.full((1000,), 0.25)}
    sizes = {len(codec.encode(g, {"pad": "x" * n})): n for n in range(64)}
    exact = codec.encode(g, {"pad": "x" * sizes[LIMIT]})
    assert len(exact) == LIMIT
    before = snapshot(limited, "lim")
    # One byte over is refused before it is decoded (it would be malformed anyway).
    assert_problem(
        limited.post(f"{V1}/lim/step", content=exact + b"\0", headers=OCTET),
        "payload_too_large",
        f"body of {LIMIT + 1} bytes",
    )
    assert snapshot(limited, "lim") == before
    r = limited.post(f"{V1}/lim/step", content=exact, headers=OCTET)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
def test_oversized_create_registers_nothing(app_client: TestClient, streamed: bool) -> None:
    spec = {**SMALL_SPEC, "name": "big"}
    values = {"w": torch.ones(1000), "b": torch.ones(3)}
    body = create_body(spec, values)
    assert len(body) > LIMIT
    r = app_client.post(V1, content=chunks(body) if streamed else body, headers=OCTET)
    assert_problem(r, "payload_too_large")
    assert registered(app_client) == []


def test_json_create_larger_than_the_limit_is_413(app_client: TestClient) -> None:
    spec = {
        "name": "big",
        "params": [{"name": "w", "shape": [1000]}, {"name": "v", "shape": [100]}],
    }
    r = app_client.post(V1, content=json.dumps(spec), headers={"content-type": "application/json"})
    assert_problem(r, "payload_too_large", "parameters of 4400 bytes exceed")
    assert registered(app_client) == []


@pytest.mark.parametrize("how", ["query", "accept"])
@pytest.mark.parametrize("resource", ["params", "state"])
def test_json_answers_over_the_element_limit_are_refused(
    limited: TestClient, how: str, resource: str
) -> None:
    kwargs = (
        {"params": {"format": "json"}}
        if how == "query"
        else {"headers": {"accept": "application/json"}}
    )
    r = limited.get(f"{V1}/lim/{resource}", **kwargs)
    assert_problem(
        r, "json_too_large", "exceed the JSON limit of 10", "request format=safetensors instead"
    )
    small = limited.get(f"{V1}/lim/{resource}", params={"format": "json", "name": "b"})
    assert small.status_code == 200, small.text
    assert small.json()["stepper"] == "lim"
    assert limited.get(f"{V1}/lim/{resource}").status_code == 200  # safetensors has no cap
