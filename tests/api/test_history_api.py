"""History, alert rules and reported losses through the real app in process.

The history's values are checked against the signals the engine's SignalObserver left on
the stepper after each step (read from the registry right after the step), exactly.
"""

from __future__ import annotations

import copy
import csv
import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from api_support import SPEC, V1, assert_problem, create, grads, initial_values, snapshot, step
from fastapi.testclient import TestClient

from adamscope.client.protocol import AlertsReport, HistoryReport, StepperList, StepperSummary
from adamscope.service.app import create_app
from adamscope.service.inspect.signals import SIGNALS, signals_of
from adamscope.service.settings import Settings

NAME = SPEC["name"]
VALUES = initial_values()


def signals_after_steps(c: TestClient, n: int, name: str = NAME) -> list[dict[str, Any]]:
    """Step ``n`` times; the engine's signals after each step."""
    stepper = c.app.state.registry.get(name)  # type: ignore[attr-defined]
    out = []
    for k in range(n):
        r = step(c, name, grads(VALUES, k))
        assert r.status_code == 200, r.text
        out.append(copy.deepcopy(signals_of(stepper)))
    return out


def equal(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.fixture
def net(app_client: TestClient) -> TestClient:
    create(app_client, SPEC, VALUES)
    return app_client


def test_history_is_what_the_engine_computed_at_every_step(net: TestClient) -> None:
    expected = signals_after_steps(net, 4)
    r = net.get(f"{V1}/{NAME}/history", params=[("tensor", "*")])
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    report = HistoryReport.model_validate(r.json())
    assert report.aggregate.steps == [1, 2, 3, 4]
    # the signals and each param group's schedule (group<i>.lr, ...)
    assert set(report.signals) == set(expected[-1]["aggregate"]) > set(SIGNALS)
    assert report.capacity == 10_000
    for i, sig in enumerate(expected):
        assert report.aggregate.time[i] == sig["time"]
        for s in SIGNALS:
            assert equal(report.aggregate.values[s][i], sig["aggregate"][s]), (i, s)
            for t in ("w", "b", "h"):
                assert equal(report.tensors[t].values[s][i], sig["tensors"][t][s]), (i, t, s)
    # shock and gamma are undefined at a tensor's first step: sent as "NaN"
    assert r.json()["aggregate"]["values"]["shock_p99"][0] == "NaN"


def test_history_filters_and_csv(net: TestClient) -> None:
    expected = signals_after_steps(net, 5)
    q = [
        ("signal", "grad_norm"),
        ("signal", "lr_eff_p99"),
        ("tensor", "w"),
        ("since", "2"),
        ("limit", "2"),
    ]
    report = HistoryReport.model_validate(net.get(f"{V1}/{NAME}/history", params=q).json())
    assert report.signals == ["grad_norm", "lr_eff_p99"]
    assert report.aggregate.steps == [4, 5] and set(report.tensors) == {"w"}
    assert report.tensors["w"].values["lr_eff_p99"] == [
        expected[3]["tensors"]["w"]["lr_eff_p99"],
        expected[4]["tensors"]["w"]["lr_eff_p99"],
    ]
    for how in (
        {"params": [*q, ("format", "csv")]},
        {"params": q, "headers": {"accept": "text/csv"}},
    ):
        r = net.get(f"{V1}/{NAME}/history", **how)  # type: ignore[arg-type]
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert [(x["step"], x["tensor"]) for x in rows] == [
            ("4", ""),
            ("4", "w"),
            ("5", ""),
            ("5", "w"),
        ]
        assert float(rows[3]["lr_eff_p99"]) == expected[4]["tensors"]["w"]["lr_eff_p99"]
        assert float(rows[2]["grad_norm"]) == expected[4]["aggregate"]["grad_norm"]


@pytest.mark.parametrize(
    ("query", "code", "fragment"),
    [
        (
            [("signal", "loss_of_faith")],
            "request_validation_error",
            "unknown signal 'loss_of_faith'",
        ),
        ([("tensor", "nope")], "unknown_parameter", "no parameter 'nope'"),
        ([("since", "-1")], "request_validation_error", "since"),
        ([("limit", "0")], "request_validation_error", "limit"),
        ([("format", "xml")], "request_validation_error", "format"),
    ],
)
def test_bad_history_queries_are_problems(
    net: TestClient, query: list[tuple[str, str]], code: str, fragment: str
) -> None:
    assert_problem(net.get(f"{V1}/{NAME}/history", params=query), code, fragment)
    assert_problem(net.get(f"{V1}/nobody/history"), "stepper_not_found")


def test_reported_losses_join_the_history(net: TestClient) -> None:
    signals_after_steps(net, 2)
    r = net.post(f"{V1}/{NAME}/loss", json={"loss": 0.75})
    assert r.status_code == 200, r.text
    assert r.json()["step"] == 2 and r.json()["loss"] == 0.75  # default: the current step
    assert net.post(f"{V1}/{NAME}/loss", json={"step": 1, "loss": "NaN"}).status_code == 200
    assert (
        net.post(f"{V1}/{NAME}/loss", json={"step": 5, "loss": "-Infinity"}).json()["loss"]
        == "-Infinity"
    )
    raw = net.get(f"{V1}/{NAME}/history").json()
    assert raw["loss"] == {"steps": [2, 1, 5], "values": [0.75, "NaN", "-Infinity"]}
    rows = list(
        csv.DictReader(io.StringIO(net.get(f"{V1}/{NAME}/history", params={"format": "csv"}).text))
    )
    assert [(x["step"], x["loss"]) for x in rows] == [("1", "nan"), ("2", "0.75"), ("5", "-inf")]


@pytest.mark.parametrize(
    "body", [{"loss": "abc"}, {"step": -1, "loss": 1.0}, {}, {"loss": 1.0, "extra": 1}]
)
def test_bad_losses_are_refused(net: TestClient, body: dict[str, Any]) -> None:
    assert_problem(net.post(f"{V1}/{NAME}/loss", json=body), "request_validation_error")
    assert net.get(f"{V1}/{NAME}/history").json()["loss"]["steps"] == []


def test_default_rules_then_replaced_then_back(net: TestClient) -> None:
    report = AlertsReport.model_validate(net.get(f"{V1}/{NAME}/alerts").json())
    assert report.defaults and [r.kind for r in report.rules] == [
        "nonfinite",
        "swing",
        "above",
        "above",
    ]
    rules = [
        {"kind": "above", "signal": "grad_norm", "threshold": 0.0, "tensor": "*"},
        {
            "kind": "swing",
            "signal": "lr_eff_p50",
            "threshold": 0.25,
            "tensor": None,
            "name": "aggregate lr",
        },
    ]
    r = net.put(f"{V1}/{NAME}/alerts", json={"rules": rules})
    assert r.status_code == 200, r.text
    report = AlertsReport.model_validate(r.json())
    assert not report.defaults
    assert [(x.kind, x.tensor, x.label()) for x in report.rules] == [
        ("above", "*", "grad_norm > 0"),
        ("swing", None, "aggregate lr"),
    ]
    assert AlertsReport.model_validate(net.get(f"{V1}/{NAME}/alerts").json()).rules == report.rules
    back = AlertsReport.model_validate(net.put(f"{V1}/{NAME}/alerts", json={"rules": None}).json())
    assert back.defaults and len(back.rules) == 4


def test_alerts_show_in_the_report_the_summary_and_the_list(net: TestClient) -> None:
    rule = {"kind": "above", "signal": "grad_norm", "threshold": 0.0}
    assert net.put(f"{V1}/{NAME}/alerts", json={"rules": [rule]}).status_code == 200
    signals_after_steps(net, 2)
    report = AlertsReport.model_validate(net.get(f"{V1}/{NAME}/alerts").json())
    # Edge-triggered: each tensor's gradient norm is above 0 from step 1 on: one event each.
    assert report.count == 3
    assert sorted((e.step, e.tensor) for e in report.events) == [(1, "b"), (1, "h"), (1, "w")]
    assert sorted(a.tensor or "" for a in report.active) == ["b", "h", "w"]
    summary = StepperSummary.model_validate(net.get(f"{V1}/{NAME}").json())
    assert summary.alerts is not None and (summary.alerts.count, summary.alerts.active) == (3, 3)
    assert summary.alerts.latest == report.events[-1]
    listed = StepperList.model_validate(net.get(V1).json()).steppers[0]
    assert listed.alerts == summary.alerts
    assert net.get(f"{V1}/{NAME}/alerts", params={"limit": 1}).json()["events"] == [
        report.events[-1].model_dump(mode="json")
    ]


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        (
            {"rules": [{"kind": "above", "signal": "grad_norm"}]},
            "request_validation_error",
            "needs a signal and a threshold",
        ),
        (
            {"rules": [{"kind": "above", "signal": "vibes", "threshold": 1}]},
            "request_validation_error",
            "unknown signal 'vibes'",
        ),
        (
            {"rules": [{"kind": "nonfinite", "tensor": "nope"}]},
            "unknown_parameter",
            "names tensor 'nope'",
        ),
        ({"rules": [{"kind": "nonfinite"}] * 101}, "request_validation_error", "at most 100"),
        ({}, "request_validation_error", "rules"),
    ],
)
def test_bad_rules_are_refused_and_change_nothing(
    net: TestClient, body: dict[str, Any], code: str, fragment: str
) -> None:
    signals_after_steps(net, 1)
    before = snapshot(net, NAME), net.get(f"{V1}/{NAME}/alerts").json()
    assert_problem(net.put(f"{V1}/{NAME}/alerts", json=body), code, fragment)
    assert (snapshot(net, NAME), net.get(f"{V1}/{NAME}/alerts").json()) == before


