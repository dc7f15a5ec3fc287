"""The signal history, its exports and the alert rules (engine level, no HTTP).

The ring buffers are fed hand-made rows where a test needs exact control; everything else
runs a real Stepper with the real SignalObserver (adamscope.service.inspect.signals) and checks that
the history holds exactly what the observer computed, step by step. The alert bar is here
too: a synthetic gradient sequence whose second moment jumps late makes the effective-LR
swing alert fire for Adam and not for AMSGrad.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import alert_bar
import pytest
import torch
from nan_equal import same

from adamscope.client.protocol import AlertRule, HistoryReport
from adamscope.service.api.http.reply import render_json
from adamscope.service.engine import Stepper
from adamscope.service.engine import checkpoint as checkpoints
from adamscope.service.inspect.alerts import DEFAULT_RULES, JOURNAL_KEY, Alerts, rules_of, set_rules
from adamscope.service.inspect.history import LATENCY_BUCKETS, History, HistoryConfig
from adamscope.service.inspect.recorder import (
    HistoryObserver,
    attach_history,
    history_of,
    summary_fields,
)
from adamscope.service.inspect.schedule import GROUP_FIELDS
from adamscope.service.inspect.signals import SIGNALS, SignalObserver, signals_of

NAN, INF = math.nan, math.inf


def row(step: int, **values: float) -> dict[str, float]:
    """Hand-made signal values (a different value per step, so rows are told apart)."""
    return {"grad_norm": float(step), "lr_eff_p99": 10.0 + step, **values}


def record(h: History, step: int, tensors: Sequence[str] = ("w", "b"), **values: float) -> None:
    h.record(
        step, step, 1000.0 + step, row(step, **values), {t: row(step, **values) for t in tensors}
    )


# ---------------------------------------------------------------------- ring buffers


def test_the_aggregate_history_keeps_the_last_steps_and_grows_past_its_first_block() -> None:
    h = History("s", ["w", "b"], HistoryConfig(steps=100, tensor_values=10**9))
    for step in range(1, 151):  # past the first storage block (64) and past the capacity
        record(h, step)
    q = h.query()
    assert q["capacity"] == 100
    assert q["aggregate"]["steps"] == list(range(51, 151))
    assert q["aggregate"]["values"]["grad_norm"] == [float(s) for s in range(51, 151)]
    assert q["aggregate"]["time"] == [1000.0 + s for s in range(51, 151)]
    assert len(h.aggregate.steps) == 100  # storage never beyond the capacity


def test_per_tensor_history_is_bounded_by_its_cell_budget() -> None:
    # 2 tensors x 2 signals = 4 cells a step; 20 cells -> the last 5 steps.
    h = History("s", ["w", "b"], HistoryConfig(steps=50, tensor_values=20))
    for step in range(1, 13):
        record(h, step)
    q = h.query(tensors=["*"])
    assert q["tensor_capacity"] == 5
    assert q["aggregate"]["steps"] == list(range(1, 13))
    for name in ("w", "b"):
        assert q["tensors"][name]["steps"] == list(range(8, 13))
        assert q["tensors"][name]["values"]["lr_eff_p99"] == [10.0 + s for s in range(8, 13)]


def test_a_tensor_that_did_not_step_has_no_point_at_that_step() -> None:
    h = History("s", ["w", "b"], HistoryConfig())
    record(h, 1)
    record(h, 2, tensors=["w"])
    record(h, 3)
    q = h.query(tensors=["w", "b"])
    assert q["tensors"]["w"]["steps"] == [1, 2, 3]
    assert q["tensors"]["b"]["steps"] == [1, 3]
    assert "w" in h.event(2)["tensors"] and "b" not in h.event(2)["tensors"]  # type: ignore[index]


def test_filters_signal_since_and_limit() -> None:
    h = History("s", ["w"], HistoryConfig())
    for step in range(1, 11):
        record(h, step, tensors=["w"])
    q = h.query(signals=["lr_eff_p99"], tensors=["w"], since=3, limit=4)
    assert q["signals"] == ["lr_eff_p99"]
    assert q["aggregate"]["steps"] == [7, 8, 9, 10]
    assert set(q["aggregate"]["values"]) == {"lr_eff_p99"}
    assert q["tensors"]["w"]["steps"] == [7, 8, 9, 10]
    assert h.query(since=10)["aggregate"]["steps"] == []
    assert h.query(tensors=None)["tensors"] == {}


def test_a_signal_that_appears_later_is_missing_before() -> None:
    h = History("s", ["w"], HistoryConfig())
    record(h, 1, tensors=["w"])
    record(h, 2, tensors=["w"], shock_p99=3.5)
    q = h.query(tensors=["w"])
    assert same(q["aggregate"]["values"]["shock_p99"], [NAN, 3.5])
    assert same(q["tensors"]["w"]["values"]["shock_p99"], [NAN, 3.5])
    assert math.isnan(h.event(1)["aggregate"]["shock_p99"])  # type: ignore[index]


def test_going_back_in_time_drops_the_abandoned_steps() -> None:
    h = History("s", ["w"], HistoryConfig(steps=4))
    for step in range(1, 7):  # wrapped: steps 3..6 kept
        record(h, step, tensors=["w"])
    assert h.record(4, 99, 0.0, {"grad_norm": -1.0}, {"w": {"grad_norm": -1.0}}) is True
    q = h.query(tensors=["w"])
    assert q["aggregate"]["steps"] == [3, 4]
    assert q["aggregate"]["values"]["grad_norm"] == [3.0, -1.0]
    assert q["tensors"]["w"]["steps"] == [3, 4]
    record(h, 5, tensors=["w"])
    record(h, 6, tensors=["w"])
    record(h, 7, tensors=["w"])
    assert h.query()["aggregate"]["steps"] == [4, 5, 6, 7]


def test_losses_are_bounded_and_a_second_report_replaces_the_first() -> None:
    h = History("s", ["w"], HistoryConfig(steps=3))
    for step in range(1, 6):
        h.record_loss(step, step / 10, 0.0)
    h.record_loss(4, NAN, 0.0)
    q = h.query()
    assert q["loss"]["steps"] == [3, 5, 4]  # in the order reported
    assert same(q["loss"]["values"], [0.3, 0.5, NAN])
    assert h.latest_loss() == (4, q["loss"]["values"][2]) or math.isnan(h.latest_loss()[1])


# ---------------------------------------------------------------------- exports


def test_json_export_spells_nan_and_infinity_and_parses_back() -> None:
    h = History("s", ["w"], HistoryConfig())
    h.record(
        1,
        1,
        5.0,
        {"grad_norm": NAN, "shock_p99": INF},
        {"w": {"grad_norm": NAN, "shock_p99": -INF}},
    )
    h.record_loss(1, INF, 5.0)
    body = render_json(h.query(tensors=["*"]))
    raw = json.loads(body)  # strict JSON: no NaN/Infinity tokens
    assert raw["aggregate"]["values"] == {"grad_norm": ["NaN"], "shock_p99": ["Infinity"]}
    assert raw["tensors"]["w"]["values"]["shock_p99"] == ["-Infinity"]
    assert raw["loss"]["values"] == ["Infinity"]
    report = HistoryReport.model_validate_json(body)
    assert math.isnan(report.aggregate.values["grad_norm"][0])
    assert report.aggregate.values["shock_p99"] == [INF]
    assert report.tensors["w"].values["shock_p99"] == [-INF]


def test_csv_export_has_aggregate_and_tensor_rows_with_losses_joined() -> None:
    h = History("s", ["w", "b"], HistoryConfig())
    h.record_loss(0, 2.5, 0.0)  # before any step: a row of its own
    h.record(
        1,
        1,
        11.0,
        {"grad_norm": 1.5, "shock_p99": NAN},
        {"w": {"grad_norm": 0.25, "shock_p99": INF}, "b": {"grad_norm": 2.0}},
    )
    h.record(2, 2, 12.0, {"grad_norm": 3.0}, {"b": {"grad_norm": 4.0}})
    h.record_loss(2, 1.25, 12.5)
    rows = list(csv.reader(io.StringIO(h.csv(tensors=["*"]))))
    assert rows[0] == ["step", "time", "tensor", "loss", "grad_norm", "shock_p99"]
    assert rows[1:] == [
        ["0", "", "", "2.5", "", ""],
        ["1", "11.0", "", "", "1.5", "nan"],
        ["1", "11.0", "w", "", "0.25", "inf"],
        ["1", "11.0", "b", "", "2.0", "nan"],
        ["2", "12.0", "", "1.25", "3.0", "nan"],
        ["2", "12.0", "b", "", "4.0", "nan"],
    ]
    only = list(csv.reader(io.StringIO(h.csv(signals=["grad_norm"], since=1))))
    assert only == [
        ["step", "time", "tensor", "loss", "grad_norm"],
        ["2", "12.0", "", "1.25", "3.0"],
    ]


# ---------------------------------------------------------------------- alert rules


def evaluate(
    alerts: Alerts,
    rules: Sequence[AlertRule],
    step: int,
    tensors: Mapping[str, Mapping[str, float]],
    aggregate: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    return alerts.evaluate(rules, "s", step, step, 0.0, aggregate or {}, tensors)


def test_swing_fires_on_a_relative_change_above_the_threshold_once_per_episode() -> None:
    rule = AlertRule(kind="swing", signal="lr_eff_p99", threshold=0.5)
    a = Alerts()
    values = [1.0, 1.4, 0.6, 0.25, 0.24, 0.5, 0.5]
    fired = [evaluate(a, [rule], k + 1, {"w": {"lr_eff_p99": v}}) for k, v in enumerate(values)]
    # 1.0 -> 1.4 (+40%): no; 1.4 -> 0.6 (-57%): fires; 0.6 -> 0.25 (-58%): still holding,
    # no new event; -> 0.24: stops; -> 0.5 (+108%): fires again; -> 0.5: stops.
    assert [len(f) for f in fired] == [0, 0, 1, 0, 0, 1, 0]
    e = fired[2][0]
    assert (e["step"], e["tensor"], e["value"], e["previous"], e["rule"]) == (
        3,
        "w",
        0.6,
        1.4,
        "lr_eff_p99 swing > 0.5",
    )
    assert a.count == 2 and [x["step"] for x in a.events] == [3, 6]


def test_above_below_and_the_rule_scope() -> None:
    rules = [
        AlertRule(kind="above", signal="shock_p99", threshold=100.0),  # every tensor
        AlertRule(kind="below", signal="update_ratio", threshold=1e-6, tensor="b"),
        AlertRule(kind="above", signal="grad_norm", threshold=5.0, tensor=None),
    ]
    a = Alerts()
    out = evaluate(
        a,
        rules,
        1,
        {
            "w": {"shock_p99": 150.0, "update_ratio": 1e-9},
            "b": {"shock_p99": 99.0, "update_ratio": 1e-9},
        },
        aggregate={"grad_norm": 6.0, "shock_p99": 1e6},
    )
    assert sorted((e["rule"], e["tensor"]) for e in out) == [
        ("grad_norm > 5", None),
        ("shock_p99 > 100", "w"),
        ("update_ratio < 1e-06", "b"),
    ]
    assert {(x["rule"], x["tensor"]) for x in a.active_list()} == {
        ("grad_norm > 5", None),
        ("shock_p99 > 100", "w"),
        ("update_ratio < 1e-06", "b"),
    }
    # NaN is neither above nor below anything.
    out = evaluate(a, rules, 2, {"w": {"shock_p99": NAN}}, aggregate={"grad_norm": NAN})
    assert out == [] and len(a.active) == 1  # b did not step: its alert still holds


def test_nonfinite_fires_when_nan_or_inf_appears() -> None:
    counts = [AlertRule(kind="nonfinite")]
    a = Alerts()
    assert evaluate(a, counts, 1, {"w": {"nan_count": 0.0, "inf_count": 0.0}}) == []
    out = evaluate(a, counts, 2, {"w": {"nan_count": 3.0, "inf_count": 1.0}})
    assert [(e["tensor"], e["value"], e["kind"]) for e in out] == [("w", 4.0, "nonfinite")]
    assert evaluate(a, counts, 3, {"w": {"nan_count": 3.0, "inf_count": 0.0}}) == []
    by_signal = [AlertRule(kind="nonfinite", signal="lr_eff_p99")]
    b = Alerts()
    assert evaluate(b, by_signal, 1, {"w": {"lr_eff_p99": 1.0}}) == []
    out = evaluate(b, by_signal, 2, {"w": {"lr_eff_p99": INF}})
    assert out[0]["value"] == INF and out[0]["rule"] == "nonfinite lr_eff_p99"


def test_after_step_skips_the_warm_up_and_new_rules_start_clean() -> None:
    warm = [AlertRule(kind="above", signal="shock_p99", threshold=1.0, after_step=2)]
    a = Alerts()
    assert evaluate(a, warm, 1, {"w": {"shock_p99": 5.0}}) == []
    assert evaluate(a, warm, 2, {"w": {"shock_p99": 5.0}}) == []
    assert len(evaluate(a, warm, 3, {"w": {"shock_p99": 5.0}})) == 1
    other = [AlertRule(kind="above", signal="shock_p99", threshold=1.0, name="shock")]
    assert [e["rule"] for e in evaluate(a, other, 4, {"w": {"shock_p99": 5.0}})] == ["shock"]
    a.reset()
    assert len(evaluate(a, other, 5, {"w": {"shock_p99": 5.0}})) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"kind": "swing", "signal": "lr_eff_p99"}, "needs a signal and a threshold"),
        ({"kind": "above", "threshold": 1.0}, "needs a signal and a threshold"),
        ({"kind": "swing", "signal": "x", "threshold": 0.0}, "relative change > 0"),
        ({"kind": "nonfinite", "threshold": 1.0}, "takes no threshold"),
        ({"kind": "above", "signal": "x", "threshold": "Infinity"}, "finite number"),
        ({"kind": "sometimes", "signal": "x", "threshold": 1.0}, "'swing', 'above', 'below'"),
    ],
)
def test_invalid_rules_are_refused(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AlertRule.model_validate(body)


# ---------------------------------------------------------------------- the observer


def make_stepper(name: str = "s", amsgrad: bool = False, **hyper: Any) -> Stepper:
    g = torch.Generator().manual_seed(1)
    params = [("w", torch.randn(8, 4, generator=g)), ("b", torch.randn(4, generator=g))]
    return Stepper(
        name,
        "adam",
        torch.device("cpu"),
        params,
        {"lr": 1e-2, "amsgrad": amsgrad, "foreach": False, **hyper},
    )


def grads(k: int, names: Sequence[str] = ("w", "b")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    shapes = {"w": (8, 4), "b": (4,)}
    return {n: torch.randn(shapes[n], generator=g) for n in names}


def test_attach_puts_the_history_after_the_signals_once() -> None:
    s = make_stepper()
    first = attach_history(s)
    assert attach_history(s) is first and history_of(s) is first
    kinds = [type(o) for o in s.observers]
    assert kinds == [SignalObserver, HistoryObserver]


def test_the_history_holds_exactly_the_signals_of_every_step() -> None:
    s = make_stepper()
    seen: list[tuple[int, int]] = []
    obs = attach_history(s, sink=lambda o, seq: seen.append((o.history.latest()["step"], seq)))
    expected = []
    for k in range(6):
        s.step(grads(k, ("w", "b") if k != 3 else ("w",)))
        expected.append(copy.deepcopy(signals_of(s)))
    q = obs.history.query(tensors=["*"])
    assert q["aggregate"]["steps"] == [1, 2, 3, 4, 5, 6]
    # The signals, and each param group's schedule (group0.lr, ...: one group here).
    assert set(q["signals"]) == set(SIGNALS) | {f"group0.{f}" for f in GROUP_FIELDS}
    for i, signals in enumerate(expected):
        assert signals["step"] == i + 1
        assert same(
            {k: q["aggregate"]["values"][k][i] for k in signals["aggregate"]}, signals["aggregate"]
        )
        assert q["aggregate"]["time"][i] == signals["time"]
        event = obs.event(seen[i][1])
        assert event is not None and event["step"] == i + 1
        assert same(event["aggregate"], signals["aggregate"])
        # (the history's columns are shared: a tensor's row also has the aggregate-only
        # group columns, NaN)
        tensors = {n: {k: t[k] for k in SIGNALS} for n, t in event["tensors"].items()}
        assert same(tensors, signals["tensors"])
    assert q["tensors"]["b"]["steps"] == [1, 2, 3, 5, 6]  # b had no gradient at step 4
    assert [step for step, _ in seen] == [1, 2, 3, 4, 5, 6]
    seqs = [seq for _, seq in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6


def recorded(obs: HistoryObserver) -> list[tuple[int, Any, Any]]:
    """Every step the history holds: (step, aggregate, per-tensor signals)."""
    return [(e["step"], e["aggregate"], e["tensors"]) for e in obs.events()]


def test_deferred_observers_record_each_step_as_inline_ones_do() -> None:
    """With ``defer_after_step`` the signals and history of a step wait for settle() (or
    the next mutation, which settles first), and are then what an inline stepper records:
    nothing they read has changed in between."""
    inline, deferred = make_stepper("a"), make_stepper("b")
    a, b = attach_history(inline), attach_history(deferred)
    deferred.defer_after_step = True
    for k in range(8):
        inline.step(grads(k))
        outcome = deferred.step(grads(k))
        assert outcome.step == k + 1 == deferred.step_count
        assert signals_of(deferred).get("step") == (k or None)  # the last step's, not this one's
        if k % 3 == 0:
            deferred.settle()
            assert signals_of(deferred)["step"] == k + 1
        if k == 4:  # a mutation between steps: the step is recorded before it changes anything
            deferred.put_params({"b": torch.zeros(4)})
            inline.put_params({"b": torch.zeros(4)})
    assert len(recorded(b)) == 7  # the eighth waits for settle
    deferred.settle()
    deferred.settle()  # nothing left: a no-op
    assert same(recorded(b), recorded(a)) and len(recorded(a)) == 8
    assert b.metrics()["steps_total"] == 8 and b.metrics()["latency_sum"] > 0


def test_step_metrics_count_every_step_in_a_cumulative_histogram() -> None:
    s = make_stepper()
    obs = attach_history(s)
    for k in range(5):
        s.step(grads(k))
    m = obs.metrics()
    assert m["steps_total"] == 5
    assert len(m["latency_cumulative"]) == len(LATENCY_BUCKETS) + 1
    assert m["latency_cumulative"][-1] == 5
    assert m["latency_cumulative"] == sorted(m["latency_cumulative"])
    assert m["latency_sum"] > 0


def test_a_failing_sink_never_fails_the_step() -> None:
    s = make_stepper()

    def broken(observer: HistoryObserver, seq: int) -> None:
        raise RuntimeError("sink down")

    obs = attach_history(s, sink=broken)
    twin = make_stepper()
    for k in range(3):
        s.step(grads(k))
        twin.step(grads(k))
    assert s.step_count == 3 and obs.failures == 3
    for a, b in zip(s.params, twin.params, strict=True):
        assert torch.equal(a, b)  # the step itself is PyTorch's, untouched


def test_rules_live_in_the_journal_and_travel_with_checkpoints() -> None:
    s = make_stepper()
    attach_history(s)
    assert rules_of(s) == (list(DEFAULT_RULES), True)
    version = s.version
    rules = [AlertRule(kind="above", signal="grad_norm", threshold=2.0, tensor="w")]
    set_rules(s, rules)
    assert s.version > version and s.journal[JOURNAL_KEY][0]["signal"] == "grad_norm"
    assert rules_of(s) == (rules, False)
    copy_of = checkpoints.build(checkpoints.decode(checkpoints.encode(s).data), torch.device("cpu"))
    assert rules_of(copy_of) == (rules, False)
    set_rules(s, None)
    assert rules_of(s) == (list(DEFAULT_RULES), True) and JOURNAL_KEY not in s.journal


def test_the_summary_brief_is_json_safe() -> None:
    s = make_stepper()
    obs = attach_history(s)
    # shock_p99 is NaN (undefined) at a tensor's first step: from step 2 on.
    set_rules(s, [AlertRule(kind="nonfinite", signal="shock_p99", after_step=1)])
    assert summary_fields(s) == {"alerts": {"count": 0, "active": 0, "latest": None}}
    bad = grads(0)
    bad["w"][0, 0] = INF
    s.step(grads(1))
    s.step(bad)  # the shock of an Inf gradient is not finite
    brief = summary_fields(s)["alerts"]
    assert brief["count"] == obs.alerts.count == 1
    assert math.isfinite(obs.alerts.events[0]["value"]) is False
    assert brief["latest"]["value"] in ("NaN", "Infinity")
    json.dumps(brief, allow_nan=False)
    assert summary_fields(make_stepper("bare")) == {}


# ---------------------------------------------------------------------- the alert bar


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_alert_bar_a_late_jump_of_v_swings_adams_effective_lr_but_not_amsgrads(
    amsgrad: bool,
) -> None:
    """The sequence and why it must do this: tests/alert_bar.py."""
    s = Stepper(
        "bar",
        "adam",
        torch.device("cpu"),
        [("w", torch.zeros(alert_bar.NUMEL))],
        {"lr": alert_bar.LR, "betas": alert_bar.BETAS, "amsgrad": amsgrad, "foreach": False},
    )
    obs = attach_history(s)
    set_rules(s, [alert_bar.RULE])
    p99 = []
    for g in alert_bar.gradients():
        s.step({"w": g})
        p99.append(signals_of(s)["tensors"]["w"]["lr_eff_p99"])
    swings = [abs(b - a) / a for a, b in zip(p99, p99[1:], strict=False)]
    late = max(swings[10:])  # after the warm-up
    events = list(obs.alerts.events)
    if amsgrad:
        assert late < 0.05, late
        assert events == []
        assert summary_fields(s)["alerts"]["count"] == 0
    else:
        assert swings[alert_bar.SPIKE_STEP - 2] == late > 0.7  # the spike's step only
        assert [(e["step"], e["tensor"], e["rule"]) for e in events] == [
            (alert_bar.SPIKE_STEP, "w", "lr_eff_p99 swing > 0.5")
        ]
        assert events[0]["value"] < events[0]["previous"]  # the effective LR fell
        assert summary_fields(s)["alerts"]["count"] == 1
