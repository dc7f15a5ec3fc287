"""A tiny local AdamW job: the ground truth for round trips (uninterrupted vs resumed)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class TinyNet(nn.Module):
    """Embedding, two same-shape linears (so shapes alone cannot name them), a head."""

    def __init__(self, tied: bool = False, n_layers: int = 2, out: int = 16, buffer: bool = False):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(n_layers)])
        self.head = nn.Linear(8, out, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        if buffer:
            self.register_buffer("scale", torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(h)


def make_optimizer(
    model: nn.Module, *, named: bool, kind: str = "adamw", layout: str = "decay"
) -> torch.optim.Optimizer:
    """Two groups, amsgrad in the second: ``decay`` (weights, then biases: reorders the
    model's parameters) or ``prefix`` (the first three, then the rest: keeps model order)."""
    params = list(model.named_parameters())
    if layout == "decay":
        decay = [(n, p) for n, p in params if n.endswith("weight")]
        rest = [(n, p) for n, p in params if not n.endswith("weight")]
    else:
        decay, rest = params[:3], params[3:]
    pick = (lambda ps: ps) if named else (lambda ps: [p for _, p in ps])
    groups = [
        {"params": pick(decay), "weight_decay": 0.1},
        {"params": pick(rest), "weight_decay": 0.0, "lr": 5e-3, "amsgrad": True},
    ]
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(groups, lr=1e-2, betas=(0.9, 0.95))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: Iterable[int]) -> None:
    for step in steps:
        tokens = torch.randint(0, 16, (6,), generator=torch.Generator().manual_seed(step))
        model(tokens).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def named_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's live state keyed by parameter name (by identity, not by inference)."""
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: dict(s) for p, s in optimizer.state.items()}