@pytest.mark.parametrize("durable", [True, False])
def test_rules_and_the_history_survive_a_restart(tmp_path: Path, durable: bool) -> None:
    settings = Settings(data_dir=tmp_path / "data", device="cpu", history_durable=durable)
    rules = [{"kind": "below", "signal": "update_ratio", "threshold": 1e-8, "tensor": "w"}]
    with TestClient(create_app(settings)) as c:
        create(c, SPEC, VALUES)
        assert c.put(f"{V1}/{NAME}/alerts", json={"rules": rules}).status_code == 200
        assert step(c, NAME, grads(VALUES, 0)).status_code == 200
        before = c.get(f"{V1}/{NAME}/history", params={"tensor": "*"}).json()
    with TestClient(create_app(settings)) as c:
        report = AlertsReport.model_validate(c.get(f"{V1}/{NAME}/alerts").json())
        assert not report.defaults and report.rules[0].signal == "update_ratio"
        # durable: the history is found again in the data directory; in memory: empty
        after = c.get(f"{V1}/{NAME}/history", params={"tensor": "*"}).json()
        if durable:
            assert after == before
        else:
            assert after["aggregate"]["steps"] == []
        assert step(c, NAME, grads(VALUES, 1)).status_code == 200
        steps = c.get(f"{V1}/{NAME}/history").json()["aggregate"]["steps"]
        assert steps == ([1, 2] if durable else [2])


