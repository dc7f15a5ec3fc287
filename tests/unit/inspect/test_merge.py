"""Signals and statistics of parts combined into the whole's (adamscope.service.inspect.merge,
which the Ray ingress uses for a sharded stepper): the parts' aggregates, combined by the rule
each signal declares, equal what one process computes over all the tensors at once (norms,
counts, means and the update ratio within float32 arithmetic; the LR quantiles' tails as
bounds, the rule says so); statistics merge exactly."""

from __future__ import annotations

import math

import torch
from inspect_support import CPU, REL, close, randn, registered

from adamscope.service.engine import Stepper
from adamscope.service.inspect.kernels import COMBINE
from adamscope.service.inspect.kernels.assemble import FULL
from adamscope.service.inspect.merge import (
    combine,
    combine_signals,
    merge_signal_details,
    merge_stats_aggregate,
)
from adamscope.service.inspect.signals import signals_of
from adamscope.service.inspect.summary import summarize_chunk

PARAMS = {"w": ((40, 7), 1), "b": ((13,), 2)}
#: Combined exactly from the parts' values (up to float32 sample arithmetic).
EXACT = [s for s, rule in COMBINE.items() if rule in ("norm", "sum", "ratio")] + ["exp_avg_sq_mean"]


def stepped(names: list[str]) -> Stepper:
    params = [(n, randn(PARAMS[n][0], PARAMS[n][1])) for n in names]
    s = registered(
        "-".join(names),
        lambda: Stepper("-".join(names), "adam", CPU, params, {"lr": 0.01, "foreach": False}),
    )
    for k in range(2):
        s.step({n: randn(PARAMS[n][0], 10 * k + PARAMS[n][1] + 5) for n in names})
    return s


def test_combined_parts_equal_the_whole() -> None:
    whole = signals_of(stepped(["w", "b"]))["aggregate"]
    parts = [signals_of(stepped([n]))["aggregate"] for n in ("w", "b")]
    weights = [math.prod(PARAMS[n][0]) for n in ("w", "b")]
    got = combine_signals(parts, weights)
    assert set(got) == set(whole)
    for signal in EXACT:
        assert close(got[signal], whole[signal], rel=REL), (signal, got[signal], whole[signal])
    # The exact minima and maxima combine exactly.
    for signal in FULL:
        if signal.endswith(("_min", "_max")):
            assert got[signal] == whole[signal], signal
    # The tails are bounds of the whole's, as the rule says.
    assert got["lr_eff_p1"] <= whole["lr_eff_p1"] and got["lr_eff_p99"] >= whole["lr_eff_p99"]


def test_rules() -> None:
    assert combine("grad_norm", [3.0, 4.0], [1, 1]) == 5.0
    assert combine("nan_count", [1.0, 2.0], [5, 7]) == 3.0
    assert combine("exp_avg_sq_mean", [1.0, 4.0], [1, 3]) == 3.25
    assert combine("lr_eff_p1", [0.5, 0.25], [1, 1]) == 0.25
    assert combine("shock_p99", [0.5, 0.25], [1, 1]) == 0.5
    # A part that did not report (None, NaN as JSON carries it) is left out; none: None.
    assert combine("exp_avg_sq_mean", [None, "NaN", 2.0], [9, 9, 1]) == 2.0
    assert combine("grad_norm", [None, None], [1, 1]) is None


def test_statistics_merge_exactly() -> None:
    a, b = randn((50,), 3).double(), randn((30,), 4).double()
    merged = merge_stats_aggregate([summarize_chunk(t)[0].fields() for t in (a, b)])
    every = torch.cat([a, b])
    assert merged["numel"] == 80
    assert close(merged["mean"], float(every.mean()), rel=1e-12)
    assert close(merged["std"], float(every.std(unbiased=False)), rel=1e-12)
    assert close(merged["norm"], float(every.norm()), rel=1e-12)
    assert (merged["min"], merged["max"]) == (float(every.min()), float(every.max()))


def test_new_signals_have_rules_and_details_merge() -> None:
    # Counts add, the schedule's scale and the first fault step keep an extreme.
    assert COMBINE["lr_fell_count"] == COMBINE["lr_rose_count"] == "sum"
    assert COMBINE["lr_scale"] == "max" and COMBINE["first_nonfinite_step"] == "min"
    a = {
        "estimates": {
            "rank_error": {"w": 0.05},
            "aggregate_rank_error": 0.05,
            "confidence": 0.99,
            "update_rounding": {"w": 3e-6},
            "aggregate_update_rounding": 3e-6,
        },
        "local": {"covered": ["w"], "top": {"w": {"lr_change": {"index": [1], "value": [0.3]}}}},
        "faults": {"w": {"grad": {"nan": 1, "inf": 0}}},
        "first_nonfinite": {"step": 7, "tensor": "w", "role": "grad", "nan": 1, "inf": 0},
    }
    b = {
        "estimates": {
            "rank_error": {"b": 0.0},
            "aggregate_rank_error": 0.0,
            "confidence": 0.99,
            "update_rounding": {"b": 4e-6},
            "aggregate_update_rounding": 4e-6,
        },
        "local": {"covered": ["b"], "top": {}},
        "first_nonfinite": {"step": 4, "tensor": "b", "role": "param", "nan": 2, "inf": 0},
    }
    got = merge_signal_details([a, b])
    assert got["estimates"]["rank_error"] == {"w": 0.05, "b": 0.0}
    assert got["estimates"]["aggregate_rank_error"] == 0.05
    assert got["estimates"]["update_rounding"] == {"w": 3e-6, "b": 4e-6}
    assert close(got["estimates"]["aggregate_update_rounding"], 5e-6, rel=1e-12)
    assert got["local"]["covered"] == ["w", "b"] and list(got["local"]["top"]) == ["w"]
    assert got["faults"] == a["faults"] and got["first_nonfinite"]["step"] == 4
