"""Per-step signals (adamscope.service.inspect.signals and its kernels), each checked
against an independent computation in plain torch/numpy on the full tensors, with the
tolerances test_stats.py states (effective-LR tensors, counts and fractions exactly)."""

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
    REL,
    close,
    f64,
    grads_for,
    randn,
    real,
    reference_views,
    registered,
)

from adamscope.client.numerics import adam_factors
from adamscope.service.engine import GroupDef, Stepper
from adamscope.service.inspect import signals as observer_module
from adamscope.service.inspect.kernels import assemble as kernel_assemble
from adamscope.service.inspect.kernels import sampling
from adamscope.service.inspect.schedule import GROUP_FIELDS
from adamscope.service.inspect.signals import SIGNALS, attach_signals, observer_of, signals_of


def lr_eff_of(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
    return reference_views(p, state, group)["lr_eff"]


def snapshot_state(s: Stepper) -> dict[str, dict[str, Any]]:
    out = {}
    for n in s.names:
        p = s.params[s.index[n]]
        out[n] = {
            "p": p.detach().clone(),
            "group": s.optimizer.param_groups[s.group_of[n]],
            "state": {k: v.clone() for k, v in s.optimizer.state.get(p, {}).items()},
        }
    return out


def expected_signals(
    before: dict[str, dict[str, Any]], s: Stepper, grads: dict[str, torch.Tensor]
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Every signal from the full tensors, independently (float64 numpy, PyTorch's views)."""
    per: dict[str, dict[str, float]] = {}
    pools: dict[str, list[np.ndarray]] = {"lr": [], "shock": []}
    sums: dict[str, float] = {}
    for n, g in grads.items():
        b = before[n]
        p = s.params[s.index[n]]
        state = s.optimizer.state[p]
        group = b["group"]
        gn, p0, p1 = f64(g), f64(b["p"]), f64(p)
        m, v = f64(state["exp_avg"]), f64(state["exp_avg_sq"])
        lr = f64(lr_eff_of(p, state, group))
        t = state["step"].item()
        root = (
            real(state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]).sqrt()
            / (1 - group["betas"][1] ** t) ** 0.5
        )
        shock = np.full(gn.size, np.nan)
        grew = np.nan
        if b["state"]:
            prev_lr = f64(lr_eff_of(b["p"], b["state"], group))
            both = ~np.isnan(lr) & ~np.isnan(prev_lr)
            grew = float((lr > prev_lr)[both].mean())
            # v_hat(t-1) of the denominator: max_exp_avg_sq's under amsgrad.
            v_prev = f64(b["state"]["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"])
            v_hat = v_prev / (1 - group["betas"][1] ** b["state"]["step"].item())
            g_eff = gn + (
                group["weight_decay"] * p0 if not group["decoupled_weight_decay"] else 0.0
            )
            ok = v_hat > 0
            shock = np.where(ok, g_eff**2 / np.where(ok, v_hat, 1.0), np.nan)
        if group["amsgrad"]:
            vm = f64(state["max_exp_avg_sq"])
            clamp = float((vm[v > 0] / v[v > 0]).mean())
        else:
            clamp = 1.0
        every = [gn, p1, m, v] + ([f64(state["max_exp_avg_sq"])] if group["amsgrad"] else [])
        counts = [np.isnan(x).sum() + 0 for x in every]
        infs = [np.isinf(x).sum() + 0 for x in every]
        t = state["step"].item()
        f = adam_factors(group, t)
        shock_ok = shock[~np.isnan(shock)]
        per[n] = {
            "grad_norm": float(np.linalg.norm(gn)),
            "param_norm": float(np.linalg.norm(p1)),
            "update_norm": float(np.linalg.norm(p1 - p0)),
            "update_ratio": float(np.linalg.norm(p1 - p0) / np.linalg.norm(p0)),
            "exp_avg_norm": float(np.linalg.norm(m)),
            "exp_avg_sq_mean": float(v.mean()),
            "lr_eff_p1": float(np.nanquantile(lr, 0.01)),
            "lr_eff_p50": float(np.nanquantile(lr, 0.5)),
            "lr_eff_p99": float(np.nanquantile(lr, 0.99)),
            "shock_p99": float(np.quantile(shock_ok, 0.99)) if shock_ok.size else math.nan,
            "gamma_frac": grew,
            "amsgrad_clamp": clamp,
            "eps_dominance": float((f64(root < group["eps"])).mean()),
            "nan_count": float(sum(counts)),
            "inf_count": float(sum(infs)),
            "lr_scale": f.step_size * f.bc2_sqrt,
        }
        pools["lr"].append(lr)
        pools["shock"].append(shock_ok)
        for k, x in (("g", gn), ("p1", p1), ("d", p1 - p0), ("p0", p0), ("m", m)):
            sums[k] = sums.get(k, 0.0) + float((x**2).sum())
        sums["v"] = sums.get("v", 0.0) + float(v.sum())
        sums["numel"] = sums.get("numel", 0.0) + v.size
    lr_all = np.concatenate(pools["lr"])
    shock_all = np.concatenate(pools["shock"])
    agg = {
        "grad_norm": math.sqrt(sums["g"]),
        "param_norm": math.sqrt(sums["p1"]),
        "update_norm": math.sqrt(sums["d"]),
        "exp_avg_norm": math.sqrt(sums["m"]),
        "update_ratio": math.sqrt(sums["d"]) / math.sqrt(sums["p0"]),
        "exp_avg_sq_mean": sums["v"] / sums["numel"],
        "lr_eff_p1": float(np.nanquantile(lr_all, 0.01)),
        "lr_eff_p50": float(np.nanquantile(lr_all, 0.5)),
        "lr_eff_p99": float(np.nanquantile(lr_all, 0.99)),
        "shock_p99": float(np.quantile(shock_all, 0.99)) if shock_all.size else math.nan,
        "nan_count": sum(x["nan_count"] for x in per.values()),
        "inf_count": sum(x["inf_count"] for x in per.values()),
    }
    return per, agg


EXACT_SIGNALS = (
    "lr_eff_p1",
    "lr_eff_p50",
    "lr_eff_p99",
    "gamma_frac",
    "eps_dominance",
    "nan_count",
    "inf_count",
)


def assert_signals(got: dict[str, float], want: dict[str, float]) -> None:
    for k, w in want.items():
        g = got[k]
        if k in EXACT_SIGNALS:
            assert close(g, w, rel=QREL, abs_=0.0), (k, g, w)
        else:  # float32 sample arithmetic against float64
            assert close(g, w, rel=REL, abs_=1e-12), (k, g, w)


def signal_stepper() -> Stepper:
    """Registered with the observer a registry hook attaches (as the app wires it): a
    float32 matrix, a complex vector, a bf16 vector under amsgrad with L2 weight decay, a
    scalar."""
    params = [
        ("w", randn((40, 7), 1)),
        ("c", randn((6,), 2, torch.complex64)),
        ("h", randn((9,), 3, torch.bfloat16)),
        ("s", randn((), 4)),
    ]
    groups = [
        GroupDef(["w", "c", "s"]),
        GroupDef(["h"], {"amsgrad": True, "weight_decay": 0.1, "lr": 0.05}),
    ]
    return registered(
        "sig", lambda: Stepper("sig", "adam", CPU, params, {"lr": 0.01, "foreach": False}, groups)
    )


def assert_update(got: dict[str, float], want: dict[str, float], bound: float) -> None:
    """The update (recomputed from the state) within its stated rounding of the stored
    change ``p1 - p0``, and its ratio to ``norm(p0)`` within what that bound implies."""
    upd, ratio = want.pop("update_norm"), want.pop("update_ratio")
    if math.isnan(upd):  # a NaN in p0 or p1
        assert math.isnan(got["update_norm"]) or math.isnan(got["param_norm"]), got
        return
    assert 0 <= bound < math.inf
    assert abs(got["update_norm"] - upd) <= bound, (got["update_norm"], upd, bound)
    p0 = upd / ratio if ratio else math.inf
    slack = bound * (1 + ratio) / (p0 - bound) if p0 > bound else math.inf
    assert abs(got["update_ratio"] - ratio) <= slack or p0 == math.inf, (got, ratio, slack)


def run_and_check(s: Stepper, grads: dict[str, torch.Tensor]) -> dict[str, Any]:
    before = snapshot_state(s)
    s.step(grads)
    want, want_agg = expected_signals(before, s, grads)
    signals = signals_of(s)
    assert signals["step"] == s.step_count
    assert set(signals["tensors"]) == set(grads)
    rounding = signals["estimates"]["update_rounding"]
    for n in grads:
        assert set(signals["tensors"][n]) == set(SIGNALS)
        assert_update(signals["tensors"][n], want[n], rounding[n])
        assert_signals(signals["tensors"][n], want[n])
    groups = {g["group"]: g for g in signals["groups"]}
    stepped = {s.group_of[n] for n in grads}
    assert set(groups) == stepped
    for gi in stepped:  # the schedule: each stepped group's options and factors
        group = s.optimizer.param_groups[gi]
        t = s.optimizer.state[group["params"][0]]["step"].item()
        want_group = {
            "lr": group["lr"],
            "beta1": group["betas"][0],
            "beta2": group["betas"][1],
            "bc1": 1 - group["betas"][0] ** t,
            "bc2": 1 - group["betas"][1] ** t,
            "step_size": group["lr"] / (1 - group["betas"][0] ** t),
        }
        for k, w in want_group.items():
            assert groups[gi][k] == signals["aggregate"][f"group{gi}.{k}"] == w
    group_keys = {f"group{gi}.{k}" for gi in stepped for k in GROUP_FIELDS}
    first = {"first_nonfinite_step"} if "first_nonfinite" in signals else set()
    assert set(signals["aggregate"]) == set(SIGNALS) | group_keys | first
    assert_update(signals["aggregate"], want_agg, signals["estimates"]["aggregate_update_rounding"])
    assert_signals(signals["aggregate"], want_agg)
    return signals


def test_signals_at_steps_1_2_and_1000_equal_independent_computations() -> None:
    s = signal_stepper()
    assert observer_of(s) is not None and s.observers[0] is observer_of(s)
    first = run_and_check(s, grads_for(s, 1))
    for n in s.names:  # no previous step: shock and gamma undefined
        assert math.isnan(first["tensors"][n]["shock_p99"])
        assert math.isnan(first["tensors"][n]["gamma_frac"])
    second = run_and_check(s, grads_for(s, 2))
    assert all(0 <= second["tensors"][n]["gamma_frac"] <= 1 for n in s.names)
    run_and_check(s, grads_for(s, 3, ["w", "h"]))  # a step of some tensors only
    # Step 1000: load state at step 999 (the cache no longer holds: recomputed from state).
    state = {}
    for i, n in enumerate(s.names):
        p = s.params[s.index[n]]
        x = randn(tuple(p.shape), 200 + i, p.dtype)
        v = (torch.complex(x.real**2, x.imag**2) if x.is_complex() else x**2) * 1e-2
        state[n] = {
            "step": torch.tensor(999.0),
            "exp_avg": randn(tuple(p.shape), 300 + i, p.dtype) * 1e-2,
            "exp_avg_sq": v,
        }
        if n == "h":
            state[n]["max_exp_avg_sq"] = v * 2
    s.put_state(state)
    thousandth = run_and_check(s, grads_for(s, 4))
    assert all(thousandth["tensors"][n]["amsgrad_clamp"] == 1.0 for n in ("w", "c", "s"))
    assert thousandth["tensors"]["h"]["amsgrad_clamp"] > 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,amsgrad",
    [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False), (torch.float64, True)],
)
def test_signals_of_a_single_tensor_at_steps_1_2_and_1000(
    dtype: torch.dtype, amsgrad: bool, device: str
) -> None:
    """One tensor: PyTorch's own operations on the sample (any device), no segments."""
    shape = (24, 5)
    s = registered(
        "one",
        lambda: Stepper(
            "one",
            "adam",
            torch.device(device),
            [("w", randn(shape, 1, dtype))],
            {"lr": 0.01, "amsgrad": amsgrad, "foreach": False, "eps": 1e-3},
        ),
    )
    run_and_check(s, {"w": randn(shape, 2, dtype)})
    second = run_and_check(s, {"w": randn(shape, 3, dtype)})
    assert {k: second["aggregate"][k] for k in SIGNALS} == second["tensors"]["w"]
    x = randn(shape, 4, dtype)
    state = {"step": torch.tensor(999.0), "exp_avg": x * 1e-2, "exp_avg_sq": x * x * 1e-8}
    if amsgrad:
        state["max_exp_avg_sq"] = x * x * 1e-7
    s.put_state({"w": state})
    run_and_check(s, {"w": randn(shape, 5, dtype) * 0.02})
    assert 0 < signals_of(s)["tensors"]["w"]["eps_dominance"] < 1  # eps=1e-3 matters here


