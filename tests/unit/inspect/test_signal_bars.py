"""The bars of the signals (issue 14): exact signals against an independent float64
computation on the full tensors for mixed-size steppers and row-sparse gradients, every
estimate within its stated bound, NaN reported at the step it enters, and ordinary learning
rate schedules raising no alert (while Reddi's counterexample still does: test_history.py's
alert bar)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from inspect_support import CPU, f64, randn, reference_views, registered

from adamscope.service.engine import Stepper
from adamscope.service.inspect.kernels import ESTIMATES
from adamscope.service.inspect.recorder import attach_history
from adamscope.service.inspect.signals import signals_of

#: The exact signals, with the float64 reference of each from the full tensors.
EXACT: dict[str, Callable[[dict[str, np.ndarray]], float]] = {
    "grad_norm": lambda t: float(np.linalg.norm(t["g"])),
    "param_norm": lambda t: float(np.linalg.norm(t["p"])),
    "exp_avg_norm": lambda t: float(np.linalg.norm(t["m"])),
    "exp_avg_sq_mean": lambda t: float(t["v"].mean()),
}


def full(s: Stepper, name: str, g: torch.Tensor) -> dict[str, np.ndarray]:
    p = s.params[s.index[name]]
    state = s.optimizer.state[p]
    return {"g": f64(g), "p": f64(p), "m": f64(state["exp_avg"]), "v": f64(state["exp_avg_sq"])}


def rows_grad(rows: int, width: int, hot: int, seed: int) -> torch.Tensor:
    """An embedding's gradient: ``hot`` random rows of ``rows`` non-zero."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.zeros(rows, width)
    picked = torch.randperm(rows, generator=gen)[:hot]
    g[picked] = torch.randn(hot, width, generator=gen)
    return g


def test_exact_signals_of_mixed_sizes_and_row_sparse_gradients() -> None:
    shapes = {"small": (1000,), "big": (400, 500), "emb": (4000, 16)}
    s = registered(
        "mixed",
        lambda: Stepper(
            "mixed",
            "adam",
            CPU,
            [(n, randn(shape, i)) for i, (n, shape) in enumerate(shapes.items())],
            {"lr": 1e-3, "foreach": False},
        ),
    )
    for k in range(30):
        grads = {
            "small": randn(shapes["small"], 10 + k),
            "big": randn(shapes["big"], 50 + k),
            "emb": rows_grad(4000, 16, 20, 90 + k),  # 20 of 4,000 rows each step
        }
        s.step(grads)
        got = signals_of(s)
        every = {n: full(s, n, g) for n, g in grads.items()}
        for n in shapes:
            for signal, ref in EXACT.items():
                want = ref(every[n])
                assert math.isclose(got["tensors"][n][signal], want, rel_tol=1e-5), (k, n, signal)
        pooled = {r: np.concatenate([every[n][r] for n in shapes]) for r in ("g", "p", "m", "v")}
        for signal, ref in EXACT.items():
            assert math.isclose(got["aggregate"][signal], ref(pooled), rel_tol=1e-5), signal
        assert got["aggregate"]["nan_count"] == got["aggregate"]["inf_count"] == 0


