"""Engine guards that only the HTTP or client tiers used to exercise, pinned where they
live (found by mutation testing: benchmarks/mutation.py).

- Accumulate mode: the mean of the contributions, summed in worker order, bit for bit;
  the bounds of ``contributors`` and ``worker``.
- Every refusal names the parameter it is about (the problem's ``parameter`` field).
- State checks: a parameter without state does not end the completeness check; a scalar
  ``step`` may come as ``[]`` or ``[1]`` (older PyTorch state_dicts), never ``[1, 1]``.
- Gradients on a lossy 16-bit wire, reads with parameters, bias correction of a parameter
  that never stepped, the summary's fields, the bounded idempotency journal, and the
  engine time observers see.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from test_stepper import grad_for, make, snapshot, stepped

from adamscope.service.engine import GroupDef, Stepper, accumulate
from adamscope.service.engine import journal as journal_module
from adamscope.service.engine.errors import (
    DeviceUnavailable,
    DtypeMismatch,
    EngineError,
    InvalidHyperparameter,
    InvalidSpec,
    InvalidState,
    ShapeMismatch,
    StepConflict,
    UnknownParameter,
)
from adamscope.service.engine.options import OPTION_NAMES, resolve_device

CPU = torch.device("cpu")


# ---------------------------------------------------------------------- accumulate mode


def test_contributions_step_with_their_mean_in_worker_order_bit_for_bit() -> None:
    """Three workers; 'b' only from workers 0 and 2, 's' from none. Arrival order 2, 0, 1."""
    stepper, optimizer, local = make("adam", foreach=False)
    for k in range(2):
        g = {
            n: [grad_for(p, 10 * k + w, i) for w in range(3)]
            for i, (n, p) in enumerate(local.items())
        }
        sent = {
            0: {"w": g["w"][0], "b": g["b"][0]},
            1: {"w": g["w"][1]},
            2: {"w": g["w"][2], "b": g["b"][2]},
        }
        assert stepper.contribute(2, 3, sent[2]) is None
        assert stepper.contribute(0, 3, sent[0]) is None
        assert stepper.pending_contributions() == [0, 2]
        outcome = stepper.contribute(1, 3, sent[1])
        assert outcome is not None and outcome.step == k + 1
        assert (outcome.stepped, outcome.skipped) == (["w", "b"], ["s"])
        local["w"].grad = g["w"][0].clone().add_(g["w"][1]).add_(g["w"][2]).div_(3)
        local["b"].grad = g["b"][0].clone().add_(g["b"][2]).div_(2)
        local["s"].grad = None
        optimizer.step()
    _, params = stepper.get_params()
    _, state = stepper.get_state()
    for n, p in local.items():
        assert torch.equal(params[n], p.detach()), n
        for key, value in optimizer.state.get(p, {}).items():
            assert torch.equal(state[n][key], value), (n, key)
    assert "step" not in state["s"]


def test_contributor_and_worker_bounds() -> None:
    top = accumulate.MAX_CONTRIBUTORS
    stepper = make("adam")[0]
    g = {"b": torch.ones(4)}
    before = snapshot(stepper)
    for contributors, worker, message in [
        (0, 0, "contributors must be 1..1024, got 0"),
        (top + 1, 0, f"contributors must be 1..1024, got {top + 1}"),
        (3, 3, "worker must be in 0..2, got 3"),
        (3, -1, "worker must be in 0..2, got -1"),
    ]:
        with pytest.raises(InvalidSpec) as info:
            stepper.contribute(worker, contributors, g)
        assert message in info.value.detail
    assert snapshot(stepper) == before
    assert stepper.contribute(top - 1, top, g) is None  # the largest worker of the largest K
    assert stepper.pending_contributions() == [top - 1]
    with pytest.raises(StepConflict) as conflict:
        stepper.contribute(0, 2, g)
    assert "the pending step of 's' collects 1024 contributions, not 2" in conflict.value.detail
    assert conflict.value.extra == {"current_step": 0}
    with pytest.raises(StepConflict) as again:
        stepper.contribute(top - 1, top, g)
    assert again.value.detail == "worker 1023 already contributed to step 1 of 's'"
    assert again.value.extra == {"current_step": 0}


def test_commit_applies_what_arrived_and_needs_something_pending() -> None:
    stepper = make("adam")[0]
    with pytest.raises(StepConflict) as info:
        stepper.commit()
    assert info.value.detail == "stepper 's' has no pending contributions"
    assert info.value.extra == {"current_step": 0}
    assert stepper.contribute(1, 4, {"b": torch.ones(4)}, key="k1") is None
    done = stepper.commit()
    assert (done.step, done.stepped) == (1, ["b"]) and stepper.pending_contributions() == []
    assert stepper.step({"b": torch.ones(4)}, key="k1").replayed  # its key was spent


# ---------------------------------------------------------------------- refusals name it

BAD: list[tuple[str, Callable[[Stepper], Any], type[EngineError], str]] = [
    ("gradient-shape", lambda s: s.step({"b": torch.ones(5)}), ShapeMismatch, "b"),
    (
        "gradient-dtype",
        lambda s: s.step({"b": torch.ones(4, dtype=torch.float64)}),
        DtypeMismatch,
        "b",
    ),
    ("unknown", lambda s: s.step({"zz": torch.ones(4)}), UnknownParameter, "zz"),
    ("state-key", lambda s: s.put_state({"w": {"momentum": torch.ones(3, 4)}}), InvalidState, "w"),
    ("state-shape", lambda s: s.put_state({"b": {"exp_avg": torch.ones(5)}}), ShapeMismatch, "b"),
    (
        "state-dtype",
        lambda s: s.put_state({"b": {"exp_avg": torch.ones(4, dtype=torch.int64)}}),
        DtypeMismatch,
        "b",
    ),
    ("step-shape", lambda s: s.put_state({"s": {"step": torch.ones(2)}}), ShapeMismatch, "s"),
    ("step-dtype", lambda s: s.put_state({"s": {"step": torch.tensor(True)}}), DtypeMismatch, "s"),
    ("step-value", lambda s: s.put_state({"s": {"step": torch.tensor(-1.0)}}), InvalidState, "s"),
    (
        "incomplete",
        lambda s: s.put_state({"b": {"exp_avg": torch.ones(4)}}, replace=True),
        InvalidState,
        "b",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "parameter"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_every_refusal_names_its_parameter(
    call: Callable[[Stepper], Any], error: type[EngineError], parameter: str
) -> None:
    stepper = stepped(make("adam")[0])
    with pytest.raises(error) as info:
        call(stepper)
    assert info.value.extra == {"parameter": parameter}


# ---------------------------------------------------------------------- state checks


def test_a_parameter_without_state_does_not_end_the_completeness_check() -> None:
    """'w' never stepped, 'b' did: switching amsgrad on must still find that 'b' lacks
    max_exp_avg_sq (the check goes on past a parameter without state)."""
    stepper = make("adam", foreach=False)[0]
    stepper.step({"b": torch.ones(4)})
    before = snapshot(stepper)
    with pytest.raises(InvalidState) as info:
        stepper.set_hyperparameters({"amsgrad": True})
    assert info.value.detail == (
        "state of 'b' would lack max_exp_avg_sq (amsgrad=True needs max_exp_avg_sq); send "
        "the complete state for a parameter that has none yet"
    )
    assert info.value.extra == {"parameter": "b"}
    assert snapshot(stepper) == before
    with pytest.raises(InvalidState) as other:  # not about amsgrad: no hint in parentheses
        stepper.put_state({"w": {"exp_avg": torch.ones(3, 4)}})
    assert other.value.detail == (
        "state of 'w' would lack step, exp_avg_sq; send the "
        "complete state for a parameter that has none yet"
    )


@pytest.mark.parametrize("shape", [(), (1,)])
def test_a_scalar_step_may_come_as_zero_or_one_dimensional(shape: tuple[int, ...]) -> None:
    stepper = stepped(make("adam")[0])
    stepper.put_state({"b": {"step": torch.full(shape, 7, dtype=torch.int64)}})
    _, state = stepper.get_state(["b"], ["step"])
    step = state["b"]["step"]
    assert step.shape == () and step.dtype == torch.float32 and step.item() == 7.0


@pytest.mark.parametrize("shape", [(1, 1), (2,), (0,)])
def test_a_step_of_another_shape_is_refused(shape: tuple[int, ...]) -> None:
    stepper = stepped(make("adam")[0])
    before = snapshot(stepper)
    with pytest.raises(ShapeMismatch) as info:
        stepper.put_state({"b": {"step": torch.ones(shape)}})
    assert info.value.detail == f"step of 'b' must be a scalar, got shape {list(shape)}"
    assert snapshot(stepper) == before


def test_unknown_state_keys_are_listed() -> None:
    stepper = stepped(make("adam")[0])
    expected = "expected one of step, exp_avg, exp_avg_sq, max_exp_avg_sq"
    with pytest.raises(InvalidState) as info:
        stepper.put_state({"b": {"momentum": torch.ones(4)}})
    assert info.value.detail == f"unknown state key 'momentum' for 'b'; {expected}"
    with pytest.raises(InvalidState) as read:
        stepper.get_state(keys=["exp_avg", "momentum"])
    assert read.value.detail == f"unknown state key 'momentum'; {expected}"


# ---------------------------------------------------------------------- gradients and reads


def test_gradients_on_a_lossy_wire() -> None:
    """check_gradient (the step route calls it before reading a byte): with a 16-bit wire a
    real floating parameter also takes gradients of that dtype; nothing else does."""
    stepper = make("adam", [("w", (2, 3), torch.float32), ("c", (2,), torch.complex64)])[0]
    bf16 = torch.bfloat16
    stepper.check_gradient("w", [2, 3], torch.float32)
    stepper.check_gradient("w", [2, 3], torch.float32, bf16)
    stepper.check_gradient("w", [2, 3], bf16, bf16)
    stepper.check_gradient("c", [2], torch.complex64, bf16)
    for args, error, message in [
        (("w", [2, 3], bf16), DtypeMismatch, "gradient for 'w' has dtype bfloat16"),
        (("w", [2, 3], torch.float16, bf16), DtypeMismatch, "has dtype float16"),
        (("c", [2], bf16, bf16), DtypeMismatch, "gradient for 'c' has dtype bfloat16"),
        (("w", [3, 2], bf16, bf16), ShapeMismatch, "gradient for 'w' has shape [3, 2]"),
        (("zz", [1], bf16, bf16), UnknownParameter, "no parameter 'zz'"),
    ]:
        with pytest.raises(error, match=message.replace("[", r"\[")):
            stepper.check_gradient(*args)  # type: ignore[arg-type]


def test_get_state_with_params_is_one_snapshot() -> None:
    stepper = stepped(make("adam")[0])
    step, both = stepper.get_state(["b", "w", "b"], ["exp_avg"], with_params=True)
    _, params = stepper.get_params()
    assert step == 2 and list(both) == ["b", "w"]
    for n in ("b", "w"):
        assert list(both[n]) == ["exp_avg", "param"]
        assert torch.equal(both[n]["param"], params[n])
    assert "param" not in stepper.get_state(["b"])[1]["b"]


def test_bias_correction_skips_a_parameter_that_never_stepped() -> None:
    stepper = make("adam")[0]
    stepper.step({"b": torch.ones(4)})
    report = stepper.bias_correction()
    assert list(report["params"]) == ["b"] and report["params"]["b"]["step"] == 1.0
    assert stepper.param_step("w") is None and stepper.param_step("b") == 1.0


def test_the_summary_describes_every_parameter_group_and_byte() -> None:
    stepper = Stepper(
        "s",
        "adamw",
        CPU,
        [("w", torch.ones(2, 3)), ("h", torch.ones(4).to(torch.bfloat16))],
        {"lr": 0.01, "foreach": False},
        [GroupDef(["h"], {"amsgrad": True, "lr": 0.5}), GroupDef(["w"])],
    )
    stepper.step({"h": torch.ones(4, dtype=torch.bfloat16)})
    s = stepper.summary()
    assert {k: s[k] for k in ("name", "optimizer", "device", "step", "numel")} == {
        "name": "s",
        "optimizer": "adamw",
        "device": "cpu",
        "step": 1,
        "numel": 10,
    }
    # params: 6 x 4 bytes + 4 x 2; h's state: step (4) + 3 moments of 4 x 2
    assert s["state_bytes"] == 24 + 8 + 4 + 3 * 8
    assert s["params"] == [
        {
            "name": "w",
            "shape": [2, 3],
            "dtype": "float32",
            "numel": 6,
            "group": 1,
            "step": None,
            "state": [],
        },
        {
            "name": "h",
            "shape": [4],
            "dtype": "bfloat16",
            "numel": 4,
            "group": 0,
            "step": 1.0,
            "state": ["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        },
    ]
    groups = s["groups"]
    assert [(g["index"], g["params"], g["lr"], g["amsgrad"]) for g in groups] == [
        (0, ["h"], 0.5, True),
        (1, ["w"], 0.01, False),
    ]
    assert all(set(g) == {"index", "params", *OPTION_NAMES} for g in groups)
    assert all(isinstance(g["lr"], float) and g["betas"] == (0.9, 0.999) for g in groups)
    assert all(g["decoupled_weight_decay"] is True for g in groups)
    assert s["created_at"] <= s["updated_at"]


# ---------------------------------------------------------------------- journal and timing


def test_the_journal_forgets_the_oldest_keys_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "JOURNAL_KEYS", 3)
    stepper = make("adam")[0]
    g = {"b": torch.ones(4)}
    for key in ("k1", "k2", "k3", "k4"):
        assert not stepper.step(g, key=key).replayed
    assert [stepper.step(g, key=k).replayed for k in ("k2", "k3", "k4")] == [True] * 3
    assert stepper.step_count == 4
    assert not stepper.step(g, key="k1").replayed  # forgotten: applied again
    assert stepper.step_count == 5


class _Clock:
    """An observer that notes what it sees: the step, the gradients, the engine time."""

    def __init__(self) -> None:
        self.seen: list[float] = []
        self.calls: list[tuple[str, int, list[str]]] = []

    def before_step(self, stepper: Stepper, grads: Mapping[str, torch.Tensor]) -> None:
        self.calls.append(("before", stepper.observed_step, sorted(grads)))

    def after_step(self, stepper: Stepper, grads: Mapping[str, torch.Tensor]) -> None:
        self.calls.append(("after", stepper.observed_step, sorted(grads)))
        self.seen.append(stepper.engine_seconds())


@pytest.mark.parametrize("deferred", [False, True])
def test_observers_see_the_engine_time_of_their_step(deferred: bool) -> None:
    stepper = make("adam")[0]
    clock = _Clock()
    stepper.observers.append(clock)
    stepper.defer_after_step = deferred
    started = time.perf_counter()
    stepper.step({"b": torch.ones(4)})
    stepper.settle()
    wall = time.perf_counter() - started
    assert len(clock.seen) == 1 and 0.0 <= clock.seen[0] <= wall
    stepper.step({"w": torch.ones(3, 4), "s": torch.ones(())})
    stepper.settle()
    assert clock.calls == [
        ("before", 1, ["b"]),
        ("after", 1, ["b"]),
        ("before", 2, ["s", "w"]),
        ("after", 2, ["s", "w"]),
    ]


def test_a_step_returns_parameters_only_when_asked() -> None:
    stepper = make("adam")[0]
    assert stepper.step({"b": torch.ones(4)}).params is None
    assert stepper.step({"b": torch.ones(4)}, return_params=True).params is not None


class _Gate:
    """An observer whose after_step blocks until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def before_step(self, stepper: Stepper, grads: Mapping[str, torch.Tensor]) -> None:
        pass

    def after_step(self, stepper: Stepper, grads: Mapping[str, torch.Tensor]) -> None:
        self.entered.set()
        assert self.release.wait(30)


