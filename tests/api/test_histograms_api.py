"""``GET .../histograms``: a tensor's histograms over time through the real app in
process, against the counts recomputed from the tensors, and its problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from api_support import SPEC, V1, assert_problem, create, initial_values, step
from fastapi.testclient import TestClient

from adamscope.service.inspect.kernels.histogram import BINS, HI, HISTOGRAM_EVERY, LO

NAME = SPEC["name"]
VALUES = initial_values()
H = f"{V1}/{NAME}/histograms"


def test_columns_every_few_steps_with_exact_counts_of_a_small_tensor(
    app_client: TestClient,
) -> None:
    c = app_client
    create(c, SPEC, VALUES)
    last = {}
    for k in range(1, 2 * HISTOGRAM_EVERY + 1):
        g = {n: torch.full_like(v, 10.0 ** (k % 5 - 2)) for n, v in VALUES.items()}
        g["w"][0, 0] = 0.0
        last = g
        assert step(c, NAME, g).status_code == 200
    r = c.get(H, params={"tensor": "w", "key": "grad"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["steps"] == [HISTOGRAM_EVERY, 2 * HISTOGRAM_EVERY]
    assert body["rank_error"] == [0.0, 0.0] and len(body["edges"]) == BINS + 1
    # The last column: w's gradient at step 20, 5 elements of 10**-2 and one zero.
    slot = int(np.floor((np.log10(float(last["w"][0, 1])) - LO) / ((HI - LO) / BINS)))
    want = [0] * BINS
    want[slot] = 5
    assert body["counts"][-1] == want and body["zeros"][-1] == 1
    assert (body["under"][-1], body["over"][-1], body["nonfinite"][-1]) == (0, 0, 0)
    # from/to/max_columns
    one = c.get(H, params={"tensor": "w", "key": "grad", "from": HISTOGRAM_EVERY + 1}).json()
    assert one["steps"] == [2 * HISTOGRAM_EVERY]
    latest = c.get(H, params={"tensor": "w", "key": "grad", "max_columns": 1}).json()
    assert latest["steps"] == [2 * HISTOGRAM_EVERY]


@pytest.mark.parametrize(
    ("params", "code", "fragment"),
    [
        ({"tensor": "nope"}, "unknown_parameter", "nope"),
        ({}, "request_validation_error", "tensor"),
        ({"tensor": "w", "key": "param"}, "request_validation_error", "key"),
        ({"tensor": "w", "max_columns": 0}, "request_validation_error", "max_columns"),
        ({"tensor": "w", "from": -1}, "request_validation_error", "from"),
    ],
)
def test_bad_queries_are_problems(
    app_client: TestClient, params: dict[str, object], code: str, fragment: str
) -> None:
    create(app_client, SPEC, VALUES)
    assert_problem(app_client.get(H, params=params), code, fragment)


def test_an_unknown_stepper_is_a_problem(app_client: TestClient) -> None:
    assert_problem(
        app_client.get(f"{V1}/ghost/histograms", params={"tensor": "w"}), "stepper_not_found"
    )


def test_a_restored_snapshot_drops_the_later_columns(app_client: TestClient) -> None:
    c = app_client
    create(c, SPEC, VALUES)
    ones = {n: torch.ones_like(v) for n, v in VALUES.items()}
    for _ in range(HISTOGRAM_EVERY):
        assert step(c, NAME, ones).status_code == 200
    assert c.post(f"{V1}/{NAME}/snapshots", json={"name": "half"}).status_code == 201
    for _ in range(HISTOGRAM_EVERY):
        assert step(c, NAME, ones).status_code == 200
    both = [HISTOGRAM_EVERY, 2 * HISTOGRAM_EVERY]
    assert c.get(H, params={"tensor": "w"}).json()["steps"] == both
    assert c.post(f"{V1}/{NAME}/snapshots/half/restore").status_code == 200
    assert step(c, NAME, ones).status_code == 200  # step 51: back in time, recorded
    assert c.get(H, params={"tensor": "w"}).json()["steps"] == [HISTOGRAM_EVERY]
