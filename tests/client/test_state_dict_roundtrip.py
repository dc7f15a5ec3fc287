"""state_dict round trips between local torch.optim optimizers and remote steppers.

A state_dict moved either way must let training continue bit for bit as if it had never
moved; options travel with it exactly as ``Optimizer.load_state_dict`` makes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from remote_support import (
    OPTIMIZERS,
    SHAPES,
    assert_params_equal,
    assert_same,
    lockstep,
    make_params,
    set_grads,
    skipped,
    twin,
    unique,
)

from adamscope.client import Client, RemoteAdam
from adamscope.client.errors import ShapeMismatchError, StepperNotFoundError

VARIANTS = [
    pytest.param("adam", {"foreach": False, "amsgrad": True}, id="adam-forloop-amsgrad"),
    pytest.param("adam", {"fused": True, "weight_decay": 0.1}, id="adam-fused-wd"),
    pytest.param("adamw", {"foreach": True, "maximize": True}, id="adamw-foreach-maximize"),
    pytest.param("adamw", {"fused": True, "amsgrad": True}, id="adamw-fused-amsgrad"),
]


@pytest.fixture(scope="module")
def sync_client(live_server: Any) -> Iterator[Client]:
    """One synchronous client per module, talking to the session's live server."""
    with Client(live_server.url) as c:
        yield c