def test_signals_of_float64_tensors_in_two_groups() -> None:
    """A float64 pool with per-tensor constants: the segmented path without the float32
    order keys."""
    params = [("a", randn((30, 4), 1, torch.float64)), ("b", randn((7,), 2, torch.float64))]
    s = registered(
        "f64",
        lambda: Stepper(
            "f64",
            "adam",
            CPU,
            params,
            {"lr": 0.01, "foreach": False},
            [GroupDef(["a"]), GroupDef(["b"], {"lr": 0.1, "amsgrad": True})],
        ),
    )
    for k in range(3):
        run_and_check(s, grads_for(s, k))


def test_gamma_compares_with_the_lr_the_previous_step_applied() -> None:
    """After the lr is lowered between steps, gamma still compares this step's effective LR
    with the one the previous step used (the cache), not with a recomputation."""
    s = signal_stepper()
    s.step(grads_for(s, 1))
    s.step(grads_for(s, 2))
    prev = {
        n: lr_eff_of(
            s.params[s.index[n]],
            s.optimizer.state[s.params[s.index[n]]],
            s.optimizer.param_groups[s.group_of[n]],
        )
        for n in s.names
    }
    s.set_hyperparameters({"lr": 1e-4}, group=0)
    s.step(grads_for(s, 3))
    for n in ("w", "c", "s"):
        p = s.params[s.index[n]]
        now = lr_eff_of(p, s.optimizer.state[p], s.optimizer.param_groups[s.group_of[n]])
        want = float((f64(now) > f64(prev[n])).mean())
        assert signals_of(s)["tensors"][n]["gamma_frac"] == want == 0.0


