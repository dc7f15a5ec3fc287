"""The exact reductions (issue 14): norms, sums, minima and maxima of the gradient, the
parameter, the update, m and v per tensor and for the stepper, against an independent
float64 computation on the full tensors, every step: mixed sizes (one tensor larger than a
chunk), a row-sparse gradient, amsgrad, L2 and decoupled weight decay, maximize, 16-bit
parameters and state, each of PyTorch's three Adam implementations. The update is checked
twice: against Adam's update computed in float64 from the state the step left (what it is),
and against the stored change ``p_after - p_before`` within its stated rounding."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from inspect_support import CPU, f64, randn, registered

from adamscope.client.numerics import adam_factors
from adamscope.service.engine import GroupDef, Stepper
from adamscope.service.inspect.kernels import COMBINE, ESTIMATES, SIGNALS, exact
from adamscope.service.inspect.optimizer import entries
from adamscope.service.inspect.signals import signals_of

SHAPES = {"small": (1000,), "big": (300, 400), "emb": (4000, 16)}
ROLES = ("grad", "param", "update", "exp_avg", "exp_avg_sq")


def rows_grad(rows: int, width: int, hot: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.zeros(rows, width)
    g[torch.randperm(rows, generator=gen)[:hot]] = torch.randn(hot, width, generator=gen)
    return g.to(dtype)


def adam_update(p1: np.ndarray, state: dict[str, Any], group: dict[str, Any]) -> np.ndarray:
    """Adam's step in float64 from the state after it (PyTorch's update rule)."""
    t = float(state["step"])
    b1, b2 = group["betas"]
    m = f64(state["exp_avg"])
    v = f64(state["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"])
    u = -(group["lr"] / (1 - b1**t)) * m / (np.sqrt(v) / math.sqrt(1 - b2**t) + group["eps"])
    if group["decoupled_weight_decay"] and group["weight_decay"]:
        keep = 1 - group["lr"] * group["weight_decay"]
        u = u - group["lr"] * group["weight_decay"] * (p1 - u) / keep
    return np.asarray(u)


def stats(x: np.ndarray) -> dict[str, float]:
    return {
        "norm": float(np.linalg.norm(x)),
        "sum": float(x.sum()),
        "min": float(x.min()),
        "max": float(x.max()),
        "abs": float(np.abs(x).sum()),  # for the sums' tolerance
    }


def check(got: dict[str, float], want: dict[str, dict[str, float]], where: Any) -> None:
    for role in ROLES:
        w = want[role]
        rel = 1e-5  # float32 accumulation (the update: float32 arithmetic too)
        assert math.isclose(got[f"{role}_norm"], w["norm"], rel_tol=rel), (where, role)
        assert abs(got[f"{role}_sum"] - w["sum"]) <= rel * w["abs"] + 1e-30, (where, role)
        for k in ("min", "max"):
            if role == "update":
                assert math.isclose(got[f"{role}_{k}"], w[k], rel_tol=rel), (where, role, k)
            else:  # a stored element: exactly
                assert got[f"{role}_{k}"] == w[k], (where, role, k)
    assert got["exp_avg_sq_mean"] == pytest.approx(want["exp_avg_sq"]["sum"] / want["n"], rel=1e-6)


def check_stored_change(
    got: dict[str, float], d: np.ndarray, p0: np.ndarray, bound: float, where: Any
) -> None:
    """The update against ``p_after - p_before`` within the stated rounding ``bound``."""
    assert bound > 0, where
    assert abs(got["update_norm"] - np.linalg.norm(d)) <= bound, (where, got["update_norm"])
    assert abs(got["update_min"] - d.min()) <= bound, where
    assert abs(got["update_max"] - d.max()) <= bound, where
    assert abs(got["update_sum"] - d.sum()) <= math.sqrt(d.size) * bound, where
    ratio = np.linalg.norm(d) / np.linalg.norm(p0)
    slack = bound * (1 + ratio) / (np.linalg.norm(p0) - bound)
    assert abs(got["update_ratio"] - ratio) <= slack, where


CASES = {
    "adam": ({}, torch.float32, {"foreach": False}),
    "amsgrad_l2_maximize": (
        {"amsgrad": True, "weight_decay": 0.1, "maximize": True},
        torch.float32,
        {"foreach": True},
    ),
    "adamw_fused": (
        {"weight_decay": 0.05, "decoupled_weight_decay": True},
        torch.float32,
        {"fused": True},
    ),
    "bf16_amsgrad": ({"amsgrad": True}, torch.bfloat16, {"foreach": False}),
    "fp16_adamw": (
        {"weight_decay": 0.1, "decoupled_weight_decay": True, "eps": 1e-4},
        torch.float16,
        {"foreach": False},
    ),
    "fp64": ({"amsgrad": True, "weight_decay": 0.01}, torch.float64, {"foreach": False}),
}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 32K elements: every tensor here but the smallest spans several (the
    service's are larger; the code is the same)."""
    monkeypatch.setattr(exact, "CHUNK", 1 << 15)


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_reductions_equal_float64_on_the_full_tensors(case: str) -> None:
    options, dtype, impl = CASES[case]
    assert max(math.prod(s) for s in SHAPES.values()) > exact.CHUNK  # reduced in chunks
    params = [(n, randn(shape, i, dtype)) for i, (n, shape) in enumerate(SHAPES.items())]
    s = registered(
        f"exact-{case}",
        lambda: Stepper(
            f"exact-{case}",
            "adam",
            CPU,
            params,
            {"lr": 0.02, **impl},
            [GroupDef(["small", "big"], options), GroupDef(["emb"], {**options, "lr": 0.05})],
        ),
    )
    for k in range(6):
        grads = {
            "small": randn(SHAPES["small"], 10 + k, dtype),
            "big": randn(SHAPES["big"], 50 + k, dtype) * (1 + k),
            "emb": rows_grad(4000, 16, 20, 90 + k, dtype),  # 20 of 4,000 rows
        }
        before = {n: f64(s.params[s.index[n]]).copy() for n in SHAPES}  # f64: a view
        s.step(grads)
        got = signals_of(s)
        pooled: dict[str, list[np.ndarray]] = {r: [] for r in (*ROLES, "d", "p0")}
        for n, g in grads.items():
            p = s.params[s.index[n]]
            state = s.optimizer.state[p]
            group = s.optimizer.param_groups[s.group_of[n]]
            p1 = f64(p)
            tensors = {
                "grad": f64(g),
                "param": p1,
                "update": adam_update(p1, state, group),
                "exp_avg": f64(state["exp_avg"]),
                "exp_avg_sq": f64(state["exp_avg_sq"]),
                "d": p1 - before[n],
                "p0": before[n],
            }
            want: dict[str, Any] = {r: stats(tensors[r]) for r in ROLES}
            want["n"] = p1.size
            check(got["tensors"][n], want, (k, n))
            bound = got["estimates"]["update_rounding"][n]
            if dtype in (torch.float32, torch.float64):  # 16-bit: loose, as p's rounding is
                assert bound < 1e-4 * got["tensors"][n]["update_norm"], (k, n)
            check_stored_change(got["tensors"][n], tensors["d"], before[n], bound, (k, n))
            for r, x in tensors.items():
                pooled[r].append(x)
        every = {r: np.concatenate(xs) for r, xs in pooled.items()}
        want = {r: stats(every[r]) for r in ROLES} | {"n": every["param"].size}
        check(got["aggregate"], want, (k, "aggregate"))
        bound = got["estimates"]["aggregate_update_rounding"]
        check_stored_change(got["aggregate"], every["d"], every["p0"], bound, (k, "aggregate"))


