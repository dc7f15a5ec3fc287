"""Statistics of tensors and of Adam's derived views (adamscope.service.inspect.stats,
views), each checked against an independent computation in plain torch/numpy on the full
tensors.

Tolerances, where a value is not compared exactly: norms, means and standard deviations
are accumulated in float32 by torch for float32 data (relative 1e-5 against numpy's
float64); quantiles are compared at relative 1e-12 (the same order statistics, interpolated
by two float64 formulas); histograms, counts, fractions, effective-LR tensors and dry-run
results are compared exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from inspect_support import (
    CPU,
    DEVICES,
    QREL,
    assert_moments,
    assert_quantiles,
    close,
    f64,
    randn,
    reference_views,
    stepped,
)

from adamscope.service.engine import Stepper
from adamscope.service.engine.errors import UnknownParameter
from adamscope.service.inspect import stats as st
from adamscope.service.inspect import views

# ---------------------------------------------------------------------- describe


def test_describe_matches_numpy_on_every_statistic() -> None:
    x = randn((300, 41), 1)
    x[3, 4] = math.nan
    x[5, 5] = math.inf
    x[6, 6] = -math.inf
    x[0, :17] = 0
    qs = (0.0, 0.01, 0.25, 0.5, 0.99, 1.0)
    spec = st.StatsSpec(quantiles=qs, bins=16, log=True)
    stats = st.describe(st.Source.of(x), spec).stats
    a = f64(x)
    finite = a[np.isfinite(a)]
    assert_moments(stats, a)
    assert_quantiles(stats, a, qs)
    assert not stats["sampled"] and stats["sample_size"] == finite.size
    counts, edges = np.histogram(finite, bins=16, range=(finite.min(), finite.max()))
    assert stats["hist"]["counts"] == counts.tolist()
    assert stats["hist"]["edges"] == edges.tolist()
    assert stats["hist"]["below"] == stats["hist"]["above"] == 0
    nonzero = finite[finite != 0]
    logs = torch.log10(torch.from_numpy(np.abs(nonzero))).numpy()
    lcounts, ledges = np.histogram(logs, bins=16, range=(logs.min(), logs.max()))
    assert stats["log_hist"]["counts"] == lcounts.tolist()
    assert stats["log_hist"]["edges"] == ledges.tolist()
    assert stats["log_hist"]["zeros"] == 17
    assert stats["log_hist"]["negative"] == int((finite < 0).sum())


@pytest.mark.parametrize("ties", [False, True])
def test_quantiles_of_large_tensors_select_instead_of_sorting(ties: bool) -> None:
    n = (1 << 16) + 1001  # above the sort limit: kthvalue and the next order statistic
    x = torch.randint(0, 7, (n,)).float() if ties else randn((n,), 9)
    qs = (0.0, 0.01, 0.3333, 0.5, 0.99, 1.0)
    got = st.quantiles_of(x, qs)
    want = np.quantile(f64(x), qs)
    assert all(close(g, float(w), rel=QREL, abs_=0.0) for g, w in zip(got, want, strict=True))


def test_a_given_histogram_range_counts_what_falls_outside() -> None:
    x = randn((5000,), 2, torch.float64)
    stats = st.describe(st.Source.of(x), st.StatsSpec(bins=10, hist_range=(-1.0, 0.5))).stats
    a = f64(x)
    counts, _ = np.histogram(a, bins=10, range=(-1.0, 0.5))
    assert stats["hist"]["counts"] == counts.tolist()
    assert stats["hist"]["below"] == int((a < -1.0).sum())
    assert stats["hist"]["above"] == int((a > 0.5).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.complex64])
def test_describe_other_dtypes(dtype: torch.dtype) -> None:
    x = randn((64, 9), 3, dtype)
    stats = st.describe(st.Source.of(x), st.StatsSpec(quantiles=(0.1, 0.9))).stats
    assert_moments(stats, f64(x))
    assert_quantiles(stats, f64(x), (0.1, 0.9))


def test_all_nonfinite_and_empty_tensors_have_undefined_moments() -> None:
    x = torch.tensor([math.nan, math.inf])
    stats = st.describe(st.Source.of(x), st.StatsSpec()).stats
    assert (stats["nan"], stats["inf"], stats["finite"]) == (1, 1, 0)
    assert all(math.isnan(stats[k]) for k in ("mean", "std", "min", "max"))
    assert all(math.isnan(v) for v in stats["quantiles"].values())
    assert st.describe(st.Source.of(torch.zeros(0)), st.StatsSpec()).stats["numel"] == 0


def test_a_constant_tensor_gets_numpys_unit_histogram() -> None:
    stats = st.describe(st.Source.of(torch.full((10,), 2.0)), st.StatsSpec(bins=4)).stats
    counts, edges = np.histogram(np.full(10, 2.0), bins=4)
    assert stats["hist"]["counts"] == counts.tolist()
    assert stats["hist"]["edges"] == edges.tolist()


@pytest.mark.parametrize(
    "bad",
    [
        dict(quantiles=(1.5,)),
        dict(bins=-1),
        dict(bins=10_000),
        dict(hist_range=(1.0, 1.0)),
        dict(log=True, bins=0),
        dict(quantiles=tuple([0.5] * 40)),
    ],
)
def test_a_bad_spec_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        st.StatsSpec(**bad)


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a few thousand elements "large": the chunked and sampled paths run quickly."""
    monkeypatch.setattr(st, "EXACT_LIMIT", 1000)
    monkeypatch.setattr(st, "CHUNK", 700)
    monkeypatch.setattr(st, "SAMPLE_SIZE", 256)