def test_signals_count_nan_and_inf_exactly() -> None:
    s = signal_stepper()
    s.step(grads_for(s, 1))
    g = grads_for(s, 2)
    g["w"][0, 0] = math.nan
    g["w"][1, 1] = math.inf
    # NaN: in g, m, v and p; Inf: in g, m and v, and p is NaN there (inf / inf).
    run_and_check(s, g)
    signals = signals_of(s)
    assert signals["tensors"]["w"]["nan_count"] == 5 == signals["aggregate"]["nan_count"]
    assert signals["tensors"]["w"]["inf_count"] == 3 == signals["aggregate"]["inf_count"]
    nan_inf = {"grad": {"nan": 1, "inf": 1}, "param": {"nan": 2, "inf": 0}}
    assert signals["faults"] == {
        "w": {**nan_inf, "exp_avg": {"nan": 1, "inf": 1}, "exp_avg_sq": {"nan": 1, "inf": 1}}
    }


@pytest.fixture
def tiny_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampling, "STEP_SAMPLE", 32)
    monkeypatch.setattr(sampling, "MIN_PER_TENSOR", 8)
    monkeypatch.setattr(sampling, "WHOLE_BUDGET", 0)


@pytest.mark.usefixtures("tiny_sample")
def test_sampled_tensors_get_exact_reductions_and_faults_at_their_step() -> None:
    shape = (40, 25)  # 1000 elements, 32 sampled
    s = registered(
        "big",
        lambda: Stepper(
            "big", "adam", CPU, [("w", randn(shape, 1))], {"lr": 0.01, "foreach": False}
        ),
    )
    s.step({"w": randn(shape, 2)})
    plan = sampling.block_plan(1000, 32, 25)
    assert not plan.exact and signals_of(s)["sample"] == {"w": plan.count}
    picked = plan.indices()
    g = randn(shape, 3)
    idx = next(i for i in range(1000) if i not in set(picked.tolist()))  # not sampled
    before = s.params[0].detach().clone()
    s.step({"w": g})
    state = s.optimizer.state[s.params[0]]
    got = signals_of(s)["tensors"]["w"]
    # Exact: over the full tensors, whatever the sample.
    assert close(got["grad_norm"], float(np.linalg.norm(f64(g))))
    assert close(got["param_norm"], float(np.linalg.norm(f64(s.params[0]))))
    assert close(got["exp_avg_norm"], float(np.linalg.norm(f64(state["exp_avg"]))))
    assert close(got["exp_avg_sq_mean"], float(f64(state["exp_avg_sq"]).mean()))
    # The update too (within its stated rounding), no longer scaled from the sample.
    est = signals_of(s)["estimates"]
    d = f64(s.params[0]) - f64(before)
    assert abs(got["update_norm"] - float(np.linalg.norm(d))) <= est["update_rounding"]["w"]
    assert close(got["update_ratio"], float(np.linalg.norm(d) / np.linalg.norm(f64(before))))
    assert "update_norm" not in est["scaled"] and "lr_eff_p99" in est["quantiles"]
    assert est["rank_error"]["w"] == kernel_assemble.rank_error(plan.count) > 0
    # A NaN outside the sample is seen at the step it comes, and counted exactly.
    g = randn(shape, 4)
    g.view(-1)[idx] = math.nan
    s.step({"w": g})
    got = signals_of(s)["tensors"]["w"]
    assert got["nan_count"] == 4  # g, then m, v and p at that element
    assert signals_of(s)["faults"]["w"]["grad"] == {"nan": 1, "inf": 0}