def test_the_new_signals_are_exact_and_merge_by_their_kind() -> None:
    estimated = {name for names in ESTIMATES.values() for name in names}
    for role in ROLES:
        for stat in ("norm", "sum", "min", "max"):
            name = f"{role}_{stat}"
            assert name in SIGNALS and name not in estimated
            assert COMBINE[name] == stat
    assert "update_ratio" not in estimated and "update_norm" not in estimated


def test_a_nan_in_a_chunk_past_the_first_is_seen_by_every_reduction_of_its_role() -> None:
    n = 3 * exact.CHUNK + 5
    s = registered(
        "chunks",
        lambda: Stepper("chunks", "adam", CPU, [("w", randn((n,), 1))], {"lr": 1e-3}),
    )
    g = randn((n,), 2)
    g[2 * exact.CHUNK + 3] = math.nan
    s.step({"w": g})
    got = signals_of(s)["tensors"]["w"]
    assert all(math.isnan(got[f"grad_{k}"]) for k in ("norm", "sum", "min", "max"))
    assert signals_of(s)["faults"]["w"]["grad"] == {"nan": 1, "inf": 0}


SMALL_SHAPES = {"b1": (300,), "ln": (300,), "b2": (300,), "w": (15, 20), "odd": (7,)}


@pytest.mark.parametrize("case", ["adam", "adamw_fused", "bf16_amsgrad", "fp64"])
def test_small_tensors_reduced_together_equal_float64_and_each_alone(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small tensors of one length, dtype and group are reduced as one batch: their
    reductions are float64's on each one's full tensors (a NaN in one stays its own), and
    those of the same step reduced one tensor at a time (SMALL = 0) agree, the extremes
    exactly (the update's too: the same elementwise update)."""
    options, dtype, impl = CASES[case]
    params = [(n, randn(shape, i, dtype)) for i, (n, shape) in enumerate(SMALL_SHAPES.items())]
    s = registered(
        f"small-{case}",
        lambda: Stepper(
            f"small-{case}",
            "adam",
            CPU,
            params,
            {"lr": 0.02, **impl},
            [GroupDef(["b1", "ln", "w", "odd"], options), GroupDef(["b2"], options)],
        ),
    )
    for k in range(3):
        grads = {
            n: randn(shape, 20 + 7 * k + i, dtype)
            for i, (n, shape) in enumerate(SMALL_SHAPES.items())
        }
        if k == 2:
            grads["ln"][5] = math.nan
        s.step(grads)
        got = signals_of(s)
        for n in SMALL_SHAPES:
            p = s.params[s.index[n]]
            state = s.optimizer.state[p]
            group = s.optimizer.param_groups[s.group_of[n]]
            if k == 2 and n == "ln":
                assert all(math.isnan(got["tensors"][n][f"grad_{x}"]) for x in exact.STATS)
                assert set(got["faults"]) == {n}  # the others stay clean
                assert got["faults"][n]["grad"] == {"nan": 1, "inf": 0}
                continue
            p1 = f64(p)
            tensors = {
                "grad": f64(grads[n]),
                "param": p1,
                "update": adam_update(p1, state, group),
                "exp_avg": f64(state["exp_avg"]),
                "exp_avg_sq": f64(state["exp_avg_sq"]),
            }
            want: dict[str, Any] = {r: stats(tensors[r]) for r in ROLES} | {"n": p1.size}
            check(got["tensors"][n], want, (k, n))
        found = entries(s, grads)
        factors = [adam_factors(e.group, float(e.state["step"])) for e in found]
        batched = exact.reduce_chunks(found, factors)
        assert batched[1] == [1] * len(found)  # one row per tensor
        monkeypatch.setattr(exact, "SMALL", 0)
        alone = exact.reduce_chunks(found, factors)
        monkeypatch.setattr(exact, "SMALL", 1 << 12)
        pairs = zip(
            exact.combine_chunks(batched[0].reshape(-1).tolist(), batched[1], batched[2]),
            exact.combine_chunks(alone[0].reshape(-1).tolist(), alone[1], alone[2]),
            strict=True,
        )
        for e, (x, y) in zip(found, pairs, strict=True):
            for name, u, w in zip(exact.REDUCED, x, y, strict=True):
                if math.isnan(w):
                    assert math.isnan(u), (k, e.name, name)
                elif name.endswith(("_min", "_max")):
                    assert u == w, (k, e.name, name)
                elif name.endswith("_sum"):  # float32's rounding: of the |x| sum's order
                    norm = y[exact.REDUCED.index(name.replace("_sum", "_norm"))]
                    bound = 1e-5 * math.sqrt(e.param.numel() * 2) * norm + 1e-30
                    assert abs(u - w) <= bound, (k, e.name, name)
                else:
                    assert math.isclose(u, w, rel_tol=1e-5, abs_tol=1e-30), (k, e.name, name)
