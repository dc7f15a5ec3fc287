"""The engine's Stepper, without HTTP (service.engine).

Ground truth is PyTorch itself: a Stepper fed the same gradients as a local
``torch.optim.Adam``/``AdamW`` with the same options must end with bit-identical parameters
and state. Every mutation either applies completely or, when any part of its input is
invalid, raises the matching EngineError and leaves the stepper byte-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch

from adamscope.client import codec
from adamscope.service.engine import GroupDef, Stepper
from adamscope.service.engine.errors import (
    DtypeMismatch,
    DuplicateName,
    EngineError,
    InvalidHyperparameter,
    InvalidSpec,
    InvalidState,
    ShapeMismatch,
    UnknownParameter,
)

CPU = torch.device("cpu")
LOCAL = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def initial(shape: Sequence[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    real = torch.complex64 if dtype.is_complex else torch.float64
    return torch.randn(tuple(shape), generator=g, dtype=real).to(dtype)


def grad_for(p: torch.Tensor, step: int, index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + index)
    real = torch.complex64 if p.dtype.is_complex else torch.float64
    return torch.randn(tuple(p.shape), generator=g, dtype=real).to(p.dtype)


PARAMS: list[tuple[str, tuple[int, ...], torch.dtype]] = [
    ("w", (3, 4), torch.float32),
    ("b", (4,), torch.float32),
    ("s", (), torch.float32),
]


def make(
    kind: str = "adam",
    params: Sequence[tuple[str, tuple[int, ...], torch.dtype]] = PARAMS,
    groups: Sequence[tuple[list[str], dict[str, Any]]] | None = None,
    **hyper: Any,
) -> tuple[Stepper, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    """A Stepper and a local PyTorch optimizer built from the same values and options."""
    values = [(n, initial(shape, dt, i)) for i, (n, shape, dt) in enumerate(params)]
    gdefs = None if groups is None else [GroupDef(list(ns), dict(o)) for ns, o in groups]
    stepper = Stepper("s", kind, CPU, values, hyper, gdefs)
    local = {n: t.clone().requires_grad_(True) for n, t in values}
    if groups is None:
        optimizer = LOCAL[kind](list(local.values()), **hyper)
    else:
        optimizer = LOCAL[kind](
            [{"params": [local[n] for n in ns], **o} for ns, o in groups], **hyper
        )
    return stepper, optimizer, local


def step_both(
    stepper: Stepper,
    optimizer: torch.optim.Optimizer,
    local: Mapping[str, torch.Tensor],
    k: int,
    skip: Callable[[str, int], bool] = lambda n, k: False,
) -> None:
    grads = {n: grad_for(p, k, i) for i, (n, p) in enumerate(local.items()) if not skip(n, k)}
    stepper.step(grads)
    for n, p in local.items():
        p.grad = grads[n].clone() if n in grads else None
    optimizer.step()


def assert_matches_local(
    stepper: Stepper, optimizer: torch.optim.Optimizer, local: Mapping[str, torch.Tensor]
) -> None:
    """Parameters and every state tensor bit-identical to the local optimizer's."""
    _, remote_params = stepper.get_params()
    _, remote_state = stepper.get_state()
    for n, p in local.items():
        assert remote_params[n].dtype == p.dtype
        assert torch.equal(remote_params[n], p.detach()), n
        local_state = optimizer.state.get(p, {})
        assert set(remote_state[n]) == set(local_state), n
        for key, value in local_state.items():
            assert remote_state[n][key].dtype == value.dtype, (n, key)
            assert torch.equal(remote_state[n][key], value), (n, key)


def snapshot(stepper: Stepper) -> tuple[bytes, bytes, dict[str, Any]]:
    """Everything observable about a stepper, as bytes (timestamps aside)."""
    step, params = stepper.get_params()
    _, state = stepper.get_state()
    flat = {f"{n}.{k}": t for n, s in state.items() for k, t in s.items()}
    summary = stepper.summary()
    del summary["created_at"], summary["updated_at"]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in stepper.optimizer.param_groups]
    summary["raw_groups"] = groups
    return codec.encode(params, {"step": str(step)}), codec.encode(flat), summary


