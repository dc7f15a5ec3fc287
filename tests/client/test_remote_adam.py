"""RemoteAdam as a drop-in torch.optim.Adam: construction, training-loop API, attaching.

Everything a training loop touches must behave as with torch.optim.Adam (validation
messages, param groups, zero_grad, schedulers, closures) and stay bit-exact with a local
twin; an existing stepper of the same name is resumed, or refused if it does not fit.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from remote_support import assert_params_equal, assert_same, lockstep, make_params, unique
from torch import nn

from adamscope.client import Client, RemoteAdam, RemoteAdamW, RemoteOptimizerMismatch
from adamscope.client.errors import StepperNotFoundError

DATA_GEN = torch.Generator().manual_seed(123)
X = torch.randn(16, 4, generator=DATA_GEN)
Y = torch.randn(16, 2, generator=DATA_GEN)


@pytest.fixture(scope="module")
def sync_client(live_server: Any) -> Iterator[Client]:
    """One synchronous client per module, talking to the session's live server."""
    with Client(live_server.url) as c:
        yield c


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def loss_of(model: nn.Module) -> torch.Tensor:
    return nn.functional.mse_loss(model(X), Y)


def train_pair(
    local_model: nn.Module,
    local: torch.optim.Optimizer,
    remote_model: nn.Module,
    remote: torch.optim.Optimizer,
    steps: int,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """The usual loop (zero_grad, backward, step) on both; parameters equal after each step."""
    for i in range(steps):
        for model, opt in ((local_model, local), (remote_model, remote)):
            opt.zero_grad()
            loss_of(model).backward()
            opt.step()
        if after_step is not None:
            after_step(i)
        assert_params_equal(list(local_model.parameters()), list(remote_model.parameters()))


@pytest.fixture
def remote_names(sync_client: Client) -> Iterator[list[str]]:
    """Names of steppers a test creates through RemoteAdam; deleted afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        with contextlib.suppress(StepperNotFoundError):
            sync_client.delete(n)


def remote_adam(
    cls: type[RemoteAdam] | type[RemoteAdamW],
    params: Any,
    names: list[str],
    client: Client,
    name: str | None = None,
    **kwargs: Any,
) -> Any:
    name = name or unique("ra")
    names.append(name)
    return cls(params, client=client, name=name, **kwargs)


# ---------------------------------------------------------------------------- construction


def test_is_a_torch_optimizer(sync_client: Client, remote_names: list[str]) -> None:
    adam = remote_adam(RemoteAdam, mlp().parameters(), remote_names, sync_client)
    adamw = remote_adam(RemoteAdamW, mlp().parameters(), remote_names, sync_client)
    assert sync_client.get(adam.name).optimizer == "adam"
    assert sync_client.get(adamw.name).optimizer == "adamw"
    assert isinstance(adam, torch.optim.Adam)
    assert isinstance(adamw, torch.optim.AdamW)
    assert isinstance(adam, torch.optim.Optimizer)


def test_accepts_model_parameters(sync_client: Client, remote_names: list[str]) -> None:
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=0.01)
    remote = remote_adam(RemoteAdam, remote_model.parameters(), remote_names, sync_client, lr=0.01)
    summary = sync_client.get(remote.name)
    assert [p.name for p in summary.params] == ["0", "1", "2", "3"]
    assert [p.shape for p in summary.params] == [[8, 4], [8], [2, 8], [2]]
    train_pair(local_model, local, remote_model, remote, steps=10)
    assert_same(local.state_dict(), remote.state_dict())


def test_accepts_named_parameters(sync_client: Client, remote_names: list[str]) -> None:
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.AdamW(local_model.named_parameters(), lr=0.01)
    remote = remote_adam(
        RemoteAdamW, remote_model.named_parameters(), remote_names, sync_client, lr=0.01
    )
    names = [n for n, _ in remote_model.named_parameters()]
    assert [p.name for p in sync_client.get(remote.name).params] == names
    train_pair(local_model, local, remote_model, remote, steps=10)
    remote_sd = remote.state_dict()
    assert remote_sd["param_groups"][0]["param_names"] == names
    assert_same(local.state_dict(), remote_sd)


@pytest.mark.parametrize("named", [False, True], ids=["tensors", "named"])
def test_accepts_param_group_dicts_with_per_group_options(
    named: bool, sync_client: Client, remote_names: list[str]
) -> None:
    def groups(model: nn.Sequential) -> list[dict[str, Any]]:
        first, last = model[0], model[2]
        take = (lambda m: list(m.named_parameters())) if named else (lambda m: m.parameters())
        return [
            {"params": take(first), "lr": 0.05},
            {
                "params": [last.weight] if not named else [("2.weight", last.weight)],
                "weight_decay": 0.1,
            },
            {
                "params": [last.bias] if not named else [("2.bias", last.bias)],
                "lr": 0.2,
                "betas": (0.5, 0.9),
            },
        ]

    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(groups(local_model), lr=0.01)
    remote = remote_adam(RemoteAdam, groups(remote_model), remote_names, sync_client, lr=0.01)
    server_groups = sync_client.get(remote.name).groups
    assert [g.lr for g in server_groups] == [0.05, 0.01, 0.2]
    assert [g.weight_decay for g in server_groups] == [0, 0.1, 0]
    assert server_groups[2].betas == (0.5, 0.9)
    if named:
        assert [g.params for g in server_groups] == [["weight", "bias"], ["2.weight"], ["2.bias"]]
    train_pair(local_model, local, remote_model, remote, steps=10)
    assert_same(local.state_dict(), remote.state_dict())


INVALID = [
    pytest.param({"lr": -1}, "Invalid learning rate: -1", id="lr"),
    pytest.param({"eps": -1e-8}, "Invalid epsilon value: -1e-08", id="eps"),
    pytest.param({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0", id="beta1"),
    pytest.param({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1", id="weight_decay"),
]


@pytest.mark.parametrize("cls", [RemoteAdam, RemoteAdamW], ids=["adam", "adamw"])
@pytest.mark.parametrize(("kwargs", "message"), INVALID)
def test_invalid_options_raise_pytorchs_valueerror_locally(
    cls: type[RemoteAdam], kwargs: dict[str, Any], message: str, sync_client: Client
) -> None:
    torch_cls = torch.optim.AdamW if cls is RemoteAdamW else torch.optim.Adam
    with pytest.raises(ValueError) as local_error:
        torch_cls(mlp().parameters(), **kwargs)
    name = unique("invalid")
    with pytest.raises(ValueError) as remote_error:
        cls(mlp().parameters(), client=sync_client, name=name, **kwargs)
    assert str(remote_error.value) == str(local_error.value) == message
    assert type(remote_error.value) is type(local_error.value)
    with pytest.raises(StepperNotFoundError):
        sync_client.get(name)


def test_mixing_named_and_unnamed_parameters_is_refused(sync_client: Client) -> None:
    model = mlp()
    params = [("0.weight", model[0].weight), model[0].bias]
    with pytest.raises(ValueError, match="either named or unnamed"):
        RemoteAdam(params, client=sync_client, name=unique("mix"))


def test_add_param_group_after_creation_raises(
    sync_client: Client, remote_names: list[str]
) -> None:
    model = mlp()
    opt = remote_adam(RemoteAdam, model[0].parameters(), remote_names, sync_client)
    with pytest.raises(NotImplementedError, match="fixed when its stepper is created"):
        opt.add_param_group({"params": model[2].parameters()})
    assert len(opt.param_groups) == 1
    assert len(sync_client.get(opt.name).params) == 2


def test_sparse_gradients_are_refused_as_pytorch_does(
    sync_client: Client, remote_names: list[str]
) -> None:
    local_emb, remote_emb = nn.Embedding(10, 3, sparse=True), nn.Embedding(10, 3, sparse=True)
    local = torch.optim.Adam(local_emb.parameters())
    remote = remote_adam(RemoteAdam, remote_emb.parameters(), remote_names, sync_client)
    for emb in (local_emb, remote_emb):
        emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError) as local_error:
        local.step()
    with pytest.raises(RuntimeError) as remote_error:
        remote.step()
    assert str(remote_error.value) == str(local_error.value)
    assert "does not support sparse gradients" in str(local_error.value)
    assert sync_client.get(remote.name).step == 0


# ---------------------------------------------------------------------- training-loop API


def test_zero_grad(sync_client: Client, remote_names: list[str]) -> None:
    model = mlp()
    opt = remote_adam(RemoteAdam, model.parameters(), remote_names, sync_client)
    loss_of(model).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_step_without_any_gradient_changes_nothing(
    sync_client: Client, remote_names: list[str]
) -> None:
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters())
    remote = remote_adam(RemoteAdam, remote_model.parameters(), remote_names, sync_client)
    before = [p.detach().clone() for p in remote_model.parameters()]
    local.step()
    remote.step()
    assert_params_equal(before, list(remote_model.parameters()))
    assert_same(local.state_dict(), remote.state_dict())
    assert remote.state_dict()["state"] == {}


def test_param_group_edits_propagate(sync_client: Client, remote_names: list[str]) -> None:
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=0.01)
    remote = remote_adam(RemoteAdam, remote_model.parameters(), remote_names, sync_client, lr=0.01)
    edits: dict[int, dict[str, Any]] = {
        2: {"lr": 0.05},
        4: {"betas": (0.8, 0.95), "eps": 1e-6},
        6: {"weight_decay": 0.1, "maximize": True},
        8: {"lr": 0.002, "maximize": False, "decoupled_weight_decay": True},
    }

    def edit(i: int) -> None:
        for opt in (local, remote):
            opt.param_groups[0].update(edits.get(i, {}))

    train_pair(local_model, local, remote_model, remote, steps=10, after_step=edit)
    group = sync_client.get(remote.name).groups[0]
    assert (
        group.lr,
        group.betas,
        group.eps,
        group.weight_decay,
        group.maximize,
        group.decoupled_weight_decay,
    ) == (0.002, (0.8, 0.95), 1e-6, 0.1, False, True)
    assert_same(local.state_dict(), remote.state_dict())


SCHEDULERS: list[Any] = [
    pytest.param(
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5), id="StepLR"
    ),
    pytest.param(
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1 / (1 + e)), id="LambdaLR"
    ),
    pytest.param(
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.1, total_steps=20, cycle_momentum=True
        ),
        id="OneCycleLR-betas",
    ),
]


@pytest.mark.parametrize("make_scheduler", SCHEDULERS)
def test_lr_schedulers_stay_bit_exact(
    make_scheduler: Callable[[Any], Any], sync_client: Client, remote_names: list[str]
) -> None:
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=0.05)
    remote = remote_adam(RemoteAdam, remote_model.parameters(), remote_names, sync_client, lr=0.05)
    schedulers = [make_scheduler(local), make_scheduler(remote)]
    seen_lrs: set[float] = set()
    seen_betas: set[tuple[float, float]] = set()

    def advance(i: int) -> None:
        for s in schedulers:
            s.step()
        seen_lrs.add(remote.param_groups[0]["lr"])
        seen_betas.add(tuple(remote.param_groups[0]["betas"]))

    train_pair(local_model, local, remote_model, remote, steps=19, after_step=advance)
    assert len(seen_lrs) > 2  # the schedule really moved the learning rate
    # The last scheduler change has not been sent yet (it travels with the next step).
    remote.zero_grad()
    loss_of(remote_model).backward()
    local.zero_grad()
    loss_of(local_model).backward()
    local.step()
    remote.step()
    group = sync_client.get(remote.name).groups[0]
    assert group.lr == local.param_groups[0]["lr"]
    assert group.betas == tuple(local.param_groups[0]["betas"])
    if "OneCycle" in type(schedulers[0]).__name__:
        assert len(seen_betas) > 2  # beta1 cycled, and the server followed
    assert_params_equal(list(local_model.parameters()), list(remote_model.parameters()))
    assert_same(local.state_dict(), remote.state_dict())


def test_closure(sync_client: Client, remote_names: list[str]) -> None:
    local_model, remote_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=0.01)
    remote = remote_adam(RemoteAdam, remote_model.parameters(), remote_names, sync_client, lr=0.01)

    def closure_for(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_of(model)
            loss.backward()
            return loss

        return closure

    for _ in range(5):
        with torch.no_grad():  # step() must enable grad for the closure itself
            local_loss = local.step(closure_for(local_model, local))
            remote_loss = remote.step(closure_for(remote_model, remote))
        assert isinstance(remote_loss, torch.Tensor)
        assert torch.equal(local_loss, remote_loss)
        assert_params_equal(list(local_model.parameters()), list(remote_model.parameters()))
    assert_same(local.state_dict(), remote.state_dict())


def test_step_hooks_run(sync_client: Client, remote_names: list[str]) -> None:
    model = mlp()
    opt = remote_adam(RemoteAdam, model.parameters(), remote_names, sync_client)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    loss_of(model).backward()
    opt.step()
    assert calls == ["pre", "post"]
    assert sync_client.get(opt.name).step == 1


# -------------------------------------------------------------------------------- attaching


def test_attaching_to_an_existing_stepper_resumes(
    sync_client: Client, remote_names: list[str]
) -> None:
    name = unique("resume")
    local_model, first_model = mlp(), mlp()
    local = torch.optim.Adam(local_model.parameters(), lr=0.02, amsgrad=True)
    first = remote_adam(
        RemoteAdam,
        first_model.parameters(),
        remote_names,
        sync_client,
        name=name,
        lr=0.02,
        amsgrad=True,
    )
    train_pair(local_model, local, first_model, first, steps=5)

    # A new process: fresh weights and other options; the stepper's win.
    second_model = mlp(seed=99)
    assert not torch.equal(next(second_model.parameters()), next(first_model.parameters()))
    second = RemoteAdam(second_model.parameters(), lr=0.5, client=sync_client, name=name)
    assert_params_equal(list(local_model.parameters()), list(second_model.parameters()))
    assert (second.param_groups[0]["lr"], second.param_groups[0]["amsgrad"]) == (0.02, True)
    assert [s.name for s in sync_client.list()].count(name) == 1

    train_pair(local_model, local, second_model, second, steps=5)
    assert_same(local.state_dict(), second.state_dict())
    assert sync_client.get(name).step == 10


MISMATCHES = [
    pytest.param(
        lambda: nn.Linear(3, 2), RemoteAdam, "remote [2, 4] float32, local [2, 3]", id="shape"
    ),
    pytest.param(lambda: nn.Linear(4, 2).double(), RemoteAdam, "local [2, 4] float64", id="dtype"),
    pytest.param(
        lambda: nn.Linear(4, 2), RemoteAdamW, "optimizer is adam, not adamw", id="optimizer"
    ),
    pytest.param(
        lambda: nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2)),
        RemoteAdam,
        "param groups",
        id="parameter-count",
    ),
]


@pytest.mark.parametrize(("make_model", "cls", "expected"), MISMATCHES)
def test_attaching_with_different_parameters_raises(
    make_model: Callable[[], nn.Module],
    cls: type[RemoteAdam],
    expected: str,
    sync_client: Client,
    remote_names: list[str],
) -> None:
    name = unique("mismatch")
    existing = nn.Linear(4, 2)
    opt = remote_adam(RemoteAdam, existing.parameters(), remote_names, sync_client, name=name)
    existing(torch.ones(1, 4)).sum().backward()
    opt.step()
    before = sync_client.get_params(name)
    state_before = sync_client.state_dict(name)

    other = make_model()
    other_values = copy.deepcopy(list(other.parameters()))
    with pytest.raises(RemoteOptimizerMismatch) as error:
        cls(other.parameters(), client=sync_client, name=name)
    assert expected in str(error.value)
    assert isinstance(error.value, ValueError)
    # Neither side was touched.
    assert_params_equal(other_values, list(other.parameters()))
    after = sync_client.get_params(name)
    assert before.keys() == after.keys()
    assert_params_equal(list(before.values()), list(after.values()))
    assert_same(state_before, sync_client.state_dict(name))


def test_remote_adam_with_plain_tensors_and_lockstep(
    sync_client: Client, remote_names: list[str]
) -> None:
    """Bare leaf tensors (no nn.Module), including one that skips steps."""
    shapes = [(3, 3), (2,), (4,)]
    local_params = make_params(shapes, torch.float32, seed=4)
    remote_params = make_params(shapes, torch.float32, seed=4)
    local = torch.optim.Adam(local_params, lr=0.03)
    remote = remote_adam(RemoteAdam, remote_params, remote_names, sync_client, lr=0.03)
    lockstep(local, local_params, remote, remote_params, steps=12, seed=2)
    assert_same(local.state_dict(), remote.state_dict())


def test_tensor_lr_is_refused_rather_than_silently_rounded(live_server):
    """PyTorch computes with a tensor lr in float32; a float on the wire would not match."""
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="tensor-valued lr"):
        RemoteAdam([p], lr=torch.tensor(0.01), url=live_server.url, name="tensor-lr-refused")
    from adamscope.client import Client

    with Client(live_server.url) as c:
        assert "tensor-lr-refused" not in [s.name for s in c.list()]


def test_durability_policy_is_chosen_at_creation(live_server):
    p = torch.nn.Parameter(torch.ones(3))
    name = unique("durable")
    opt = RemoteAdam(
        [p], lr=0.1, url=live_server.url, name=name, durability={"mode": "every_n", "n": 10}
    )
    try:
        summary = opt.remote_summary()
        assert summary.durability is not None
        assert (summary.durability.mode, summary.durability.n) == ("every_n", 10)
    finally:
        opt.client.delete(name)
        opt.close()
