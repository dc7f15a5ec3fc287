"""Exactly-once stepping over HTTP, in process: the ``Idempotency-Key`` header and the
``expected_step`` query of ``POST /steppers/{name}/step``.

A retried request (same key) is not applied again and answers the original result with
``"replayed": true``, across restarts too; ``expected_step`` other than the stepper's step
(older or newer) answers 409 ``step_conflict`` with ``current_step`` and changes nothing.
tests/client/test_exactly_once.py drives the same through a real server and a client that
loses replies; these pin the route itself.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from api_support import SPEC, V1, assert_problem, create, decode, initial_values, snapshot, step
from fastapi.testclient import TestClient
from httpx import Response

from adamscope.service.app import create_app
from adamscope.service.settings import Settings

NAME = SPEC["name"]


def grads(k: int, names: tuple[str, ...] = ("w", "b")) -> dict[str, torch.Tensor]:
    values = initial_values()
    return {n: torch.full_like(values[n], 0.25 * (k + 1)) for n in names}


def keyed(client: TestClient, key: str, g: dict[str, torch.Tensor], **query: Any) -> Response:
    """A step with an Idempotency-Key (api_support.step sends no headers of its own)."""
    client.headers["idempotency-key"] = key
    try:
        return step(client, NAME, g, **query)
    finally:
        del client.headers["idempotency-key"]


def result(r: Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.fixture
def served(app_client: TestClient) -> TestClient:
    create(app_client, SPEC, initial_values())
    return app_client


def test_a_retried_key_is_applied_once(served: TestClient) -> None:
    first = result(keyed(served, "k1", grads(0)))
    assert (first["step"], first["stepped"], first["skipped"], first["replayed"]) == (
        1,
        ["w", "b"],
        ["h"],
        False,
    )
    after = snapshot(served, NAME)
    for _ in range(2):
        again = result(keyed(served, "k1", grads(0)))
        assert again == {**first, "replayed": True}
        assert snapshot(served, NAME) == after


def test_an_old_key_replays_its_own_step(served: TestClient) -> None:
    first = result(keyed(served, "k1", grads(0, ("w",))))
    second = result(keyed(served, "k2", grads(1)))
    assert (first["step"], second["step"]) == (1, 2)
    after = snapshot(served, NAME)
    assert result(keyed(served, "k1", grads(0, ("w",)))) == {**first, "replayed": True}
    assert snapshot(served, NAME) == after
    assert result(step(served, NAME, grads(2)))["step"] == 3  # no key: applied


def test_a_reused_key_with_another_body_changes_nothing(served: TestClient) -> None:
    first = result(keyed(served, "k1", grads(0)))
    after = snapshot(served, NAME)
    r = keyed(served, "k1", grads(5, ("h",)))
    if r.status_code == 200:
        assert r.json() == {**first, "replayed": True}
    else:
        assert r.status_code in (409, 422), r.text
    assert snapshot(served, NAME) == after


def test_a_replay_with_return_params_answers_that_steps_parameters(served: TestClient) -> None:
    first = keyed(served, "k1", grads(0), return_params="true")
    params, meta = decode(first)
    assert meta["adamscope.step"] == "1" and json.loads(meta["adamscope.replayed"]) is False
    after = snapshot(served, NAME)
    again_params, again_meta = decode(keyed(served, "k1", grads(0), return_params="true"))
    assert json.loads(again_meta["adamscope.replayed"]) is True
    assert again_meta["adamscope.step"] == "1"
    assert json.loads(again_meta["adamscope.stepped"]) == ["w", "b"]
    assert list(again_params) == list(params)
    assert all(torch.equal(again_params[n], params[n]) for n in params)
    assert snapshot(served, NAME) == after
    # Once the stepper has moved on, that step's parameters are gone: 409, nothing changes.
    result(step(served, NAME, grads(1)))
    moved = snapshot(served, NAME)
    body = assert_problem(
        keyed(served, "k1", grads(0), return_params="true"),
        "step_conflict",
        "step 1 was applied",
        "has moved on to step 2",
    )
    assert body["current_step"] == 2
    assert snapshot(served, NAME) == moved


def test_a_replay_wins_over_its_now_stale_expected_step(served: TestClient) -> None:
    first = result(keyed(served, "k1", grads(0), expected_step=0))
    assert result(keyed(served, "k1", grads(0), expected_step=0)) == {**first, "replayed": True}
    assert result(served.get(f"{V1}/{NAME}"))["step"] == 1


def test_keys_survive_a_restart(settings: Settings) -> None:
    with TestClient(create_app(settings)) as c:
        create(c, SPEC, initial_values())
        first = result(keyed(c, "k1", grads(0)))
        result(keyed(c, "k2", grads(1)))
    with TestClient(create_app(settings)) as c:
        after = snapshot(c, NAME)
        assert result(keyed(c, "k1", grads(0))) == {**first, "replayed": True}
        assert snapshot(c, NAME) == after
        assert result(keyed(c, "k3", grads(2)))["step"] == 3


def test_a_retried_contribution_counts_once(served: TestClient) -> None:
    pending = keyed(served, "w0", grads(0), contributors=2, worker=0)
    assert pending.status_code == 202 and pending.json()["pending"] == [0]
    again = keyed(served, "w0", grads(0), contributors=2, worker=0)
    assert again.status_code == 202 and again.json()["pending"] == [0]
    done = result(keyed(served, "w1", grads(1), contributors=2, worker=1))
    assert done["step"] == 1 and done["replayed"] is False
    after = snapshot(served, NAME)
    replay = result(keyed(served, "w0", grads(0), contributors=2, worker=0))
    assert replay == {**done, "replayed": True}
    assert snapshot(served, NAME) == after


# ---------------------------------------------------------------------- expected_step


@pytest.mark.parametrize("expected", [0, 1, 3, 10**9])
def test_a_stale_or_future_expected_step_is_a_conflict(served: TestClient, expected: int) -> None:
    for k in range(2):
        result(step(served, NAME, grads(k)))
    before = snapshot(served, NAME)
    for send in (
        lambda: step(served, NAME, grads(5), expected_step=expected),
        lambda: keyed(served, "k", grads(5), expected_step=expected),
        lambda: step(served, NAME, grads(5), expected_step=expected, return_params="true"),
        lambda: step(served, NAME, grads(5), expected_step=expected, contributors=2, worker=0),
    ):
        body = assert_problem(
            send(), "step_conflict", f"built on step {expected}", f"'{NAME}' is at step 2"
        )
        assert body["current_step"] == 2
        assert snapshot(served, NAME) == before
    # The refused keyed step did not spend its key.
    assert result(keyed(served, "k", grads(5), expected_step=2))["replayed"] is False


def test_the_current_expected_step_applies(served: TestClient) -> None:
    assert result(step(served, NAME, grads(0), expected_step=0))["step"] == 1
    assert result(step(served, NAME, grads(1), expected_step=1))["step"] == 2