def stepped(stepper: Stepper, steps: int = 2) -> Stepper:
    for k in range(steps):
        stepper.step(
            {
                n: grad_for(p, k, i)
                for i, (n, p) in enumerate(zip(stepper.names, stepper.params, strict=True))
            }
        )
    return stepper


# ------------------------------------------------------------------------------- parity

CONFIGS: list[tuple[str, str, dict[str, Any], list[tuple[str, tuple[int, ...], torch.dtype]]]] = [
    ("adam-defaults-forloop", "adam", {"foreach": False}, PARAMS),
    ("adam-defaults-auto", "adam", {}, PARAMS),
    (
        "adam-amsgrad-l2-maximize-foreach-f64",
        "adam",
        {"lr": 3e-2, "amsgrad": True, "weight_decay": 0.1, "maximize": True, "foreach": True},
        [("w", (5, 2), torch.float64), ("b", (2,), torch.float64)],
    ),
    (
        "adam-decoupled",
        "adam",
        {"lr": 1e-2, "weight_decay": 0.05, "decoupled_weight_decay": True, "foreach": False},
        PARAMS,
    ),
    (
        "adamw-fused",
        "adamw",
        {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05, "fused": True},
        PARAMS,
    ),
    ("adamw-amsgrad-forloop", "adamw", {"lr": 5e-3, "amsgrad": True, "foreach": False}, PARAMS),
    (
        "adam-mixed-dtypes",
        "adam",
        {"lr": 1e-2, "foreach": False},
        [
            ("h", (6,), torch.bfloat16),
            ("f", (3,), torch.float16),
            ("c", (2, 2), torch.complex64),
            ("d", (3,), torch.float64),
        ],
    ),
    (
        "adam-mixed-dtypes-foreach",
        "adam",
        {"lr": 1e-2, "foreach": True, "amsgrad": True},
        [("h", (6,), torch.bfloat16), ("c", (2, 2), torch.complex64), ("f", (4,), torch.float32)],
    ),
]


@pytest.mark.parametrize(
    ("kind", "hyper", "params"), [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS]
)
def test_steps_match_local_pytorch_bit_for_bit(
    kind: str, hyper: dict[str, Any], params: list[tuple[str, tuple[int, ...], torch.dtype]]
) -> None:
    stepper, optimizer, local = make(kind, params, **hyper)
    second = params[1][0]
    skip = lambda n, k: n == second and k % 3 == 1  # noqa: E731 - skipped on some steps
    for k in range(24):
        step_both(stepper, optimizer, local, k, skip)
    assert_matches_local(stepper, optimizer, local)
    assert stepper.step_count == 24
    steps = {p["name"]: p["step"] for p in stepper.summary()["params"]}
    assert steps[params[0][0]] == 24.0
    assert steps[second] == 24.0 - 8  # skipped at k = 1, 4, ..., 22


def test_groups_with_their_own_options_match_local() -> None:
    groups = [(["w"], {"lr": 0.05, "amsgrad": True}), (["s", "b"], {"weight_decay": 0.2})]
    stepper, optimizer, local = make("adam", groups=groups, foreach=False, betas=(0.85, 0.95))
    for k in range(20):
        step_both(stepper, optimizer, local, k, lambda n, k: n == "s" and k < 5)
    assert_matches_local(stepper, optimizer, local)
    assert stepper.group_names == [["w"], ["s", "b"]]
    assert [g["lr"] for g in stepper.summary()["groups"]] == [0.05, 1e-3]


def test_a_parameter_never_given_a_gradient_has_no_state() -> None:
    stepper, optimizer, local = make("adam", foreach=False)
    for k in range(3):
        outcome = stepper.step({"w": grad_for(local["w"], k, 0)})
        assert outcome.stepped == ["w"] and outcome.skipped == ["b", "s"]
    _, state = stepper.get_state()
    assert state["b"] == {} and state["s"] == {}
    assert set(state["w"]) == {"step", "exp_avg", "exp_avg_sq"}


