"""Dry runs (bit for bit the real step, changing nothing) and name-keyed diffs
(adamscope.service.inspect.dryrun, diff), checked against plain torch/numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from inspect_support import (
    DEVICES,
    close,
    f64,
    grads_for,
    randn,
    registered,
)

from adamscope.service.engine import GroupDef, Stepper
from adamscope.service.engine.errors import ShapeMismatch, UnknownParameter
from adamscope.service.inspect.diff import Operand, diff
from adamscope.service.inspect.dryrun import dry_run
from adamscope.service.inspect.signals import signals_of

# ---------------------------------------------------------------------- dry run


CONFIGS: list[dict[str, Any]] = [
    {"foreach": False},
    {"foreach": True, "amsgrad": True},
    {"fused": True, "weight_decay": 0.1},
    {"foreach": False, "maximize": True, "weight_decay": 0.01, "decoupled_weight_decay": True},
]


def dry_stepper(
    kind: str, hyper: dict[str, Any], dtype: torch.dtype, device: str = "cpu"
) -> Stepper:
    params = [
        ("w", randn((12, 5), 1, dtype)),
        ("b", randn((5,), 2, dtype)),
        ("z", randn((3,), 3, dtype)),
    ]
    groups = [GroupDef(["w", "z"]), GroupDef(["b"], {"lr": 0.02})]
    return registered(
        "dry",
        lambda: Stepper("dry", kind, torch.device(device), params, {"lr": 0.01, **hyper}, groups),
    )


def everything(s: Stepper) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in s.params]
    for p in s.params:
        out += [v.clone() for _, v in sorted(s.optimizer.state.get(p, {}).items())]
    return out


def same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind,dtype,hyper",
    [
        (kind, dtype, hyper)
        for kind, dtype in [
            ("adam", torch.float32),
            ("adamw", torch.bfloat16),
            ("adam", torch.complex64),
        ]
        for hyper in CONFIGS
        if not (dtype.is_complex and hyper.get("fused"))  # fused Adam takes real tensors only
    ],
)
def test_a_dry_run_is_bit_for_bit_the_real_step_and_changes_nothing(
    kind: str, dtype: torch.dtype, hyper: dict[str, Any], device: str
) -> None:
    s = dry_stepper(kind, hyper, dtype, device)
    for k in range(2):
        g = grads_for(s, k, ["w", "b"] if k == 0 else None)
        untouched = everything(s)
        version = s.version
        run = dry_run(s, g, [{"lr": 0.005}, {}] if k == 1 else None)
        assert same(everything(s), untouched) and s.version == version
        real = s.step(g, [{"lr": 0.005}, {}] if k == 1 else None)
        assert run.step == real.step and run.stepped == real.stepped
        assert run.skipped == real.skipped
        for n in run.stepped:
            p = s.params[s.index[n]]
            assert torch.equal(run.after[n], p.detach())
            state = s.optimizer.state[p]
            assert set(run.state[n]) == set(state)
            assert all(torch.equal(run.state[n][key], state[key]) for key in state)
        want = {k2: v for k2, v in signals_of(s).items() if k2 != "time"}
        got = {k2: v for k2, v in run.signals.items() if k2 != "time"}
        assert repr(got) == repr(want)  # repr: NaN == NaN


def test_a_dry_run_refuses_what_a_step_refuses() -> None:
    s = dry_stepper("adam", {"foreach": False}, torch.float32)
    untouched = everything(s)
    with pytest.raises(ShapeMismatch):
        dry_run(s, {"w": torch.zeros(3)})
    with pytest.raises(UnknownParameter):
        dry_run(s, {"nope": torch.zeros(3)})
    assert same(everything(s), untouched)


def test_a_dry_run_without_gradients_steps_nothing() -> None:
    s = dry_stepper("adam", {"foreach": False}, torch.float32)
    run = dry_run(s, {})
    assert (run.step, run.stepped, run.skipped) == (1, [], ["w", "b", "z"])
    assert run.signals["tensors"] == {} and run.signals["step"] == 1
    assert s.step_count == 0


# ---------------------------------------------------------------------- diff


def operand(
    tensors: dict[str, dict[str, torch.Tensor]], groups: list[dict[str, Any]], label: str
) -> Operand:
    return Operand({"stepper": label, "snapshot": None, "step": 0}, tensors, groups)


def test_diff_matches_numpy_by_name() -> None:
    a_w, b_w = randn((20, 3), 1), randn((20, 3), 1)
    b_w[2, 1] += 0.5
    b_w[3, 0] = -0.25
    nan_a = torch.tensor([math.nan, 1.0, 0.0])
    nan_b = torch.tensor([math.nan, 1.0, -0.0])  # NaN stays NaN: unchanged; -0.0 changed
    a = operand(
        {
            "w": {"param": a_w, "exp_avg": torch.ones(2)},
            "x": {"param": nan_a},
            "gone": {"param": torch.zeros(1)},
        },
        [{"lr": 0.1, "betas": [0.9, 0.999]}],
        "a",
    )
    b = operand(
        {
            "x": {"param": nan_b},
            "w": {"param": b_w, "exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2)},
            "new": {"param": torch.zeros(2, dtype=torch.float64)},
        },
        [{"lr": 0.2, "betas": [0.9, 0.999]}],
        "b",
    )
    report = diff(a, b)
    d = f64(b_w) - f64(a_w)
    w = report["tensors"]["w"]["param"]
    assert w["changed"] and w["changed_elements"] == int((d != 0).sum()) == 2
    assert close(w["max_abs_diff"], float(np.abs(d).max()))
    assert close(w["diff_norm"], float(np.linalg.norm(d)))
    assert close(w["relative"], float(np.linalg.norm(d) / np.linalg.norm(f64(a_w))))
    assert not report["tensors"]["w"]["exp_avg"]["changed"]
    x = report["tensors"]["x"]["param"]
    assert x["changed_elements"] == 1 and x["nonfinite_changed"] == 0
    assert report["changed"] == ["w.param", "x.param"]
    assert report["only_in_a"] == ["gone"] and report["only_in_b"] == ["new"]
    assert report["state_only_in_one"] == [{"name": "w", "key": "exp_avg_sq", "in": "b"}]
    assert report["options"] == [{"group": 0, "option": "lr", "a": 0.1, "b": 0.2}]


def test_diff_reports_tensors_that_cannot_be_compared() -> None:
    a = operand({"w": {"param": torch.zeros(3)}}, [], "a")
    b = operand({"w": {"param": torch.zeros(4)}}, [], "b")
    report = diff(a, b)
    assert report["tensors"]["w"]["param"]["comparable"] is False
    assert report["changed"] == ["w.param"]