def test_signals_follow_gradients_written_in_place_and_new_gradient_tensors() -> None:
    # The observer reuses its views of tensors it saw at the last step: a gradient buffer
    # rewritten in place and a fresh gradient tensor must both be read as they are now.
    shapes = {"w": (20, 25), "b": (50,)}  # taken whole: every signal checked exactly
    s = registered(
        "reuse",
        lambda: Stepper(
            "reuse",
            "adam",
            CPU,
            [(n, randn(shape, i)) for i, (n, shape) in enumerate(shapes.items())],
            {"lr": 0.01, "foreach": False},
        ),
    )
    buffers = {n: randn(shape, 10 + i) for i, (n, shape) in enumerate(shapes.items())}
    run_and_check(s, buffers)
    for k in range(3):
        for i, (n, shape) in enumerate(shapes.items()):
            buffers[n].copy_(randn(shape, 20 + 2 * k + i))
        run_and_check(s, buffers)
        run_and_check(
            s, {n: randn(shape, 40 + 2 * k + i) for i, (n, shape) in enumerate(shapes.items())}
        )


@pytest.mark.usefixtures("tiny_sample")
def test_sampled_quantiles_are_the_samples_and_pool_by_weight() -> None:
    shapes = {"w": (40, 25), "b": (50,)}
    s = registered(
        "two",
        lambda: Stepper(
            "two",
            "adam",
            CPU,
            [(n, randn(shape, i)) for i, (n, shape) in enumerate(shapes.items())],
            {"lr": 0.01, "foreach": False},
        ),
    )
    for k in range(2):
        s.step({n: randn(shape, 10 + k + i) for i, (n, shape) in enumerate(shapes.items())})
    values, weights = [], []
    for n, shape in shapes.items():
        p = s.params[s.index[n]]
        lr = f64(lr_eff_of(p, s.optimizer.state[p], s.optimizer.param_groups[0]))
        # The documented share: STEP_SAMPLE in proportion to size, at least the floor.
        floor = max(sampling.BLOCK, min(sampling.MIN_PER_TENSOR, sampling.STEP_SAMPLE // 2))
        want = max(floor, round(sampling.STEP_SAMPLE * lr.size / 1050))
        plan = sampling.block_plan(lr.size, want, shape[-1] if len(shape) > 1 else 0)
        assert not plan.exact and plan.count == signals_of(s)["sample"][n]
        sample = lr[plan.indices()]
        for q, key in ((0.01, "lr_eff_p1"), (0.5, "lr_eff_p50"), (0.99, "lr_eff_p99")):
            assert close(
                signals_of(s)["tensors"][n][key], float(np.quantile(sample, q)), rel=QREL, abs_=0.0
            )
        values.append(sample)
        weights.append(np.full(plan.count, lr.size / plan.count))
    order = np.argsort(np.concatenate(values), kind="stable")
    pooled, cum = np.concatenate(values)[order], np.cumsum(np.concatenate(weights)[order])
    for q, key in ((0.01, "lr_eff_p1"), (0.5, "lr_eff_p50"), (0.99, "lr_eff_p99")):
        want = pooled[np.searchsorted(cum, q * cum[-1])]
        assert signals_of(s)["aggregate"][key] == float(want)


def test_a_failing_observer_never_breaks_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    s = signal_stepper()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(observer_module, "finish", broken)
    outcome = s.step(grads_for(s, 1))
    assert outcome.step == 1 == s.step_count
    assert "boom" in signals_of(s)["error"]
    monkeypatch.undo()
    s.step(grads_for(s, 2))
    assert "error" not in signals_of(s) and signals_of(s)["step"] == 2


def test_attach_signals_is_idempotent_and_goes_first() -> None:
    s = Stepper("a", "adam", CPU, [("w", torch.zeros(2))], {"lr": 0.1})

    class Other:
        def before_step(self, stepper: Stepper, grads: Any) -> None: ...

        def after_step(self, stepper: Stepper, grads: Any) -> None: ...

    s.observers.append(Other())
    first = attach_signals(s)
    assert attach_signals(s) is first and s.observers[0] is first and len(s.observers) == 2
    assert signals_of(s)["tensors"] == {}


# ---------------------------------------------------------------------- the seed's failure


def lr_eff_p99_series(amsgrad: bool) -> tuple[list[float], int]:
    """Per-step aggregate lr_eff_p99 under a gradient sequence whose second moment jumps
    late: a large gradient at step 1, quiet steps, then a large one again (a bit smaller)."""
    quiet, late = 300, 301
    shape = (256,)
    scale = randn(shape, 7).abs() + 0.5  # per-element magnitudes
    s = registered(
        "seed",
        lambda: Stepper(
            "seed",
            "adam",
            CPU,
            [("w", torch.zeros(shape))],
            {"lr": 1e-3, "betas": (0.9, 0.99), "amsgrad": amsgrad, "foreach": False},
        ),
    )
    series = []
    for t in range(1, quiet + 20):
        size = 1.0 if t == 1 else 0.9 if t == late else 1e-3
        sign = 1.0 if t % 2 else -1.0
        s.step({"w": scale * size * sign})
        series.append(signals_of(s)["aggregate"]["lr_eff_p99"])
        assert series[-1] == signals_of(s)["tensors"]["w"]["lr_eff_p99"]
    return series, late


def bias_correction_ratio(t: int, betas: tuple[float, float] = (0.9, 0.99)) -> float:
    """How much the effective LR of an unchanged (max) second moment grows from step t-1 to
    t through PyTorch's bias correction alone: step_size * sqrt(bc2) grows."""
    b1, b2 = betas
    return ((1 - b1 ** (t - 1)) / (1 - b1**t)) * math.sqrt((1 - b2**t) / (1 - b2 ** (t - 1)))


def test_seed_failure_mode_adam_swings_and_amsgrad_does_not() -> None:
    adam, late = lr_eff_p99_series(amsgrad=False)
    ams, _ = lr_eff_p99_series(amsgrad=True)
    i = late - 1  # index of the late gradient's step (series[k] is step k + 1)
    # Growth step to step beyond what bias correction alone gives.
    excess = [
        b / a / bias_correction_ratio(k + 2)
        for k, (a, b) in enumerate(zip(adam, adam[1:], strict=False))
    ]
    ams_excess = [
        b / a / bias_correction_ratio(k + 2)
        for k, (a, b) in enumerate(zip(ams, ams[1:], strict=False))
    ]
    # Adam: through the quiet phase v decays and the effective LR grows every step beyond
    # bias correction (more than 3x in all) ...
    assert all(x > 1.0 for x in excess[10 : i - 1])
    assert math.prod(excess[10 : i - 1]) > 3
    # ... until the late gradient meets the decayed v: the p99 collapses by more than 50%.
    assert adam[i] < 0.5 * adam[i - 1]
    # AMSGrad: max_exp_avg_sq still holds step 1's gradient, so the effective LR moves by
    # PyTorch's bias correction of that maximum and nothing else, spike or not: it never
    # grows beyond that, and never swings by more than it (under 1% a step after step 10).
    assert all(abs(x - 1.0) < 1e-4 for x in ams_excess[1:]), max(ams_excess[1:])
    assert max(abs(b - a) / a for a, b in zip(ams[10:], ams[11:], strict=False)) < 0.01
    assert abs(ams[i] - ams[i - 1]) / ams[i - 1] < 0.01


def test_the_signal_block_plan_takes_cache_lines_through_every_column() -> None:
    assert sampling.block_plan(100, 1000).exact and sampling.block_plan(100, 1000).count == 100
    for numel, want, last in [
        (10_000, 1000, 100),
        (1 << 20, 2048, 4096),
        (999_999, 800, 3),
        (1_000_000, 2048, 1000),
        (5000, 64, 0),
    ]:
        plan = sampling.block_plan(numel, want, last)
        idx = plan.indices()
        assert plan == sampling.block_plan(numel, want, last) and not plan.exact
        assert idx.numel() == plan.count <= want and int(idx.max()) < numel
        assert plan.stride % sampling.BLOCK == 0 and plan.block == sampling.BLOCK
        if last > 1:  # block starts fall on every multiple of gcd(stride, last) (<= BLOCK)
            d = math.gcd(plan.stride, last)
            assert sampling.BLOCK % d == 0
            starts = {(k * plan.stride) % last for k in range(plan.blocks)}
            assert len(starts) == min(plan.blocks, last // d)
        flat = torch.arange(numel, dtype=torch.float64)
        assert torch.equal(plan.view(flat).reshape(-1), flat[idx])