def test_step_can_return_params_and_does_not_keep_the_given_gradients() -> None:
    stepper, _, local = make("adam")
    grads = {"w": grad_for(local["w"], 0, 0)}
    before = grads["w"].clone()
    outcome = stepper.step(grads, return_params=True)
    assert outcome.params is not None and outcome.step == 1
    _, params = stepper.get_params()
    assert all(torch.equal(outcome.params[n], params[n]) for n in params)
    assert torch.equal(grads["w"], before)
    assert all(p.grad is None for p in stepper.params)


def test_stepper_copies_its_initial_values() -> None:
    value = torch.ones(3)
    stepper = Stepper("s", "adam", CPU, [("a", value)], {"lr": 0.1})
    stepper.step({"a": torch.ones(3)})
    assert torch.equal(value, torch.ones(3))
    assert not torch.equal(stepper.get_params()[1]["a"], value)


# ------------------------------------------------------------------------ mutation semantics


def test_put_params_overwrites_values_and_keeps_state() -> None:
    stepper, optimizer, local = make("adam", foreach=False)
    for k in range(3):
        step_both(stepper, optimizer, local, k)
    new_w = initial((3, 4), torch.float32, 99)
    _, state_before = stepper.get_state()
    stepper.put_params({"w": new_w})
    with torch.no_grad():
        local["w"].copy_(new_w)
    _, params = stepper.get_params()
    assert torch.equal(params["w"], new_w)
    _, state_after = stepper.get_state()
    assert all(torch.equal(state_after["w"][k], v) for k, v in state_before["w"].items())
    for k in range(3, 6):
        step_both(stepper, optimizer, local, k)
    assert_matches_local(stepper, optimizer, local)


def test_put_state_single_tensor_keeps_the_rest_and_steps_like_local() -> None:
    stepper, optimizer, local = make("adam", foreach=False)
    for k in range(3):
        step_both(stepper, optimizer, local, k)
    edited = torch.full((4,), 0.5)
    stepper.put_state({"b": {"exp_avg_sq": edited}})
    optimizer.state[local["b"]]["exp_avg_sq"].copy_(edited)
    assert_matches_local(stepper, optimizer, local)
    for k in range(3, 6):
        step_both(stepper, optimizer, local, k)
    assert_matches_local(stepper, optimizer, local)


def test_put_state_full_load_from_a_local_optimizer_then_steps_alike() -> None:
    stepper, _, _ = make("adamw", foreach=False, amsgrad=True)
    _, optimizer, local = make("adamw", foreach=False, amsgrad=True)
    for k in range(4):
        for i, p in enumerate(local.values()):
            p.grad = grad_for(p, k, i)
        optimizer.step()
    stepper.put_params({n: p.detach() for n, p in local.items()})
    # Clones: like Optimizer.load_state_dict, put_state adopts the tensors it is given.
    stepper.put_state(
        {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in local.items()},
        replace=True,
    )
    assert_matches_local(stepper, optimizer, local)
    for k in range(4, 8):
        step_both(stepper, optimizer, local, k)
    assert_matches_local(stepper, optimizer, local)


def test_put_state_replace_drops_state_not_given() -> None:
    stepper = stepped(make("adam")[0])
    _, state = stepper.get_state()
    stepper.put_state({"w": state["w"]}, replace=True)
    _, after = stepper.get_state()
    assert after["b"] == {} and after["s"] == {}
    assert all(torch.equal(after["w"][k], v) for k, v in state["w"].items())


def test_put_state_casts_floating_state_to_the_param_dtype_like_load_state_dict() -> None:
    stepper = stepped(make("adam")[0])
    stepper.put_state(
        {
            "b": {
                "exp_avg": torch.full((4,), 0.25, dtype=torch.float64),
                "step": torch.tensor(7, dtype=torch.int64),
            }
        }
    )
    _, state = stepper.get_state(["b"])
    assert state["b"]["exp_avg"].dtype == torch.float32
    assert torch.equal(state["b"]["exp_avg"], torch.full((4,), 0.25))
    assert state["b"]["step"].dtype == torch.float32 and state["b"]["step"].item() == 7.0