def test_a_step_stays_unsettled_while_its_observers_run_elsewhere() -> None:
    """Reads wait for a deferred step's observers (Stepper.unsettled): also while another
    thread is already running them, and no longer once they are done."""
    stepper = make("adam")[0]
    gate = _Gate()
    stepper.observers.append(gate)
    stepper.defer_after_step = True
    stepper.step({"b": torch.ones(4)})
    assert stepper.unsettled
    worker = threading.Thread(target=stepper.settle)
    worker.start()
    assert gate.entered.wait(30)
    assert stepper.unsettled  # taken off the queue, still running
    gate.release.set()
    worker.join(30)
    assert not stepper.unsettled
    stepper.settle()  # nothing pending: returns at once


class _Broken:
    def before_step(self, stepper: Stepper, grads: Mapping[str, torch.Tensor]) -> None:
        raise RuntimeError("observer bug")

    def after_step(self, stepper: Stepper, grads: Mapping[str, torch.Tensor]) -> None:
        raise ValueError("observer bug")

    def __repr__(self) -> str:
        return "<broken>"


def test_a_failing_observer_is_logged_and_never_breaks_the_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stepper, optimizer, local = make("adam", foreach=False)
    stepper.observers.append(_Broken())
    clock = _Clock()
    stepper.observers.append(clock)  # later observers still run
    with caplog.at_level(logging.ERROR, logger="adamscope"):
        assert stepper.step({"b": grad_for(local["b"], 0, 1)}).step == 1
    assert [r.getMessage() for r in caplog.records] == [
        "step observer <broken> failed in before_step",
        "step observer <broken> failed in after_step",
    ]
    assert all(r.exc_info is not None for r in caplog.records)
    assert len(clock.seen) == 1
    local["b"].grad = grad_for(local["b"], 0, 1)
    optimizer.step()
    assert torch.equal(stepper.get_params()[1]["b"], local["b"].detach())