def test_estimates_are_within_their_stated_rank_error() -> None:
    """Every quantile the signals estimate, and every fraction, is within the stated rank
    error of the full tensor's (over many steps and tensors: the bound is at 99%)."""
    shapes = {"small": (1000,), "big": (200_000,)}
    s = registered(
        "est",
        lambda: Stepper(
            "est",
            "adam",
            CPU,
            [(n, randn(shape, i)) for i, (n, shape) in enumerate(shapes.items())],
            {"lr": 1e-3, "foreach": False},
        ),
    )
    misses = checks = 0
    for k in range(12):
        scale = torch.exp(randn((200_000,), 300 + k))  # heavy-tailed per element
        grads = {"small": randn((1000,), 100 + k), "big": randn((200_000,), 200 + k) * scale}
        s.step(grads)
        got = signals_of(s)
        est = got["estimates"]
        assert set(est["quantiles"]) == set(ESTIMATES["quantiles"])
        assert est["rank_error"]["small"] == 0.0 < est["rank_error"]["big"] < 0.06
        lrs = {}
        for n in shapes:
            p = s.params[s.index[n]]
            group = s.optimizer.param_groups[0]
            lrs[n] = f64(reference_views(p, s.optimizer.state[p], group)["lr_eff"])
        pooled = np.concatenate(list(lrs.values()))
        targets = [(got["tensors"][n], lrs[n], est["rank_error"][n]) for n in shapes]
        targets.append((got["aggregate"], pooled, est["aggregate_rank_error"]))
        for values, lr, bound in targets:
            for q, signal in ((0.01, "lr_eff_p1"), (0.5, "lr_eff_p50"), (0.99, "lr_eff_p99")):
                rank = float((lr <= values[signal]).mean())
                below = float((lr < values[signal]).mean())
                checks += 1
                if bound == 0.0:  # taken whole: the exact quantile
                    assert values[signal] == pytest.approx(np.quantile(lr, q), rel=1e-6)
                elif not (below - bound <= q <= rank + bound):
                    misses += 1
    assert misses <= max(1, checks // 50), (misses, checks)


def test_a_nan_in_one_gradient_element_is_reported_at_its_step() -> None:
    s = registered(
        "nan",
        lambda: Stepper(
            "nan",
            "adam",
            CPU,
            [("w", randn((1000, 1000), 1)), ("b", randn((10,), 2))],
            {"lr": 1e-3, "fused": True},
        ),
    )
    obs = attach_history(s)
    for step in range(1, 7):
        g = {"w": randn((1000, 1000), 10 + step), "b": randn((10,), 20 + step)}
        if step == 4:
            g["w"].view(-1)[123_457] = math.nan
        s.step(g)
        got = signals_of(s)
        if step < 4:
            assert got["aggregate"]["nan_count"] == 0 and "first_nonfinite" not in got
            continue
        first = {"step": 4, "tensor": "w", "role": "grad", "nan": 1, "inf": 0}
        assert got["first_nonfinite"] == first
        assert got["aggregate"]["first_nonfinite_step"] == 4.0
        if step == 4:
            assert got["faults"]["w"]["grad"] == {"nan": 1, "inf": 0}
            assert got["tensors"]["w"]["nan_count"] == 4  # g; m, v and p at that element
            assert "b" not in got["faults"]
    alerts = [(e["step"], e["tensor"], e["kind"]) for e in obs.alerts.events]
    assert alerts == [(4, "w", "nonfinite")]
    row = obs.history.query(signals=["first_nonfinite_step", "nan_count"])["aggregate"]
    assert row["values"]["first_nonfinite_step"][3:] == [4.0, 4.0, 4.0]
    assert row["values"]["nan_count"][3] == 4.0


# ---------------------------------------------------------------------- schedules


def plateau_step(sched: Any, k: int) -> None:
    sched.step(1.0)  # a loss that never improves: the lr is cut every few steps


SCHEDULES: dict[str, tuple[Callable[[torch.optim.Optimizer], Any], Callable[[Any, int], None]]] = {
    "step_lr": (lambda o: torch.optim.lr_scheduler.StepLR(o, 40, gamma=0.1), lambda s, k: s.step()),
    "cosine_to_zero": (
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=119, eta_min=0.0),
        lambda s, k: s.step(),
    ),
    "warm_restarts": (
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=30),
        lambda s, k: s.step(),
    ),
    "one_cycle": (
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=121),
        lambda s, k: s.step(),
    ),
    "plateau": (
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.1, patience=5),
        plateau_step,
    ),
}


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_benign_training_under_a_schedule_raises_no_alert(schedule: str, amsgrad: bool) -> None:
    """A stationary gradient noise with the default rules, the lr driven by a real torch
    scheduler on the stepper's own optimizer (as RemoteAdam's schedulers drive it)."""
    s = Stepper(
        "sched",
        "adam",
        CPU,
        [("w", randn((64, 32), 1)), ("b", randn((32,), 2))],
        {"lr": 1e-3, "amsgrad": amsgrad, "foreach": False},
    )
    obs = attach_history(s)
    build, advance = SCHEDULES[schedule]
    sched = build(s.optimizer)
    scale = torch.exp(randn((64, 32), 3) * 0.5)
    lrs = []
    for k in range(120):
        s.step({"w": randn((64, 32), 100 + k) * scale, "b": randn((32,), 1000 + k)})
        lrs.append(signals_of(s)["aggregate"]["group0.lr"])
        advance(sched, k)
    assert max(lrs) / max(min(lrs), 1e-30) > 5  # the schedule moved the lr a lot
    assert [(e["step"], e["tensor"], e["rule"]) for e in obs.alerts.events] == []


