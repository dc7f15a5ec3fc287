"""The step mirror (service.engine.steps): each parameter's Adam ``step`` as a float without
a device read per step. On a GPU it mirrors ``fused``/``capturable`` steps (kept on the
device); here it mirrors the CPU's steps (``mirror_cpu=True``), which PyTorch's update
increments the same way, so every value can be compared with the tensor's own."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from adamscope.client.numerics import rounded_scalar
from adamscope.service.engine import Stepper
from adamscope.service.engine.steps import StepMirror
from adamscope.service.inspect.signals import attach_signals, signals_of

CPU = torch.device("cpu")
IMPLS = [{"foreach": False}, {"foreach": True}, {"fused": True}]


def actual(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[float | None]:
    return [float(opt.state[p]["step"]) if p in opt.state else None for p in params]


def states(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[Mapping[str, Any]]:
    return [opt.state.get(p, {}) for p in params]


@pytest.mark.parametrize("impl", IMPLS, ids=lambda o: next(iter(o)) + str(next(iter(o.values()))))
def test_the_mirror_follows_pytorchs_updates_without_reading(impl: dict[str, Any]) -> None:
    params = [torch.zeros(3, requires_grad=True) for _ in range(3)]
    opt = torch.optim.Adam(params, lr=0.1, **impl)
    mirror = StepMirror(mirror_cpu=True)
    assert mirror.values(states(opt, params)) == [None, None, None]
    for i in range(12):
        mirror.ensure(states(opt, params))
        for k, p in enumerate(params):  # p2 steps every third step only; p1 from step 4
            p.grad = torch.ones(3) if (k != 2 or i % 3 == 0) and (k != 1 or i >= 4) else None
        opt.step()
        mirror.advance(states(opt, params))
        reads = mirror.reads
        assert mirror.values(states(opt, params)) == actual(opt, params)
        assert mirror.reads == reads == 0  # every value known: none read from a tensor


def test_a_loaded_step_is_read_once_then_followed() -> None:
    p = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([p], fused=True)
    mirror = StepMirror(mirror_cpu=True)
    p.grad = torch.ones(2)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["step"] = torch.tensor(41.0)
    opt.load_state_dict(sd)  # a new step tensor, at version 0: not a fresh state
    mirror.ensure(states(opt, [p]))
    assert mirror.reads == 1
    opt.step()
    mirror.advance(states(opt, [p]))
    assert mirror.values(states(opt, [p])) == [42.0] == actual(opt, [p])
    assert mirror.reads == 1


def test_an_unexpected_write_is_noticed_and_read_again() -> None:
    p = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([p])
    mirror = StepMirror(mirror_cpu=True)
    p.grad = torch.ones(2)
    opt.step()
    mirror.advance(states(opt, [p]))
    with torch.no_grad():
        opt.state[p]["step"].fill_(7.0)  # not an increment PyTorch's update made
    assert mirror.values(states(opt, [p])) == [7.0]
    assert mirror.reads == 1


@pytest.mark.parametrize(
    ("start", "dtype"),
    [
        (2.0**24, torch.float32),  # float32 + 1 rounds back: the step stops counting there
        (2048.0, torch.float16),
        (256.0, torch.bfloat16),
        (2.0**53, torch.float64),
    ],
)
def test_the_increment_rounds_as_pytorchs_addition(start: float, dtype: torch.dtype) -> None:
    t = torch.tensor(start, dtype=dtype)
    expected = t + 1
    assert rounded_scalar(start + 1.0, dtype) == float(expected)
    assert rounded_scalar(math.inf, dtype) == math.inf


def test_a_stepper_reads_no_step_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """summary(), bias_correction() and the signals take the steps from the mirror: after
    the first step no tensor is read as a Python number (``.item()``, ``float()``: a
    device sync each on a GPU), and every value is the tensor's."""

    def make() -> Stepper:
        stepper = Stepper(
            "s",
            "adam",
            CPU,
            [("a", torch.zeros(4)), ("b", torch.zeros(3, 2))],
            {"lr": 0.01, "fused": True},
        )
        attach_signals(stepper)
        return stepper

    s, plain = make(), make()  # plain reads the CPU steps as before
    s.steps = StepMirror(mirror_cpu=True)
    grads = {"a": torch.ones(4), "b": torch.full((3, 2), 0.5)}
    for stepper in (s, plain):
        stepper.step(grads)
    s.summary()
    reads = s.steps.reads
    scalar_reads: list[str] = []
    for name in ("item", "__float__"):
        original = getattr(torch.Tensor, name)

        def spy(t: torch.Tensor, *a: Any, _name: str = name, _f: Any = original) -> Any:
            scalar_reads.append(_name)
            return _f(t, *a)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for i in range(5):
        scalar_reads.clear()
        s.step(grads if i % 2 else {"a": grads["a"]})
        summary = s.summary()
        report = s.bias_correction()
        assert scalar_reads == []
        plain.step(grads if i % 2 else {"a": grads["a"]})  # reads its CPU steps, as before
        assert [p["step"] for p in summary["params"]] == actual(s.optimizer, s.params)
        assert {n: f["step"] for n, f in report["params"].items()} == {
            n: float(s.optimizer.state[s.params[s.index[n]]]["step"]) for n in s.names
        }
        assert signals_of(s)["step"] == s.step_count and "error" not in signals_of(s)
        assert {k: v for k, v in signals_of(s).items() if k != "time"} == {
            k: v for k, v in signals_of(plain).items() if k != "time"
        }
    assert s.steps.reads == reads


