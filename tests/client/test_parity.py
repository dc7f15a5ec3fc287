"""Bit-exact parity: RemoteAdam/RemoteAdamW through the real server vs torch.optim locally.

Each case runs 50 steps of the local optimizer and of its remote twin (over HTTP to the
session's uvicorn) on identical parameters and gradients, with one parameter that skips
steps, and requires ``torch.equal`` on the parameters after every step and on every tensor
of both ``state_dict()`` at the end (step, exp_avg, exp_avg_sq, max_exp_avg_sq), and equal
param_groups. The option matrix is pairwise within each optimizer x implementation x dtype
cell (see ``remote_support.option_rows``), so every option value meets every other one, both
optimizers, all three implementations and both dtypes.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from remote_support import (
    OPTIMIZERS,
    Case,
    cases,
    make_params,
    option_rows,
    plain_and_all_on,
    run_parity,
    unique,
)

from adamscope.client import Client
from adamscope.client.errors import InvalidHyperparameterError, StepperNotFoundError

F32_F64 = [(torch.float32,), (torch.float64,)]
HALF = [(torch.float16,), (torch.bfloat16,)]
#: complex64 alongside float32 in one group (mixed dtypes, as a real model might have).
COMPLEX = [(torch.complex64, torch.float32, torch.complex64, torch.complex64)]

MAIN = cases(["forloop", "foreach", "fused"], F32_F64, option_rows)
HALF_CASES = cases(["forloop", "foreach"], HALF, plain_and_all_on)
COMPLEX_CASES = cases(["forloop", "foreach"], COMPLEX, option_rows)


@pytest.fixture(scope="module")
def sync_client(live_server: Any) -> Iterator[Client]:
    """One synchronous client per module, talking to the session's live server."""
    with Client(live_server.url) as c:
        yield c


@pytest.fixture
def stepper_name(sync_client: Client) -> Iterator[str]:
    """A fresh stepper name; the stepper, if one was created, is deleted afterwards."""
    name = unique("t")
    yield name
    with contextlib.suppress(StepperNotFoundError):
        sync_client.delete(name)


@pytest.mark.parametrize("case", MAIN, ids=lambda c: c.id)
def test_float_parity(case: Case, sync_client: Client) -> None:
    run_parity(case, sync_client)


@pytest.mark.parametrize("case", HALF_CASES, ids=lambda c: c.id)
def test_half_precision_parity(case: Case, sync_client: Client) -> None:
    run_parity(case, sync_client)


@pytest.mark.parametrize("case", COMPLEX_CASES, ids=lambda c: c.id)
def test_complex_parity(case: Case, sync_client: Client) -> None:
    run_parity(case, sync_client)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fused_rejects_complex_with_pytorchs_message(
    optimizer: str, sync_client: Client, stepper_name: str
) -> None:
    local_cls, remote_cls = OPTIMIZERS[optimizer]
    # PyTorch accepts the constructor and refuses the first step.
    params = make_params([(3,)], torch.complex64)
    local = local_cls(params, fused=True)
    params[0].grad = torch.ones_like(params[0])
    with pytest.raises(RuntimeError) as local_error:
        local.step()
    message = str(local_error.value)
    assert "`fused=True` requires all the params to be floating point" in message

    # The service probes a step before it creates the stepper, so RemoteAdam is refused at
    # construction, with PyTorch's message, and nothing is created.
    with pytest.raises(InvalidHyperparameterError) as remote_error:
        remote_cls(
            make_params([(3,)], torch.complex64), fused=True, client=sync_client, name=stepper_name
        )
    assert remote_error.value.detail == message
    with pytest.raises(StepperNotFoundError):
        sync_client.get(stepper_name)

    # A direct create is refused by the service with PyTorch's message as the detail.
    with pytest.raises(InvalidHyperparameterError) as api_error:
        sync_client.create(
            stepper_name,
            {"z": torch.zeros(3, dtype=torch.complex64)},
            optimizer=optimizer,
            fused=True,
        )
    assert api_error.value.status == 422
    assert api_error.value.detail == message
    with pytest.raises(StepperNotFoundError):
        sync_client.get(stepper_name)


def test_matrix_covers_every_option_value_and_pair() -> None:
    """The trimmed matrix still meets the bar: no option value or pair of values is lost."""
    factors = ("amsgrad", "maximize", "weight_decay", "decoupled_weight_decay")
    for optimizer, impl, dtypes in itertools.product(
        ("adam", "adamw"), ("forloop", "foreach", "fused"), F32_F64
    ):
        cell = [
            dict(c.options)
            for c in MAIN
            if (c.optimizer, c.impl, c.dtypes) == (optimizer, impl, dtypes)
        ]
        present = [f for f in factors if f in cell[0]]
        assert len(present) == (4 if optimizer == "adam" else 3)
        for a, b in itertools.combinations(present, 2):
            seen = {(row[a], row[b]) for row in cell}
            values_a = {row[a] for row in cell}
            values_b = {row[b] for row in cell}
            assert len(values_a) == len(values_b) == 2
            assert seen == set(itertools.product(values_a, values_b)), (optimizer, impl, a, b)