def test_put_state_with_group_options_sets_both_atomically() -> None:
    stepper = stepped(make("adam")[0])
    _, state = stepper.get_state()
    with_max = {n: {**s, "max_exp_avg_sq": s["exp_avg_sq"].clone()} for n, s in state.items()}
    stepper.put_state(with_max, [{"amsgrad": True, "lr": 0.5}])
    group = stepper.summary()["groups"][0]
    assert group["amsgrad"] is True and group["lr"] == 0.5
    assert stepper.get_state(keys=["max_exp_avg_sq"])[1]["w"]["max_exp_avg_sq"].shape == (3, 4)


def test_reset_state_forgets_some_or_all() -> None:
    stepper = stepped(make("adam")[0])
    stepper.reset_state(["w"])
    _, state = stepper.get_state()
    assert state["w"] == {} and set(state["b"]) == {"step", "exp_avg", "exp_avg_sq"}
    stepper.reset_state()
    assert all(s == {} for s in stepper.get_state()[1].values())
    assert stepper.step_count == 2  # the request counter is not optimizer state


def test_reset_param_restarts_at_step_one_like_a_fresh_local_optimizer() -> None:
    stepper, optimizer, local = make("adam", foreach=False)
    for k in range(3):
        step_both(stepper, optimizer, local, k)
    stepper.reset_state(["b"])
    del optimizer.state[local["b"]]
    for k in range(3, 6):
        step_both(stepper, optimizer, local, k)
    assert_matches_local(stepper, optimizer, local)
    assert {p["name"]: p["step"] for p in stepper.summary()["params"]}["b"] == 3.0