def train(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        set_grads([params], gen, skip=skipped(step))
        opt.step()


@pytest.mark.parametrize(("optimizer", "options"), VARIANTS)
def test_local_state_dict_loads_into_remote(
    optimizer: str, options: dict[str, Any], sync_client: Client
) -> None:
    local_cls, remote_cls = OPTIMIZERS[optimizer]
    local_params = make_params(SHAPES, torch.float32)
    local = local_cls(local_params, lr=1e-2, **options)
    train(local, local_params, steps=4, seed=3)  # the skipping parameter has no state yet
    assert len(local.state_dict()["state"]) == len(SHAPES) - 1

    remote_params = twin(local_params)
    remote = remote_cls(remote_params, lr=1e-2, **options, client=sync_client, name=unique("l2r"))
    try:
        remote.load_state_dict(local.state_dict())
        assert_same(local.state_dict(), remote.state_dict())
        lockstep(local, local_params, remote, remote_params, steps=8, seed=4, skip_from=4)
        assert_same(local.state_dict(), remote.state_dict())
    finally:
        sync_client.delete(remote.name)


@pytest.mark.parametrize(("optimizer", "options"), VARIANTS)
def test_remote_state_dict_loads_into_local(
    optimizer: str, options: dict[str, Any], sync_client: Client
) -> None:
    local_cls, remote_cls = OPTIMIZERS[optimizer]
    remote_params = make_params(SHAPES, torch.float32)
    remote = remote_cls(remote_params, lr=1e-2, **options, client=sync_client, name=unique("r2l"))
    try:
        train(remote, remote_params, steps=6, seed=5)
        local_params = twin(remote_params)
        local = local_cls(local_params, lr=1e-2, **options)
        local.load_state_dict(remote.state_dict())
        assert_same(remote.state_dict(), local.state_dict())
        lockstep(local, local_params, remote, remote_params, steps=8, seed=6, skip_from=6)
        assert_same(local.state_dict(), remote.state_dict())
    finally:
        sync_client.delete(remote.name)


def test_client_state_dict_uses_pytorch_indices_across_groups(sync_client: Client) -> None:
    """Client.state_dict/load_state_dict number parameters in group order, as PyTorch does,
    even when the groups list them in another order than the stepper's parameters."""
    names = ["a", "b", "c", "d"]
    init = dict(zip(names, make_params(SHAPES, torch.float64), strict=True))
    groups = [{"params": ["c", "a"], "lr": 0.05}, {"params": ["d", "b"], "weight_decay": 0.1}]
    local_params = {n: p.detach().clone().requires_grad_(True) for n, p in init.items()}
    local = torch.optim.Adam(
        [
            {"params": [local_params["c"], local_params["a"]], "lr": 0.05},
            {"params": [local_params["d"], local_params["b"]], "weight_decay": 0.1},
        ],
        lr=1e-2,
        amsgrad=True,
    )
    order = ["c", "a", "d", "b"]  # PyTorch's indices 0..3
    name = unique("client-sd")
    sync_client.create(name, init, groups=groups, lr=1e-2, amsgrad=True)
    try:
        gen = torch.Generator().manual_seed(7)
        for step in range(10):
            grads = {
                n: torch.randn(init[n].shape, generator=gen, dtype=torch.float64) for n in names
            }
            if step % 2:
                del grads["b"]
            for n, p in local_params.items():
                p.grad = grads.get(n)
            local.step()
            reply = sync_client.step(name, grads, return_params=True)
            assert reply.params is not None
            assert_params_equal([local_params[n] for n in names], [reply.params[n] for n in names])
        remote_sd = sync_client.state_dict(name)
        assert_same(local.state_dict(), remote_sd)
        assert remote_sd["param_groups"][0]["params"] == [0, 1]
        assert torch.equal(
            remote_sd["state"][order.index("b")]["exp_avg"],
            local.state[local_params["b"]]["exp_avg"],
        )

        # Load a different (local, further trained) state back through the client.
        for _ in range(3):
            for p in local_params.values():
                p.grad = torch.ones_like(p)
            local.step()
        sync_client.put_params(name, {n: p.detach() for n, p in local_params.items()})
        sync_client.load_state_dict(name, local.state_dict())
        assert_same(local.state_dict(), sync_client.state_dict(name))
        grads = {n: torch.full(init[n].shape, 0.5, dtype=torch.float64) for n in names}
        for n, p in local_params.items():
            p.grad = grads[n]
        local.step()
        reply = sync_client.step(name, grads, return_params=True)
        assert reply.params is not None
        assert_params_equal([local_params[n] for n in names], [reply.params[n] for n in names])
        assert_same(local.state_dict(), sync_client.state_dict(name))
    finally:
        sync_client.delete(name)


@pytest.mark.parametrize("saved_amsgrad", [True, False], ids=["amsgrad-in", "amsgrad-out"])
def test_options_follow_the_loaded_state_dict(saved_amsgrad: bool, sync_client: Client) -> None:
    """As with torch.optim: load_state_dict replaces the group options with the saved ones."""
    source_params = make_params(SHAPES, torch.float32)
    source = torch.optim.Adam(source_params, lr=0.03, amsgrad=saved_amsgrad, weight_decay=0.2)
    train(source, source_params, steps=6, seed=8)
    saved = source.state_dict()

    local_params, remote_params = twin(source_params), twin(source_params)
    # Both start with the other amsgrad and another lr; loading must switch them.
    local = torch.optim.Adam(local_params, lr=1e-3, amsgrad=not saved_amsgrad)
    remote = RemoteAdam(
        remote_params, lr=1e-3, amsgrad=not saved_amsgrad, client=sync_client, name=unique("opts")
    )
    try:
        local.load_state_dict(saved)
        remote.load_state_dict(saved)
        for group in (local.param_groups[0], remote.param_groups[0]):
            assert (group["amsgrad"], group["lr"], group["weight_decay"]) == (
                saved_amsgrad,
                0.03,
                0.2,
            )
        server_group = sync_client.get(remote.name).groups[0]
        assert (server_group.amsgrad, server_group.lr, server_group.weight_decay) == (
            saved_amsgrad,
            0.03,
            0.2,
        )
        lockstep(local, local_params, remote, remote_params, steps=6, seed=9, skip_from=6)
        remote_sd = remote.state_dict()
        assert_same(local.state_dict(), remote_sd)
        assert ("max_exp_avg_sq" in remote_sd["state"][0]) is saved_amsgrad
    finally:
        sync_client.delete(remote.name)


def test_client_load_state_dict_applies_saved_options(sync_client: Client) -> None:
    source_params = make_params([(3,), (2, 2)], torch.float32)
    source = torch.optim.AdamW(source_params, lr=0.02, amsgrad=True, betas=(0.8, 0.9))
    train(source, source_params, steps=1, seed=10)
    name = unique("client-opts")
    sync_client.create(
        name, {"x": source_params[0].detach(), "y": source_params[1].detach()}, optimizer="adamw"
    )
    try:
        sync_client.load_state_dict(name, source.state_dict())
        group = sync_client.get(name).groups[0]
        assert (group.lr, group.amsgrad, group.betas) == (0.02, True, (0.8, 0.9))
        assert_same(source.state_dict(), sync_client.state_dict(name))
    finally:
        sync_client.delete(name)


def test_client_load_state_dict_refuses_other_group_layout(sync_client: Client) -> None:
    """PyTorch's group-count check, before anything is sent: the stepper keeps its state."""
    source_params = make_params([(3,), (2,)], torch.float32)
    source = torch.optim.Adam([{"params": [source_params[0]]}, {"params": [source_params[1]]}])
    name = unique("layout")
    sync_client.create(name, {"x": torch.zeros(3), "y": torch.zeros(2)})
    try:
        sync_client.step(name, {"x": torch.ones(3), "y": torch.ones(2)})
        before = sync_client.state_dict(name)
        with pytest.raises(ValueError) as local_error:
            torch.optim.Adam(
                [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
            ).load_state_dict(source.state_dict())
        with pytest.raises(ValueError) as client_error:
            sync_client.load_state_dict(name, source.state_dict())
        assert str(client_error.value) == str(local_error.value)
        assert_same(before, sync_client.state_dict(name))
    finally:
        sync_client.delete(name)
    with pytest.raises(StepperNotFoundError):
        sync_client.state_dict(name)


def test_rejected_load_leaves_both_sides_as_they_were(sync_client: Client) -> None:
    """PyTorch's load_state_dict does not check state shapes; the service does, atomically.

    A refused load must change neither the stepper (state, options) nor RemoteAdam's
    param_groups, and training then continues bit-exact with a local twin.
    """
    local_params = make_params(SHAPES, torch.float32)
    remote_params = twin(local_params)
    local = torch.optim.Adam(local_params, lr=1e-2)
    remote = RemoteAdam(remote_params, lr=1e-2, client=sync_client, name=unique("bad-load"))
    try:
        lockstep(local, local_params, remote, remote_params, steps=5, seed=11)
        server_before = sync_client.state_dict(remote.name)
        bad = remote.state_dict()
        bad["param_groups"][0]["lr"] = 0.5
        bad["state"][0]["exp_avg"] = torch.zeros(7)
        with pytest.raises(ShapeMismatchError):
            remote.load_state_dict(bad)
        assert remote.param_groups[0]["lr"] == 1e-2
        assert_same(server_before, sync_client.state_dict(remote.name))
        lockstep(local, local_params, remote, remote_params, steps=3, seed=12, skip_from=5)
        assert_same(local.state_dict(), remote.state_dict())
    finally:
        sync_client.delete(remote.name)