def test_a_restored_snapshot_drops_the_abandoned_history(net: TestClient) -> None:
    signals_after_steps(net, 2)
    assert net.post(f"{V1}/{NAME}/snapshots", json={"name": "two"}).status_code == 201
    signals_after_steps(net, 2)
    assert net.post(f"{V1}/{NAME}/snapshots/two/restore").status_code == 200
    assert step(net, NAME, {"w": torch.ones(2, 3)}).status_code == 200
    steps = net.get(f"{V1}/{NAME}/history").json()["aggregate"]["steps"]
    assert steps == [1, 2, 3]


# ---------------------------------------------------------------------- the whole run


def summary_of(values: list[float]) -> tuple[float, float, float]:
    """(mean, min, max) of the values that are not NaN, in float64, independently."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan, math.nan
    return math.fsum(kept) / len(kept), min(kept), max(kept)


def close(a: float, b: float) -> bool:
    return equal(a, b) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)


def test_the_whole_run_is_queryable_from_step_one_in_tiers(tmp_path: Path) -> None:
    """A raw window of 8 steps, tiers of 4 and 16 steps with 3 buckets each: after 60 steps
    the history reaches step 1 only through buckets, whose mean, min and max must be those
    of the engine's signals over exactly the steps each point covers."""
    settings = Settings(
        data_dir=tmp_path,
        device="cpu",
        history_steps=8,
        history_tier_widths=[4, 16],
        history_tier_buckets=3,
    )
    with TestClient(create_app(settings)) as c:
        create(c, SPEC, VALUES)
        expected = signals_after_steps(c, 60)
        for k in range(1, 61, 3):
            assert c.post(f"{V1}/{NAME}/loss", json={"step": k, "loss": k / 10}).status_code == 200
        assert c.get(f"{V1}/{NAME}/history").json()["aggregate"]["steps"] == list(range(53, 61))
        r = c.get(f"{V1}/{NAME}/history", params=[("from", "1"), ("tensor", "w")])
        report = HistoryReport.model_validate(r.json())
        assert report.first_step == 1
        for series, pick in (
            (report.aggregate, lambda e: e["aggregate"]),
            (report.tensors["w"], lambda e: e["tensors"]["w"]),
        ):
            assert series.first_steps is not None and series.counts is not None
            assert series.min is not None and series.max is not None
            assert series.first_steps[0] == 1 and series.steps[-1] == 60
            assert series.first_steps[1:] == [s + 1 for s in series.steps[:-1]]  # no gap
            assert any(c > 1 for c in series.counts)  # downsampled
            for i, (lo, hi) in enumerate(zip(series.first_steps, series.steps, strict=True)):
                assert series.counts[i] == hi - lo + 1
                for s in ("grad_norm", "lr_eff_p99", "shock_p99"):
                    want = summary_of([pick(expected[k - 1])[s] for k in range(lo, hi + 1)])
                    got = (series.values[s][i], series.min[s][i], series.max[s][i])
                    assert all(close(a, b) for a, b in zip(got, want, strict=True)), (s, lo, hi)
        losses = dict(zip(report.loss.steps, report.loss.values, strict=True))
        assert sum(1 for _ in losses) <= 20 and losses[58] == 5.8  # raw at the end
        few = c.get(f"{V1}/{NAME}/history", params={"max_points": 2, "signal": "grad_norm"})
        small = HistoryReport.model_validate(few.json())
        assert len(small.aggregate.steps) <= 2 and sum(small.aggregate.counts or []) == 60
        assert small.aggregate.values["grad_norm"][0] == pytest.approx(
            summary_of([e["aggregate"]["grad_norm"] for e in expected[: small.aggregate.steps[0]]])[
                0
            ]
        )
        window = c.get(f"{V1}/{NAME}/history", params={"from": 55, "to": 57}).json()
        assert window["aggregate"]["steps"] == [55, 56, 57]
        text = c.get(f"{V1}/{NAME}/history", params={"from": 1, "format": "csv"}).text
        rows = list(csv.DictReader(io.StringIO(text)))
        assert rows[0]["first_step"] == "1" and rows[-1]["step"] == "60"
        assert {"count", "min(grad_norm)", "max(grad_norm)"} <= set(rows[0])
        mixed = c.get(f"{V1}/{NAME}/history", params={"from": 1, "limit": 3})
        assert_problem(mixed, "request_validation_error", "do not mix")


def test_a_deleted_stepper_takes_its_history_along(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu")
    with TestClient(create_app(settings)) as c:
        create(c, SPEC, VALUES)
        signals_after_steps(c, 3)
        assert (tmp_path / "steppers" / NAME / "history.sqlite").is_file()
        assert c.delete(f"{V1}/{NAME}").status_code == 204
        assert not (tmp_path / "steppers" / NAME).exists()
        create(c, SPEC, VALUES)  # the same name again: a history of its own
        assert c.get(f"{V1}/{NAME}/history", params={"from": 1}).json()["aggregate"]["steps"] == []
        signals_after_steps(c, 1)
    with TestClient(create_app(settings)) as c:
        assert c.get(f"{V1}/{NAME}/history", params={"from": 1}).json()["aggregate"]["steps"] == [1]