def test_set_hyperparameters_changes_lr_like_a_scheduler() -> None:
    stepper, optimizer, local = make("adam", foreach=False)
    for k in range(20):
        if k % 5 == 0:
            lr = 1e-2 * 0.5 ** (k // 5)
            stepper.set_hyperparameters({"lr": lr})
            for g in optimizer.param_groups:
                g["lr"] = lr
        step_both(stepper, optimizer, local, k)
    assert_matches_local(stepper, optimizer, local)
    assert stepper.summary()["groups"][0]["lr"] == 1e-2 * 0.5**3


def test_set_hyperparameters_on_one_group_only() -> None:
    groups: list[tuple[list[str], dict[str, Any]]] = [(["w"], {}), (["b", "s"], {})]
    stepper, optimizer, local = make("adam", groups=groups, foreach=False)
    stepper.set_hyperparameters({"lr": 0.1, "betas": (0.5, 0.6)}, group=1)
    optimizer.param_groups[1].update(lr=0.1, betas=(0.5, 0.6))
    for k in range(5):
        step_both(stepper, optimizer, local, k)
    assert_matches_local(stepper, optimizer, local)
    g0, g1 = stepper.summary()["groups"]
    assert (g0["lr"], g0["betas"]) == (1e-3, (0.9, 0.999))
    assert (g1["lr"], g1["betas"]) == (0.1, (0.5, 0.6))


def test_step_group_updates_apply_before_the_step() -> None:
    stepper, optimizer, local = make("adam", foreach=False)
    step_both(stepper, optimizer, local, 0)
    grads = {n: grad_for(p, 1, i) for i, (n, p) in enumerate(local.items())}
    stepper.step(grads, [{"lr": 0.25, "maximize": True}])
    optimizer.param_groups[0].update(lr=0.25, maximize=True)
    for n, p in local.items():
        p.grad = grads[n]
    optimizer.step()
    assert_matches_local(stepper, optimizer, local)


def test_switching_fused_on_moves_step_like_pytorch_and_keeps_parity() -> None:
    stepper, optimizer, local = make("adam", foreach=False)
    for k in range(3):
        step_both(stepper, optimizer, local, k)
    stepper.set_hyperparameters({"fused": True, "foreach": None})
    sd = optimizer.state_dict()
    for g in sd["param_groups"]:
        g.update(fused=True, foreach=None)
    optimizer.load_state_dict(sd)
    for k in range(3, 6):
        step_both(stepper, optimizer, local, k)
    assert_matches_local(stepper, optimizer, local)


def test_amsgrad_switched_on_with_max_exp_avg_sq_supplied_works() -> None:
    stepper = stepped(make("adam")[0])
    _, state = stepper.get_state()
    stepper.put_state({n: {"max_exp_avg_sq": s["exp_avg_sq"]} for n, s in state.items()})
    stepper.set_hyperparameters({"amsgrad": True})
    stepped(stepper, 1)
    assert stepper.summary()["params"][0]["state"] == [
        "step",
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
    ]


# ------------------------------------------------------------------- construction errors


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kind": "sgd"}, InvalidSpec, "unknown optimizer 'sgd'"),
        ({"params": []}, InvalidSpec, "at least one parameter"),
        (
            {"params": [("a", torch.ones(1)), ("a", torch.ones(2))]},
            DuplicateName,
            "'a' appears more than once",
        ),
        ({"params": [("i", torch.ones(2, dtype=torch.int64))]}, InvalidSpec, "'i' has dtype int64"),
        (
            {"params": [("c", torch.ones(2, dtype=torch.complex128))]},
            InvalidSpec,
            "has dtype complex128",
        ),
        (
            {"groups": [GroupDef(["a"]), GroupDef(["zz"])]},
            UnknownParameter,
            "unknown parameter 'zz'",
        ),
        ({"groups": [GroupDef(["a", "b"]), GroupDef(["a"])]}, InvalidSpec, "in several: ['a']"),
        ({"groups": [GroupDef(["a"])]}, InvalidSpec, "in none: ['b']"),
        ({"hyper": {"lr": -1.0}}, InvalidHyperparameter, "Invalid learning rate: -1.0"),
        ({"hyper": {"eps": -1e-8}}, InvalidHyperparameter, "Invalid epsilon value: -1e-08"),
        (
            {"groups": [GroupDef(["a"], {"betas": (0.9, 1.5)}), GroupDef(["b"])]},
            InvalidHyperparameter,
            "Invalid beta parameter at index 1: 1.5",
        ),
        (
            {"hyper": {"differentiable": True}},
            InvalidHyperparameter,
            "differentiable=True is not supported",
        ),
        (
            {"kind": "adamw", "hyper": {"decoupled_weight_decay": False}},
            InvalidHyperparameter,
            "AdamW always decouples weight decay",
        ),
    ],
)
def test_invalid_construction_raises(
    kwargs: dict[str, Any], error: type[EngineError], message: str
) -> None:
    args: dict[str, Any] = {
        "kind": "adam",
        "params": [("a", torch.ones(2)), ("b", torch.ones(3))],
        "hyper": {},
        "groups": None,
    }
    args.update(kwargs)
    with pytest.raises(error) as info:
        Stepper("s", args["kind"], CPU, args["params"], args["hyper"], args["groups"])
    assert message in str(info.value)
    assert info.value.code == error.code


# ---------------------------------------------------------- rejected input changes nothing

C64 = torch.complex64