@pytest.mark.usefixtures("small_limits")
def test_large_tensors_reduce_exactly_in_chunks_and_sample_the_distribution() -> None:
    x = randn((120, 50), 4) + 3.0  # a mean far from 0 tests the two-pass deviations
    x[7, 7] = math.nan
    x[100, 3] = 0.0
    spec = st.StatsSpec(quantiles=(0.01, 0.5, 0.99), bins=8)
    stats = st.describe(st.Source.of(x), spec).stats
    a = f64(x)
    assert_moments(stats, a)
    plan = st.sample_plan(a.size, 256, 50)
    sample = a[plan.start :: plan.stride][: plan.count]
    assert stats["sampled"] and stats["sample_size"] == np.isfinite(sample).sum() <= 256
    assert_quantiles(stats, sample, (0.01, 0.5, 0.99))
    finite = sample[np.isfinite(sample)]
    counts, _ = np.histogram(finite, bins=8, range=(stats["min"], stats["max"]))
    assert stats["hist"]["counts"] == counts.tolist()


def test_the_sample_plan_is_deterministic_bounded_and_visits_every_column() -> None:
    assert st.sample_plan(100, 1000) == st.Plan(0, 1, 100)
    for numel, size, last in [(10_000, 100, 100), (1 << 20, 4096, 4096), (999_999, 777, 3)]:
        plan = st.sample_plan(numel, size, last)
        assert plan == st.sample_plan(numel, size, last)
        assert 0 < plan.count <= size and plan.start + (plan.count - 1) * plan.stride < numel
        assert math.gcd(plan.stride, last) == 1
        columns = {(plan.start + i * plan.stride) % last for i in range(plan.count)}
        assert len(columns) == min(last, plan.count)


def test_aggregate_is_the_concatenation() -> None:
    parts = [randn((40, 3), 5), randn((7,), 6), randn((2, 2), 7, torch.float64)]
    spec = st.StatsSpec(quantiles=(0.05, 0.5, 0.95), bins=5)
    described = [st.describe(st.Source.of(t), spec, keep_values=True) for t in parts]
    stats = st.aggregate(described, spec)
    a = np.concatenate([f64(t) for t in parts])
    assert_moments(stats, a)
    assert_quantiles(stats, a, (0.05, 0.5, 0.95))
    counts, _ = np.histogram(a, bins=5, range=(a.min(), a.max()))
    assert stats["hist"]["counts"] == counts.tolist() and not stats["sampled"]


