"""Histograms over time (issue 14): each recorded step's bins against an independent
float64 computation on the full tensors, exact for a tensor binned whole and within the
stated rank-error bound for a sampled one; kept bounded, and forgotten after a rollback."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from inspect_support import CPU, f64, randn, registered

from adamscope.service.engine import Stepper
from adamscope.service.inspect.histogram_store import MAX_STEPS, HistogramStore
from adamscope.service.inspect.kernels.histogram import BINS, HI, HISTOGRAM_EVERY, LO, SAMPLE
from adamscope.service.inspect.signals import signals_of


def reference(x: np.ndarray) -> np.ndarray:
    """Slots in CDF order of log10|x|: zeros, under, the bins, over, then NaN/Inf."""
    finite = x[np.isfinite(x)]
    a = np.abs(finite)
    zeros = int((a == 0).sum())
    logs = np.log10(a[a > 0])
    width = (HI - LO) / BINS
    idx = np.floor((logs - LO) / width)
    under, over = int((idx < 0).sum()), int((idx >= BINS).sum())
    counts = np.bincount(idx[(idx >= 0) & (idx < BINS)].astype(int), minlength=BINS)
    return np.array([zeros, under, *counts, over, len(x) - len(finite)], dtype=float)


def ordered(h: dict[str, object]) -> np.ndarray:
    counts = h["counts"]
    assert isinstance(counts, list)
    return np.array([h["zeros"], h["under"], *counts, h["over"], h["nonfinite"]], dtype=float)


def full_values(s: Stepper, name: str, g: torch.Tensor) -> dict[str, np.ndarray]:
    p = s.params[s.index[name]]
    state = s.optimizer.state[p]
    group = s.optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    step = float(state["step"])
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    v = f64(state["exp_avg_sq"])
    lr_eff = group["lr"] / bc1 / (np.sqrt(v) / math.sqrt(bc2) + group["eps"])
    return {"grad": f64(g), "exp_avg": f64(state["exp_avg"]), "exp_avg_sq": v, "lr_eff": lr_eff}


def test_bins_match_float64_exactly_whole_and_within_the_bound_sampled() -> None:
    shapes = {"small": (3000,), "big": (400, 500)}
    s = registered(
        "hist",
        lambda: Stepper(
            "hist",
            "adam",
            CPU,
            [(n, randn(shape, i)) for i, (n, shape) in enumerate(shapes.items())],
            {"lr": 1e-3, "foreach": False},
        ),
    )
    gen = torch.Generator().manual_seed(3)
    for k in range(1, 2 * HISTOGRAM_EVERY + 1):
        grads = {
            n: torch.randn(shape, generator=gen) * 10 ** (k % 7 - 3) for n, shape in shapes.items()
        }
        grads["big"][:100] = 0.0  # exact zeros, counted apart
        s.step(grads)
        found = signals_of(s).get("histograms")
        if k % HISTOGRAM_EVERY:
            assert found is None
            continue
        assert found is not None and found["rank_error"]["small"] == 0.0
        bound = found["rank_error"]["big"]
        assert bound == pytest.approx(math.sqrt(math.log(200) / (2 * SAMPLE)), rel=1e-12)
        for name in shapes:
            want = full_values(s, name, grads[name])
            for key, x in want.items():
                got, ref = ordered(found["tensors"][name][key]), reference(x)
                if name == "small":
                    assert np.array_equal(got, ref), (k, key)
                    continue
                # The estimate: cumulative fractions within the stated DKW bound.
                assert got.sum() == x.size
                err = np.abs(np.cumsum(got) - np.cumsum(ref)).max() / x.size
                assert err <= bound, (k, key, err, bound)


def fake(step: int) -> dict[str, object]:
    h = {"counts": [step] * BINS, "under": 0, "over": 0, "zeros": 0, "nonfinite": 0}
    return {"edges": [0.0], "tensors": {"w": {"grad": h}}, "rank_error": {"w": 0.0}}


def test_the_store_is_bounded_from_the_start_and_forgets_after_a_rollback(
    tmp_path: Path,
) -> None:
    path = tmp_path / "histograms.sqlite"
    store = HistogramStore(path)
    last = 3 * MAX_STEPS * HISTOGRAM_EVERY
    for step in range(HISTOGRAM_EVERY, last + 1, HISTOGRAM_EVERY):
        store.record(step, fake(step))
    kept = store.steps()
    assert MAX_STEPS // 2 <= len(kept) <= MAX_STEPS
    assert kept[0] == HISTOGRAM_EVERY and kept[-1] == last  # the whole run, coarser
    got = store.span("w", "grad", 0, last, 100)
    assert len(got["steps"]) == 100 and got["steps"][-1] == last
    assert [c[0] for c in got["counts"]] == got["steps"]
    store.close()
    # Reopened at an earlier step (a restart after SIGKILL): later columns are gone.
    again = HistogramStore(path, at_step=last // 2)
    assert again.steps() and max(again.steps()) <= last // 2
    assert again.span("w", "grad", last // 2 + 1, last, 10)["steps"] == []
    again.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recording_leaves_the_optimizers_state_untouched(dtype: torch.dtype) -> None:
    """The histograms read the optimizer's own state (a trainer's, when it is watched):
    recording them changes no byte of it, whole-binned float64 tensors included (whose
    float64 view is the state tensor itself)."""
    from adamscope.client.numerics import adam_factors
    from adamscope.service.inspect.kernels.histogram import histograms
    from adamscope.service.inspect.kernels.sampling import Entry

    p = torch.nn.Parameter(torch.rand(64, dtype=dtype) + 0.5)
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.rand(64, dtype=dtype)
    opt.step()
    group, state = opt.param_groups[0], opt.state[p]
    before = {k: v.clone() for k, v in state.items()}
    entry = Entry("p", p.detach(), p.grad, state, group)
    got = histograms([entry], [adam_factors(group, float(state["step"]))], HISTOGRAM_EVERY)
    assert sum(got["tensors"]["p"]["lr_eff"]["counts"]) == 64
    for k, v in before.items():
        assert torch.equal(state[k], v), k