def _bad_calls() -> list[tuple[str, Callable[[Stepper], Any], type[EngineError], str]]:
    w, b = torch.ones(3, 4), torch.ones(4)
    good = {"w": w, "b": b}
    return [
        (
            "step-unknown",
            lambda s: s.step({**good, "zz": b}),
            UnknownParameter,
            "stepper 's' has no parameter 'zz'",
        ),
        (
            "step-shape",
            lambda s: s.step({**good, "s": torch.ones(1)}),
            ShapeMismatch,
            "gradient for 's' has shape [1], parameter has []",
        ),
        (
            "step-dtype",
            lambda s: s.step({**good, "s": torch.tensor(1.0, dtype=torch.float64)}),
            DtypeMismatch,
            "gradient for 's' has dtype float64, parameter has float32",
        ),
        (
            "step-bad-lr",
            lambda s: s.step(good, [{"lr": -1.0}]),
            InvalidHyperparameter,
            "Invalid learning rate: -1.0",
        ),
        (
            "step-nan-lr",
            lambda s: s.step(good, [{"lr": math.nan}]),
            InvalidHyperparameter,
            "Invalid learning rate: nan",
        ),
        (
            "step-group-count",
            lambda s: s.step(good, [{}, {}]),
            InvalidHyperparameter,
            "got options for 2 param group(s); stepper has 1",
        ),
        (
            "step-unknown-option",
            lambda s: s.step(good, [{"momentum": 0.9}]),
            InvalidHyperparameter,
            "unknown option(s): momentum",
        ),
        (
            "step-amsgrad",
            lambda s: s.step(good, [{"amsgrad": True}]),
            InvalidState,
            "amsgrad=True needs max_exp_avg_sq",
        ),
        (
            "hp-lr",
            lambda s: s.set_hyperparameters({"lr": -1.0}),
            InvalidHyperparameter,
            "Invalid learning rate: -1.0",
        ),
        (
            "hp-nan-lr",
            lambda s: s.set_hyperparameters({"lr": math.nan}),
            InvalidHyperparameter,
            "Invalid learning rate: nan",
        ),
        (
            "hp-beta0",
            lambda s: s.set_hyperparameters({"betas": (1.0, 0.999)}),
            InvalidHyperparameter,
            "Invalid beta parameter at index 0: 1.0",
        ),
        (
            "hp-beta1-nan",
            lambda s: s.set_hyperparameters({"betas": (0.9, math.nan)}),
            InvalidHyperparameter,
            "Invalid beta parameter at index 1: nan",
        ),
        (
            "hp-weight-decay",
            lambda s: s.set_hyperparameters({"weight_decay": -0.1}),
            InvalidHyperparameter,
            "Invalid weight_decay value: -0.1",
        ),
        (
            "hp-fused-foreach",
            lambda s: s.set_hyperparameters({"fused": True, "foreach": True}),
            InvalidHyperparameter,
            "`fused` and `foreach` cannot be `True` together.",
        ),
        (
            "hp-capturable-cpu",
            lambda s: s.set_hyperparameters({"capturable": True}),
            InvalidHyperparameter,
            "If capturable=True, params and state_steps must be on supported devices",
        ),
        (
            "hp-amsgrad",
            lambda s: s.set_hyperparameters({"amsgrad": True}),
            InvalidState,
            "state of 'w' would lack max_exp_avg_sq (amsgrad=True needs max_exp_avg_sq)",
        ),
        (
            "hp-group-range",
            lambda s: s.set_hyperparameters({"lr": 0.1}, group=1),
            InvalidHyperparameter,
            "param group 1 does not exist (have 1)",
        ),
        (
            "hp-unknown",
            lambda s: s.set_hyperparameters({"nesterov": True}),
            InvalidHyperparameter,
            "unknown option(s): nesterov",
        ),
        (
            "params-unknown",
            lambda s: s.put_params({"w": w * 2, "zz": b}),
            UnknownParameter,
            "no parameter 'zz'",
        ),
        (
            "params-shape",
            lambda s: s.put_params({"w": w * 2, "b": torch.ones(5)}),
            ShapeMismatch,
            "value for 'b' has shape [5], parameter has [4]",
        ),
        (
            "params-dtype",
            lambda s: s.put_params({"w": w * 2, "b": b.to(C64)}),
            DtypeMismatch,
            "value for 'b' has dtype complex64, parameter has float32",
        ),
        (
            "state-unknown-param",
            lambda s: s.put_state({"w": {"exp_avg": w}, "zz": {}}),
            UnknownParameter,
            "no parameter 'zz'",
        ),
        (
            "state-unknown-key",
            lambda s: s.put_state({"w": {"exp_avg": w, "momentum": w}}),
            InvalidState,
            "unknown state key 'momentum' for 'w'",
        ),
        (
            "state-shape",
            lambda s: s.put_state({"w": {"exp_avg": w}, "b": {"exp_avg": w}}),
            ShapeMismatch,
            "exp_avg for 'b' has shape [3, 4], parameter has [4]",
        ),
        (
            "state-dtype",
            lambda s: s.put_state({"w": {"exp_avg": w}, "b": {"exp_avg": b.to(C64)}}),
            DtypeMismatch,
            "exp_avg for 'b' has dtype complex64, parameter has float32",
        ),
        (
            "state-step-vector",
            lambda s: s.put_state({"w": {"step": torch.ones(2)}}),
            ShapeMismatch,
            "step of 'w' must be a scalar",
        ),
        (
            "state-step-negative",
            lambda s: s.put_state({"w": {"step": torch.tensor(-1.0)}}),
            InvalidState,
            "step of 'w' must be finite and >= 0, got -1.0",
        ),
        (
            "state-step-nan",
            lambda s: s.put_state({"w": {"step": torch.tensor(math.nan)}}),
            InvalidState,
            "must be finite and >= 0, got nan",
        ),
        (
            "state-step-bool",
            lambda s: s.put_state({"w": {"step": torch.tensor(True)}}),
            DtypeMismatch,
            "step of 'w' must be a real number",
        ),
        (
            "state-incomplete-after-replace",
            lambda s: s.put_state({"w": {"exp_avg": w}}, replace=True),
            InvalidState,
            "state of 'w' would lack step, exp_avg_sq",
        ),
        (
            "state-amsgrad-options",
            lambda s: s.put_state({}, [{"amsgrad": True}]),
            InvalidState,
            "amsgrad=True needs max_exp_avg_sq",
        ),
        (
            "state-bad-options",
            lambda s: s.put_state({"w": {"exp_avg": w}}, [{"lr": -2.0}]),
            InvalidHyperparameter,
            "Invalid learning rate: -2.0",
        ),
        (
            "reset-unknown",
            lambda s: s.reset_state(["w", "zz"]),
            UnknownParameter,
            "no parameter 'zz'",
        ),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize(
    ("call", "error", "message"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_rejected_mutations_leave_the_stepper_byte_identical(
    call: Callable[[Stepper], Any], error: type[EngineError], message: str
) -> None:
    stepper = stepped(make("adam")[0])
    before = snapshot(stepper)
    with pytest.raises(error) as info:
        call(stepper)
    assert message in info.value.detail
    assert info.value.code == error.code
    assert snapshot(stepper) == before
    assert all(p.grad is None for p in stepper.params)


def test_fused_on_complex_is_rejected_with_pytorchs_message() -> None:
    stepper = stepped(make("adam", [("c", (2,), C64), ("f", (2,), torch.float32)])[0])
    before = snapshot(stepper)
    with pytest.raises(InvalidHyperparameter) as info:
        stepper.set_hyperparameters({"fused": True})
    assert "`fused=True` requires all the params to be floating point Tensors" in str(info.value)
    assert "torch.complex64" in str(info.value)
    # The same options make a local optimizer raise the same message when it steps.
    c = torch.zeros(2, dtype=C64, requires_grad=True)
    c.grad = torch.zeros_like(c)
    with pytest.raises(RuntimeError) as local_info:
        torch.optim.Adam([c], fused=True).step()
    assert str(local_info.value) == str(info.value)
    assert snapshot(stepper) == before


def test_messages_are_pytorchs_own() -> None:
    """The texts surfaced are exactly what torch.optim.Adam raises for the same values."""
    for bad in ({"lr": -1.0}, {"betas": (1.5, 0.9)}, {"eps": -1.0}, {"lr": math.nan}):
        with pytest.raises(ValueError) as local:
            torch.optim.Adam([torch.zeros(1, requires_grad=True)], **bad)
        with pytest.raises(InvalidHyperparameter) as remote:
            make("adam")[0].set_hyperparameters(bad)
        assert remote.value.detail == str(local.value)


def test_failed_group_update_in_step_keeps_group_options() -> None:
    stepper = stepped(make("adam")[0])
    with pytest.raises(InvalidHyperparameter):
        stepper.step({"w": torch.ones(3, 4)}, [{"lr": 0.5, "betas": (0.9, 2.0)}])
    assert stepper.summary()["groups"][0]["lr"] == 1e-3


def test_get_state_rejects_unknown_keys_and_params() -> None:
    stepper = stepped(make("adam")[0])
    with pytest.raises(InvalidState, match="unknown state key 'moment'"):
        stepper.get_state(keys=["moment"])
    with pytest.raises(UnknownParameter, match="no parameter 'q'"):
        stepper.get_params(["w", "q"])
    _, state = stepper.get_state(["b"], ["exp_avg"])
    assert list(state) == ["b"] and list(state["b"]) == ["exp_avg"]


# --------------------------------------------------------------------------- bias correction


@pytest.mark.parametrize("t", [1, 2, 1000])
def test_bias_correction_is_pythons_formula(t: int) -> None:
    stepper, _, _ = make("adam", lr=3e-3, betas=(0.8, 0.995))
    report = stepper.bias_correction(float(t))
    (g,) = report["groups"]
    assert g["step"] == float(t)
    assert g["bias_correction1"] == 1 - 0.8**t
    assert g["bias_correction2"] == 1 - 0.995**t
    assert g["step_size"] == 3e-3 / (1 - 0.8**t)
    assert g["bias_correction2_sqrt"] == (1 - 0.995**t) ** 0.5
    assert (g["lr"], g["beta1"], g["beta2"]) == (3e-3, 0.8, 0.995)
    assert report["params"] == {}  # per-parameter factors only for the current step


def test_bias_correction_at_step_zero_has_no_step_size() -> None:
    (g,) = make("adam")[0].bias_correction(0.0)["groups"]
    assert g["bias_correction1"] == 0.0 and g["step_size"] is None


@pytest.mark.parametrize("t", [-1.0, math.inf, math.nan])
def test_bias_correction_rejects_bad_steps(t: float) -> None:
    with pytest.raises(InvalidState, match="step must be finite and >= 0"):
        make("adam")[0].bias_correction(t)


def test_bias_correction_defaults_to_current_and_per_param_steps() -> None:
    stepper, optimizer, local = make("adam", foreach=False)
    for k in range(5):
        step_both(stepper, optimizer, local, k, lambda n, k: n == "b" and k < 2)
    report = stepper.bias_correction()
    assert report["step"] == 5 and report["groups"][0]["step"] == 5.0
    assert {n: f["step"] for n, f in report["params"].items()} == {"w": 5.0, "b": 3.0, "s": 5.0}
    assert report["params"]["b"]["bias_correction1"] == 1 - 0.9**3.0


@pytest.mark.parametrize("amsgrad", [False, True])
def test_bias_correction_is_what_single_tensor_adam_uses(amsgrad: bool) -> None:
    """Rebuild one for-loop Adam update from the reported factors: it must equal the
    stepper's update bit for bit, which holds only if the factors are PyTorch's own."""
    stepper, _, local = make(
        "adam", lr=7e-3, betas=(0.7, 0.97), eps=1e-7, foreach=False, amsgrad=amsgrad
    )
    for k in range(2):
        stepper.step({n: grad_for(p, k, i) for i, (n, p) in enumerate(local.items())})
    _, params = stepper.get_params()
    _, state = stepper.get_state()
    grads = {n: grad_for(p, 2, i) for i, (n, p) in enumerate(local.items())}
    stepper.step(grads)
    report = stepper.bias_correction()
    _, new_params = stepper.get_params()
    for n, grad in grads.items():
        f = report["params"][n]
        assert f["step"] == 3.0
        exp_avg = state[n]["exp_avg"].lerp(grad, 1 - 0.7)
        exp_avg_sq = state[n]["exp_avg_sq"].mul(0.97).addcmul(grad, grad, value=1 - 0.97)
        second = exp_avg_sq
        if amsgrad:
            second = torch.maximum(state[n]["max_exp_avg_sq"], exp_avg_sq)
        denom = (second.sqrt() / f["bias_correction2_sqrt"]).add_(1e-7)
        expected = params[n].addcdiv(exp_avg, denom, value=-f["step_size"])
        assert torch.equal(new_params[n], expected), n