# ---------------------------------------------------------------------- localized


JUMP = 121


def rare_rows(amsgrad: bool) -> tuple[Any, list[int], dict[str, Any], np.ndarray]:
    """A 65,536-element embedding (4096 x 16) whose 16 rare rows (0.4%) get no gradient
    for 40 steps after 20 ordinary ones, then one of the same size (beta2 = 0.9: v has
    decayed to 1.5% of its peak and jumps about 8-fold: their effective LR falls by about
    65%); the other rows see the same magnitudes throughout. AMSGrad's max_exp_avg_sq still
    holds the early peak. Returns the history, the rare rows, the jump step's signals and
    each element's change of effective LR beyond the schedule at that step, computed from
    PyTorch's views."""
    s = Stepper(
        "emb",
        "adam",
        CPU,
        [("emb", torch.zeros(4096, 16)), ("head", torch.zeros(64))],
        {"lr": 1e-3, "betas": (0.9, 0.9), "amsgrad": amsgrad, "foreach": False},
    )
    obs = attach_history(s)
    gen = torch.Generator().manual_seed(5)
    scale = 0.5 + torch.rand(4096, 16, generator=gen)
    rare = sorted(torch.randperm(4096, generator=gen)[:16].tolist())
    p = s.params[s.index["emb"]]
    at_jump: dict[str, Any] = {}
    rho = np.zeros(0)
    for t in range(1, JUMP + 2):
        sign = torch.where(torch.rand(4096, 16, generator=gen) < 0.5, -1.0, 1.0)
        g = sign * scale
        if 20 < t < JUMP:
            g[rare] = 0.0
        if t == JUMP:
            group = s.optimizer.param_groups[0]
            before = f64(reference_views(p, s.optimizer.state[p], group)["lr_eff"])
            scale_before = signals_of(s)["tensors"]["emb"]["lr_scale"]
        s.step({"emb": g, "head": torch.randn(64, generator=gen)})
        if t == JUMP:
            at_jump = signals_of(s)
            after = f64(reference_views(p, s.optimizer.state[p], group)["lr_eff"])
            rho = after / before / (at_jump["tensors"]["emb"]["lr_scale"] / scale_before)
    return obs, rare, at_jump, rho


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_a_v_jump_in_rare_rows_alerts_for_adam_and_not_amsgrad(amsgrad: bool) -> None:
    obs, rare, at_jump, rho = rare_rows(amsgrad)
    events = [(e["step"], e["tensor"], e["signal"]) for e in obs.alerts.events]
    history = obs.history.query(signals=["lr_fell_count"], tensors=["emb"])
    fell = history["tensors"]["emb"]["values"]["lr_fell_count"]
    # Exactly the elements whose effective LR fell by more than 2x beyond the schedule.
    want = int((rho < 0.5).sum())
    assert at_jump["tensors"]["emb"]["lr_fell_count"] == want
    assert at_jump["tensors"]["emb"]["lr_rose_count"] == int((rho > 2).sum()) == 0
    if amsgrad:
        assert want == 0 and events == [] and max(fell[10:]) == 0
        return
    assert want > 0.003 * 65536  # most of the rare rows' 256 elements
    assert events == [(JUMP, "emb", "lr_fell_frac")]  # naming the tensor, at the jump
    assert max(fell[10 : JUMP - 1] + fell[JUMP:]) == 0
    # The top elements by change are in the rare rows, the largest falls first.
    top = at_jump["local"]["top"]["emb"]["lr_change"]
    assert len(top["index"]) == 8 and {i // 16 for i in top["index"]} <= set(rare)
    assert top["value"] == pytest.approx(sorted(rho[top["index"]]), rel=1e-5)
    assert top["value"][0] == pytest.approx(float(rho.min()), rel=1e-5)
    assert {i // 16 for i in at_jump["local"]["top"]["emb"]["shock"]["index"]} <= set(rare)
