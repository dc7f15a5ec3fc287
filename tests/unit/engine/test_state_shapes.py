"""A tensor with the right number of elements in the wrong shape is refused on every path
that loads one into a stepper, and the stepper stays byte-identical.

Element counts alone would not catch these: ``[12]`` or ``[4, 3]`` for a ``[3, 4]``
parameter, ``[1]`` for a scalar. A check that compared ``numel()`` (or reshaped a tensor
whose count fits) would silently scramble Adam's moments or the parameters; PyTorch's own
``load_state_dict`` does not check state shapes, so nothing downstream would notice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_stepper import grad_for, make, snapshot, stepped

from adamscope.client import codec
from adamscope.service.engine import Stepper
from adamscope.service.engine import checkpoint as ckpt
from adamscope.service.engine.errors import EngineError, InvalidCheckpoint, ShapeMismatch
from adamscope.service.inspect.dryrun import dry_run

#: Same element count, other shape, for each parameter of test_engine.PARAMS
#: (w: [3, 4], b: [4], s: []).
WRONG = {
    "w": [(12,), (4, 3), (2, 6), (1, 3, 4)],
    "b": [(1, 4), (4, 1), (2, 2)],
    "s": [(1,), (1, 1)],
}
CASES = [(n, shape) for n, shapes in WRONG.items() for shape in shapes]
IDS = [f"{n}-{list(shape)}" for n, shape in CASES]


def fresh(amsgrad: bool = True) -> Stepper:
    """A stepper of PARAMS that has stepped (so every state tensor exists)."""
    return stepped(make("adam", foreach=False, amsgrad=amsgrad)[0])


def refused(
    stepper: Stepper, call: Callable[[], Any], error: type[EngineError], *fragments: str
) -> None:
    before = snapshot(stepper)
    with pytest.raises(error) as info:
        call()
    for fragment in fragments:
        assert fragment in info.value.detail
    assert snapshot(stepper) == before
    assert all(p.grad is None for p in stepper.params)


def reshaped(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return t.detach().clone().reshape(shape)


def full_state(stepper: Stepper) -> dict[str, dict[str, torch.Tensor]]:
    return stepper.get_state()[1]


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize(("name", "shape"), CASES, ids=IDS)
def test_put_state_single_tensor(name: str, shape: tuple[int, ...], key: str) -> None:
    stepper = fresh()
    bad = reshaped(full_state(stepper)[name][key], shape)
    refused(
        stepper,
        lambda: stepper.put_state({name: {key: bad}}),
        ShapeMismatch,
        f"{key} for {name!r} has shape {list(shape)}",
    )


@pytest.mark.parametrize(("name", "shape"), CASES, ids=IDS)
def test_put_state_full_load(name: str, shape: tuple[int, ...]) -> None:
    """A whole state (as a torch state_dict carries it, replace=True) with one tensor
    reshaped: nothing of it is loaded."""
    stepper = fresh()
    state = full_state(stepper)
    state[name]["exp_avg_sq"] = reshaped(state[name]["exp_avg_sq"], shape)
    groups = [{"lr": 0.5}]  # options ride along: they must not be applied either
    refused(
        stepper,
        lambda: stepper.put_state(state, groups, replace=True),
        ShapeMismatch,
        f"exp_avg_sq for {name!r} has shape {list(shape)}",
    )


def test_put_state_full_load_from_a_local_torch_state_dict() -> None:
    """The path RemoteAdam.load_state_dict takes: torch's state_dict of a local twin, whose
    own load_state_dict does not look at state shapes."""
    stepper, optimizer, local = make("adam", foreach=False)
    stepped(stepper)
    for k in range(2):
        for i, p in enumerate(local.values()):
            p.grad = grad_for(p, k, i)
        optimizer.step()
    sd = optimizer.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].reshape(4, 3)
    twin = torch.optim.Adam(
        [torch.zeros(3, 4, requires_grad=True), torch.zeros(4), torch.zeros(())], foreach=False
    )
    twin.load_state_dict(sd)  # PyTorch accepts it
    names = list(local)
    state = {names[i]: dict(s) for i, s in sd["state"].items()}
    refused(
        stepper,
        lambda: stepper.put_state(state, replace=True),
        ShapeMismatch,
        "exp_avg for 'w' has shape [4, 3], parameter has [3, 4]",
    )


@pytest.mark.parametrize(("name", "shape"), CASES, ids=IDS)
def test_put_params(name: str, shape: tuple[int, ...]) -> None:
    stepper = fresh()
    value = reshaped(stepper.get_params()[1][name] + 1, shape)
    refused(
        stepper,
        lambda: stepper.put_params({name: value}),
        ShapeMismatch,
        f"value for {name!r} has shape {list(shape)}",
    )


@pytest.mark.parametrize(("name", "shape"), CASES, ids=IDS)
def test_step_gradients(name: str, shape: tuple[int, ...]) -> None:
    stepper = fresh()
    _, params = stepper.get_params()
    grads = {n: torch.ones_like(p) for n, p in params.items()}
    grads[name] = grads[name].reshape(shape)
    refused(
        stepper,
        lambda: stepper.step(grads, key="k1"),
        ShapeMismatch,
        f"gradient for {name!r} has shape {list(shape)}",
    )
    refused(
        stepper,
        lambda: stepper.check_gradient(name, list(shape), torch.float32),
        ShapeMismatch,
        f"gradient for {name!r} has shape {list(shape)}",
    )
    # The refused step spent nothing: the same key applies a good step afterwards.
    grads[name] = torch.ones_like(params[name])
    assert not stepper.step(grads, key="k1").replayed


@pytest.mark.parametrize(("name", "shape"), CASES, ids=IDS)
def test_contributed_gradients(name: str, shape: tuple[int, ...]) -> None:
    stepper = fresh()
    g = torch.ones(()).expand(shape).clone()
    refused(
        stepper,
        lambda: stepper.contribute(0, 2, {name: g}),
        ShapeMismatch,
        f"gradient for {name!r} has shape {list(shape)}",
    )
    assert stepper.pending_contributions() == []


@pytest.mark.parametrize(("name", "shape"), CASES, ids=IDS)
def test_dry_run_gradients(name: str, shape: tuple[int, ...]) -> None:
    stepper = fresh()
    g = torch.ones(()).expand(shape).clone()
    refused(
        stepper,
        lambda: dry_run(stepper, {name: g}),
        ShapeMismatch,
        f"gradient for {name!r} has shape {list(shape)}",
    )


def tampered(stepper: Stepper, tensor: str, shape: tuple[int, ...]) -> ckpt.Checkpoint:
    """The stepper's checkpoint with one tensor stored in another shape (same bytes)."""
    tensors, metadata = codec.decode(ckpt.encode(stepper).data)
    tensors[tensor] = tensors[tensor].reshape(shape)
    return ckpt.decode(codec.encode(tensors, metadata))


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize(("name", "shape"), CASES, ids=IDS)
def test_checkpoint_import_state(name: str, shape: tuple[int, ...], key: str) -> None:
    """Importing a checkpoint (a new stepper) and rolling one back (load_into)."""
    stepper = fresh()
    bad = tampered(stepper, f"state/{name}/{key}", shape)
    with pytest.raises(InvalidCheckpoint, match=rf"{key} for '{name}' has shape"):
        ckpt.build(bad, torch.device("cpu"))
    target = fresh()
    stepped(target, 1)
    refused(
        target,
        lambda: ckpt.load_into(target, bad),
        InvalidCheckpoint,
        f"{key} for {name!r} has shape {list(shape)}",
    )


@pytest.mark.parametrize(("name", "shape"), CASES, ids=IDS)
def test_checkpoint_rollback_param(name: str, shape: tuple[int, ...]) -> None:
    """A snapshot whose parameter has another shape does not fit the stepper (whereas
    importing it builds a stepper of that shape, whose state then no longer fits)."""
    stepper = fresh()
    bad = tampered(stepper, f"param/{name}", shape)
    refused(
        stepper,
        lambda: ckpt.load_into(stepper, bad),
        InvalidCheckpoint,
        f"parameter {name!r} is float32{list(shape)}, stepper has float32",
    )
    with pytest.raises(
        InvalidCheckpoint,
        match=rf"for '{name}' has shape .*, parameter has "
        rf"{list(shape)}".replace("[", r"\["),
    ):
        ckpt.build(bad, torch.device("cpu"))
