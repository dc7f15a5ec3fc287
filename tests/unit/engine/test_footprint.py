"""The footprint estimate (service.engine.footprint): what a stepper holds, by kind, for
every implementation and the options that add temporaries; on a GPU, the workspace
estimate is checked against what PyTorch's step really allocates."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adamscope.service.engine import Stepper
from adamscope.service.engine.footprint import (
    CONTEXT_BYTES,
    STEP_BYTES,
    Footprint,
    footprint,
    implementation,
    state_bytes,
    workspace_bytes,
)

P = [4000, 400, 40]  # parameter bytes of three tensors
TOTAL, LARGEST = sum(P), max(P)


@pytest.mark.parametrize(
    ("options", "device", "impl"),
    [
        ({}, "cpu", "forloop"),
        ({}, "cuda", "foreach"),
        ({"foreach": None, "fused": None}, "cuda", "foreach"),
        ({"foreach": False}, "cuda", "forloop"),
        ({"foreach": True}, "cpu", "foreach"),
        ({"fused": True}, "cpu", "fused"),
        ({"fused": True, "foreach": None}, "cuda", "fused"),
        ({"differentiable": True}, "cuda", "forloop"),
    ],
)
def test_the_implementation_is_pytorchs_choice(
    options: dict[str, Any], device: str, impl: str
) -> None:
    assert implementation(options, device) == impl


@pytest.mark.parametrize(
    ("options", "device", "expected"),
    [
        ({}, "cpu", 2 * LARGEST),  # denom: sqrt, then the division
        ({"maximize": True}, "cpu", 3 * LARGEST),  # -grad
        ({"weight_decay": 0.1}, "cpu", 3 * LARGEST),  # grad + wd * p
        ({"weight_decay": 0.1, "decoupled_weight_decay": True}, "cpu", 2 * LARGEST),  # in place
        ({"weight_decay": 0.0}, "cpu", 2 * LARGEST),
        ({}, "cuda", TOTAL),  # one _foreach_sqrt result per tensor
        ({"maximize": True, "weight_decay": 0.1}, "cuda", TOTAL),  # freed before the sqrt
        ({"capturable": True}, "cuda", TOTAL + 3 * 4 * 512),  # per-tensor scalar temporaries
        ({"capturable": True, "foreach": False}, "cuda", 2 * LARGEST + 4 * 512),
        ({"fused": True, "maximize": True, "weight_decay": 0.1}, "cuda", 0),
        ({"fused": True}, "cpu", 0),
    ],
)
def test_the_workspace_by_implementation(
    options: dict[str, Any], device: str, expected: int
) -> None:
    assert workspace_bytes(P, options, device) == expected
    assert workspace_bytes([], options, device) == 0


def test_state_is_3x_or_4x_plus_a_step_per_parameter() -> None:
    assert state_bytes(P, False) == 3 * TOTAL + 3 * STEP_BYTES
    assert state_bytes(P, True) == 4 * TOTAL + 3 * STEP_BYTES
    assert state_bytes([], True) == 0


def test_a_cpu_and_a_gpu_footprint() -> None:
    cpu = footprint([(P, {})], "cpu")
    assert cpu == Footprint("cpu", 3 * TOTAL + 3 * STEP_BYTES, TOTAL, 2 * LARGEST, 0)
    assert cpu.on_device == cpu.total == 3 * TOTAL + 12 + TOTAL + 2 * LARGEST
    gpu = footprint([(P, {"amsgrad": True})], "cuda:1")
    assert gpu == Footprint("cuda", 4 * TOTAL + 3 * STEP_BYTES, TOTAL, TOTAL, 2 * TOTAL)
    assert gpu.on_device == 4 * TOTAL + 12 + TOTAL + TOTAL
    assert gpu.total == gpu.on_device + 2 * TOTAL
    assert gpu.as_dict() == {
        "state": gpu.state,
        "gradients": TOTAL,
        "workspace": TOTAL,
        "pinned": 2 * TOTAL,
        "on_device": gpu.on_device,
        "total": gpu.total,
    }
    assert CONTEXT_BYTES == 512 * 2**20


def test_groups_add_up_but_their_workspaces_do_not() -> None:
    """Groups step one after the other: the peak is the largest group's workspace."""
    fp = footprint([([4000], {}), ([400, 40], {"amsgrad": True, "maximize": True})], "cpu")
    assert fp.state == (3 * 4000 + 4) + (4 * 440 + 8)
    assert fp.gradients == TOTAL
    assert fp.workspace == max(2 * 4000, 3 * 400)


def test_a_stepper_reports_its_footprint_under_its_current_options() -> None:
    s = Stepper(
        "s",
        "adam",
        torch.device("cpu"),
        [("w", torch.zeros(100)), ("b", torch.zeros(10))],
        {"lr": 0.1},
    )
    assert s.footprint() == footprint([([400, 40], s.optimizer.param_groups[0])], "cpu")
    assert s.summary()["footprint"] == s.footprint().as_dict()
    before = s.footprint()
    s.set_hyperparameters({"foreach": True})
    assert s.footprint().workspace == 440 != before.workspace
    s.set_hyperparameters({"foreach": None, "fused": True})
    assert s.footprint().workspace == 0
    s.step({"w": torch.ones(100), "b": torch.ones(10)})
    assert s.summary()["state_bytes"] == s.footprint().state


# ---------------------------------------------------------------------- on a GPU


GPU_CASES = [
    {"foreach": False},
    {"foreach": False, "maximize": True, "weight_decay": 0.1},
    {"foreach": True},
    {"foreach": True, "maximize": True, "weight_decay": 0.1},
    {"foreach": True, "capturable": True},
    {"foreach": False, "capturable": True},
    {"fused": True},
    {"fused": True, "amsgrad": True},
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "options", GPU_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_the_workspace_estimate_covers_what_the_step_allocates(options: dict[str, Any]) -> None:
    """A step after the first (state allocated) allocates temporaries only: their peak,
    measured by the caching allocator, is at most the estimate (the estimate counts bytes;
    the allocator rounds each block up to 512 bytes)."""
    device = torch.device("cuda")
    shapes = [(1000, 100), (4096,), (77, 3)]
    params = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    opt = torch.optim.Adam(params, lr=1e-3, **options)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        opt.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
    sizes = [p.numel() * p.element_size() for p in params]
    estimate = workspace_bytes(sizes, opt.param_groups[0], "cuda")
    rounding = 512 * 8 * len(sizes)
    assert peak <= estimate + rounding, (peak, estimate)