# ---------------------------------------------------------------------- options at creation


@pytest.mark.parametrize(
    ("params", "hyper", "message"),
    [
        (
            [("a", torch.ones(2))],
            {"capturable": True},
            "If capturable=True, params and state_steps must be on supported devices",
        ),
        (
            [("c", torch.ones(2, dtype=torch.complex64))],
            {"fused": True},
            "`fused=True` requires all the params to be floating point Tensors",
        ),
    ],
)
def test_options_pytorch_refuses_only_when_stepping_are_refused_at_creation(
    params: list[tuple[str, torch.Tensor]], hyper: dict[str, Any], message: str
) -> None:
    """The probe step: a stepper must not be created with options its first step fails."""
    with pytest.raises(InvalidHyperparameter) as info:
        Stepper("s", "adam", CPU, params, hyper)
    assert info.value.detail.startswith(message)


@pytest.mark.parametrize(
    ("kind", "hyper", "message"),
    [
        ("adam", {"momentum": 0.9, "nesterov": True}, "unknown option(s): momentum, nesterov"),
        (
            "adam",
            {"differentiable": True},
            "differentiable=True is not supported by a remote "
            "optimizer: an autograd graph cannot cross the network",
        ),
        (
            "adamw",
            {"decoupled_weight_decay": False},
            "AdamW always decouples weight decay; use optimizer 'adam' for L2 decay",
        ),
    ],
)
def test_options_of_our_own_are_refused_with_exact_messages(
    kind: str, hyper: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        Stepper("s", kind, CPU, [("a", torch.ones(2))], hyper)
    assert info.value.detail == message


def test_an_empty_param_group_is_accepted_as_pytorch_does() -> None:
    stepper = Stepper(
        "s", "adamw", CPU, [("a", torch.ones(2))], {}, [GroupDef(["a"]), GroupDef([], {"lr": 0.5})]
    )
    local = torch.optim.AdamW(
        [{"params": [torch.ones(2, requires_grad=True)]}, {"params": [], "lr": 0.5}]
    )
    groups = stepper.summary()["groups"]
    assert [g["params"] for g in groups] == [["a"], []] and groups[1]["lr"] == 0.5
    for ours, theirs in zip(stepper.optimizer.param_groups, local.param_groups, strict=True):
        assert {k: ours[k] for k in OPTION_NAMES} == {k: theirs[k] for k in OPTION_NAMES}


def test_device_names_are_resolved_or_refused_with_a_reason() -> None:
    assert resolve_device(None, "cpu") == CPU and resolve_device("cpu:0", "cuda") == CPU
    cases = [
        ("meta", "device type 'meta' is not supported (use cpu or cuda)"),
        ("gpu", "invalid device 'gpu': "),
    ]
    if not torch.cuda.is_available():
        cases += [
            ("cuda", "device 'cuda' requested but CUDA is not available here"),
            ("cuda:1", "device 'cuda:1' requested but CUDA is not available here"),
        ]
    else:
        n = torch.cuda.device_count()
        assert resolve_device("cuda", "cpu") == torch.device("cuda", torch.cuda.current_device())
        assert resolve_device(f"cuda:{n - 1}", "cpu") == torch.device("cuda", n - 1)
        cases += [(f"cuda:{n}", f"device 'cuda:{n}' requested but only {n} CUDA device(s)")]
    for spec, message in cases:
        with pytest.raises(DeviceUnavailable) as info:
            resolve_device(spec, "cpu")
        assert info.value.detail.startswith(message), info.value.detail


def test_unknown_option_changes_are_all_named() -> None:
    stepper = stepped(make("adam")[0])
    before = snapshot(stepper)
    for call in (
        lambda: stepper.set_hyperparameters({"nesterov": True, "momentum": 0.9}),
        lambda: stepper.step({"b": torch.ones(4)}, [{"momentum": 1, "dampening": 0}]),
    ):
        with pytest.raises(InvalidHyperparameter) as info:
            call()
        assert info.value.detail.startswith("unknown option(s): ")
        names = info.value.detail.removeprefix("unknown option(s): ").split(", ")
        assert names == sorted(names) and len(names) == 2
    assert snapshot(stepper) == before