@pytest.mark.usefixtures("small_limits")
def test_aggregate_of_large_tensors_pools_proportional_samples() -> None:
    parts = [randn((3000,), 8), randn((600,), 9)]
    spec = st.StatsSpec(quantiles=(0.5,), bins=4)
    stats = st.aggregate([st.describe(st.Source.of(t), spec) for t in parts], spec)
    assert_moments(stats, np.concatenate([f64(t) for t in parts]))
    pooled = []
    for t in parts:
        n = max(1, round(256 * t.numel() / 3600))
        plan = st.sample_plan(t.numel(), n)
        pooled.append(f64(t)[plan.start :: plan.stride][: plan.count])
    assert stats["sampled"]
    assert_quantiles(stats, np.concatenate(pooled), (0.5,))


# ---------------------------------------------------------------------- Adam views


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("steps", [1, 2, 1000])
@pytest.mark.parametrize(
    "dtype,amsgrad",
    [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True), (torch.float64, False)],
)
def test_views_equal_pytorchs_for_loop_bit_for_bit(
    steps: int, dtype: torch.dtype, amsgrad: bool, device: str
) -> None:
    s, ctx = stepped(dtype, amsgrad, steps, device=device)
    assert ctx["state"]["step"].item() == steps
    ref = reference_views(ctx["p"], ctx["state"], ctx["group"])
    qs = (0.01, 0.5, 0.99)
    report = views.describe_optimizer(s, None, list(ref), st.StatsSpec(quantiles=qs, bins=6))
    for key, want in ref.items():
        view = views.view_of(ctx["p"], ctx["state"], ctx["group"], key)
        assert not isinstance(view, str)
        got = view.select(())
        assert got.dtype == want.dtype and torch.equal(got, want), key
        stats = report["tensors"]["w"][key]
        assert_moments(stats, f64(want))
        assert_quantiles(stats, f64(want), qs)
        assert report["aggregate"][key]["quantiles"] == stats["quantiles"]


def test_the_update_view_is_the_last_steps_change() -> None:
    s = Stepper("u", "adam", CPU, [("w", randn((50,), 1))], {"lr": 0.01, "foreach": False})
    s.step({"w": randn((50,), 2)})
    before = s.params[0].detach().clone()
    s.step({"w": randn((50,), 3)})
    p = s.params[0]
    view = views.view_of(p, s.optimizer.state[p], s.optimizer.param_groups[0], "update")
    assert not isinstance(view, str)
    change = p.detach() - before
    ulp = torch.finfo(torch.float32).eps * before.abs().max()
    assert torch.allclose(view.select(()), change, rtol=0, atol=2 * float(ulp))


def test_views_that_do_not_exist_say_why() -> None:
    s = Stepper("m", "adam", CPU, [("w", torch.zeros(3))], {"lr": 0.1})
    p, g = s.params[0], s.optimizer.param_groups[0]
    assert "not stepped" in str(views.view_of(p, {}, g, "lr_eff"))
    s.step({"w": torch.ones(3)})
    assert "amsgrad" in str(views.view_of(p, s.optimizer.state[p], g, "max_exp_avg_sq"))
    s.put_state({"w": {"step": torch.tensor(0.0)}})
    assert "step is 0" in str(views.view_of(p, s.optimizer.state[p], g, "m_hat"))
    report = views.describe_optimizer(s, None, ["param", "m_hat"], st.StatsSpec())
    assert report["missing"] == [
        {"name": "w", "key": "m_hat", "reason": views.view_of(p, s.optimizer.state[p], g, "m_hat")}
    ]
    with pytest.raises(UnknownParameter):
        views.describe_optimizer(s, ["nope"], ["param"], st.StatsSpec())
    with pytest.raises(ValueError):
        views.describe_optimizer(s, None, ["grad"], st.StatsSpec())
