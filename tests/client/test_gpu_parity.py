"""Bit-exact parity on CUDA: steppers on the GPU vs torch.optim on the same GPU.

The CPU suite (test_parity.py) on a CUDA device, plus what only CUDA has: ``capturable=True``
(step counts kept on the device) with every implementation, fused kernels for every float
dtype. Local parameters live on the GPU; the stepper is created with ``device="cuda"``.
State read back from the service arrives on the CPU, so tensors are compared by dtype,
shape and every bit, wherever they live. Skipped where CUDA is not available.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from remote_support import (
    OPTIMIZERS,
    SHAPES,
    Case,
    assert_same,
    cases,
    lockstep,
    make_params,
    option_rows,
    plain_and_all_on,
    run_parity,
    set_grads,
    skipped,
    twin,
    unique,
)

from adamscope.client import Client

pytestmark = pytest.mark.gpu

DEVICE = "cuda"

F32_F64 = [(torch.float32,), (torch.float64,)]
HALF = [(torch.float16,), (torch.bfloat16,)]
COMPLEX = [(torch.complex64, torch.float32, torch.complex64, torch.complex64)]
CAPTURABLE = [{"capturable": False}, {"capturable": True}]

MAIN = [
    c
    for cap in CAPTURABLE
    for c in cases(["forloop", "foreach", "fused"], F32_F64, option_rows, cap)
]
HALF_CASES = [
    c
    for cap in CAPTURABLE
    for c in cases(["forloop", "foreach", "fused"], HALF, plain_and_all_on, cap)
]
COMPLEX_CASES = [
    c for cap in CAPTURABLE for c in cases(["forloop", "foreach"], COMPLEX, plain_and_all_on, cap)
]


@pytest.fixture(scope="module")
def sync_client(live_server: Any) -> Iterator[Client]:
    with Client(live_server.url) as c:
        yield c


@pytest.mark.parametrize("case", MAIN, ids=lambda c: c.id)
def test_cuda_float_parity(case: Case, sync_client: Client) -> None:
    run_parity(case, sync_client, device=DEVICE, remote_device=DEVICE)


@pytest.mark.parametrize("case", HALF_CASES, ids=lambda c: c.id)
def test_cuda_half_precision_parity(case: Case, sync_client: Client) -> None:
    run_parity(case, sync_client, device=DEVICE, remote_device=DEVICE)


@pytest.mark.parametrize("case", COMPLEX_CASES, ids=lambda c: c.id)
def test_cuda_complex_parity(case: Case, sync_client: Client) -> None:
    run_parity(case, sync_client, device=DEVICE, remote_device=DEVICE)


@pytest.mark.parametrize(
    "impl",
    [{"fused": True}, {"foreach": True, "capturable": True}],
    ids=["fused", "foreach-capturable"],
)
def test_cuda_state_dict_round_trips(impl: dict[str, Any], sync_client: Client) -> None:
    """local -> remote -> local on the GPU; step counts on the device survive both ways."""
    local_cls, remote_cls = OPTIMIZERS["adam"]
    local_params = make_params(SHAPES, torch.float32, device=DEVICE)
    local = local_cls(local_params, lr=1e-2, amsgrad=True, **impl)
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        set_grads([local_params], gen, skip=skipped(step))
        local.step()

    remote_params = twin(local_params)
    remote = remote_cls(
        remote_params,
        lr=1e-2,
        amsgrad=True,
        **impl,
        client=sync_client,
        name=unique("cuda-sd"),
        device=DEVICE,
    )
    try:
        remote.load_state_dict(local.state_dict())
        lockstep(local, local_params, remote, remote_params, steps=5, seed=4, skip_from=6)
        back_params = twin(remote_params)
        back = local_cls(back_params, lr=1e-2, amsgrad=True, **impl)
        back.load_state_dict(remote.state_dict())
        assert_same(local.state_dict(), back.state_dict())  # back on the GPU, bit for bit
        lockstep(local, local_params, back, back_params, steps=5, seed=5, skip_from=11)
    finally:
        sync_client.delete(remote.name)
