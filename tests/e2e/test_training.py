"""End to end: train an MLP through `adamscope serve` and match local training bit for bit.

The server is the console script's code path (``python -m adamscope.service.cli serve``) in its own
process; the training loop is an ordinary PyTorch loop with an LR scheduler (OneCycleLR,
which also cycles Adam's beta1) and gradient clipping, once with RemoteAdam and once with
torch.optim.Adam. Every loss, the final parameters and the full state_dict must be equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import spawn_server
from torch import nn

from adamscope.client import Client, RemoteAdam

pytestmark = pytest.mark.e2e

STEPS = 120
BATCH = 32


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=gen)
    w = torch.randn(8, 1, generator=gen)
    y = torch.sin(x @ w) + 0.1 * torch.randn(256, 1, generator=gen)
    return x, y


def train(
    model: nn.Module, opt: torch.optim.Optimizer, data: tuple[torch.Tensor, torch.Tensor]
) -> list[torch.Tensor]:
    x, y = data
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=STEPS)
    order = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(STEPS):
        idx = torch.randint(0, x.shape[0], (BATCH,), generator=order)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        scheduler.step()
        losses.append(loss.detach())
    return losses


def assert_same(expected: Any, actual: Any, where: str = "state_dict") -> None:
    """Exact equality of state_dict structures (tensors: dtype, shape and every bit)."""
    if torch.is_tensor(expected):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(expected, actual), where
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for k in expected:
            assert_same(expected[k], actual[k], f"{where}[{k!r}]")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def test_mlp_training_matches_local_adam_bit_for_bit(tmp_path: Path) -> None:
    data = make_data()
    local_model, remote_model = make_model(), make_model()
    local = torch.optim.Adam(
        local_model.named_parameters(), lr=0.02, weight_decay=1e-4, amsgrad=True
    )
    local_losses = train(local_model, local, data)

    with spawn_server(tmp_path / "data", "--device", "cpu") as url, Client(url) as client:
        remote = RemoteAdam(
            remote_model.named_parameters(),
            lr=0.02,
            weight_decay=1e-4,
            amsgrad=True,
            client=client,
            name="e2e-mlp",
        )
        remote_losses = train(remote_model, remote, data)

        summary = client.get("e2e-mlp")
        assert summary.step == STEPS
        assert [p.name for p in summary.params] == [n for n, _ in remote_model.named_parameters()]
        remote_sd = remote.state_dict()

    assert remote_losses[-1] < 0.5 * remote_losses[0]  # it really trained
    assert torch.equal(torch.stack(local_losses), torch.stack(remote_losses))
    assert torch.equal(local_losses[-1], remote_losses[-1])
    for (name, p), (_, q) in zip(
        local_model.named_parameters(), remote_model.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    assert_same(local.state_dict(), remote_sd)
    assert remote_sd["state"][0]["step"].item() == STEPS