def test_a_stepper_rereads_steps_after_a_state_load() -> None:
    s = Stepper("s", "adam", CPU, [("a", torch.zeros(4))], {"fused": True})
    s.steps = StepMirror(mirror_cpu=True)
    s.step({"a": torch.ones(4)})
    assert s.param_step("a") == 1.0
    _, state = s.get_state()
    s.put_state({"a": {**state["a"], "step": torch.tensor(9.0)}})
    assert s.param_step("a") == 9.0
    s.step({"a": torch.ones(4)})
    assert s.param_step("a") == 10.0 == float(s.optimizer.state[s.params[0]]["step"])
    s.reset_state()
    assert s.param_step("a") is None
    s.step({"a": torch.ones(4)})
    assert s.param_step("a") == 1.0


@pytest.mark.parametrize("groups", [None, "two"], ids=["one-group", "two-groups-two-dtypes"])
def test_a_steps_signals_make_no_tensor_from_host_values_on_the_device(
    monkeypatch: pytest.MonkeyPatch, groups: str | None
) -> None:
    """``torch.tensor(values, device="cuda")`` copies from pageable memory and waits for
    every kernel queued before it: the signals of a step never make one (constants are
    uploaded once, per-step scalars stay 0-dim CPU tensors, per-tensor values go through
    page-locked memory). Two groups with other factors and dtypes take the pooled path."""
    from adamscope.service.engine import GroupDef

    params = [("a", torch.randn(300)), ("b", torch.randn(40, 5).double())]
    gdefs = None if groups is None else [GroupDef(["a"]), GroupDef(["b"], {"lr": 0.5})]
    s = Stepper("s", "adam", CPU, params, {"lr": 0.01}, gdefs)
    attach_signals(s)
    g = {"a": torch.ones(300), "b": torch.full((40, 5), 0.5, dtype=torch.float64)}
    for _ in range(2):
        s.step(g)
    made_on: list[Any] = []
    original = torch.tensor

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if kwargs.get("device") is not None and caller.startswith("adamscope."):
            made_on.append((caller, kwargs["device"]))  # PyTorch's own calls are its affair
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", spy)
    s.reset_state(["b"])  # a cache miss: the previous effective LR recomputed from state
    for _ in range(3):
        s.step(g)
        assert "error" not in signals_of(s) and signals_of(s)["step"] == s.step_count
    assert made_on == []


@pytest.mark.gpu
@pytest.mark.parametrize(
    "impl",
    [
        {"fused": True},
        {"foreach": True, "capturable": True},
        {"foreach": False, "capturable": True},
    ],
    ids=["fused", "foreach-capturable", "forloop-capturable"],
)
def test_a_gpu_steppers_device_steps_are_mirrored(impl: dict[str, Any]) -> None:
    """fused/capturable keep ``step`` on the GPU: after the first step the summary, the
    bias correction and the signals read none of them back, and every value is right."""
    s = Stepper(
        "g",
        "adam",
        torch.device("cuda"),
        [("a", torch.randn(64)), ("b", torch.randn(8, 8))],
        {"lr": 0.01, **impl},
    )
    attach_signals(s)
    g = {"a": torch.randn(64), "b": torch.randn(8, 8)}
    s.step(g)
    s.summary()
    reads = s.steps.reads
    for i in range(6):
        s.step(g if i % 3 else {"b": g["b"]})
        assert [p["step"] for p in s.summary()["params"]] == actual(s.optimizer, s.params)
        assert "error" not in signals_of(s)
    assert s.steps.reads == reads
