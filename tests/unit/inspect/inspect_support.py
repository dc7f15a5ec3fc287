"""What the inspection tests share: seeded tensors, float64 views for numpy references,
comparisons with the stated tolerances, steppers stepped a known way."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from adamscope.service.engine import Registry, Stepper
from adamscope.service.inspect.signals import attach_signals

__all__ = [
    "CPU",
    "DEVICES",
    "QREL",
    "REL",
    "assert_moments",
    "assert_quantiles",
    "close",
    "f64",
    "grads_for",
    "randn",
    "real",
    "reference_views",
    "registered",
    "stepped",
]

CPU = torch.device("cpu")
#: Where the device-generic tests run: here, and on a GPU where there is one.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
REL = 1e-5
QREL = 1e-12


def randn(
    shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    real = torch.complex64 if dtype.is_complex else torch.float64
    return (torch.randn(tuple(shape), generator=g, dtype=real) * scale).to(dtype)


def f64(t: torch.Tensor) -> np.ndarray:
    """The real view of ``t`` as a flat float64 numpy array."""
    t = t.detach().cpu()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.double().reshape(-1).numpy()


def close(a: float, b: float, rel: float = REL, abs_: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_) or (math.isnan(a) and math.isnan(b))


def assert_moments(stats: dict[str, Any], x: np.ndarray) -> None:
    finite = x[np.isfinite(x)]
    assert stats["numel"] == x.size
    assert stats["nan"] == int(np.isnan(x).sum())
    assert stats["inf"] == int(np.isinf(x).sum())
    assert stats["finite"] == finite.size
    assert stats["zeros"] == int((finite == 0).sum())
    assert close(stats["norm"], float(np.linalg.norm(finite)))
    scale = float(np.abs(finite).max()) if finite.size else 1.0
    assert close(stats["mean"], float(finite.mean()), abs_=1e-6 * scale)
    assert close(stats["std"], float(finite.std()), abs_=1e-6 * scale)
    assert stats["min"] == float(finite.min())
    assert stats["max"] == float(finite.max())


def assert_quantiles(stats: dict[str, Any], values: np.ndarray, qs: Sequence[float]) -> None:
    finite = values[np.isfinite(values)]
    want = np.quantile(finite, qs)
    got = [stats["quantiles"][repr(float(q))] for q in qs]
    for g, w in zip(got, want, strict=True):
        assert close(g, float(w), rel=QREL, abs_=0.0), (got, want)


def real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def stepped(
    dtype: torch.dtype,
    amsgrad: bool,
    steps: int,
    seed: int = 0,
    shape: tuple[int, ...] = (33, 5),
    device: str = "cpu",
    **hyper: Any,
) -> tuple[Stepper, dict[str, Any]]:
    """A stepper that took ``steps`` steps (1000: state loaded at step 999, one step)."""
    s = Stepper(
        "v",
        "adam",
        torch.device(device),
        [("w", randn(shape, seed, dtype))],
        {"lr": 0.01, "amsgrad": amsgrad, "foreach": False, **hyper},
    )
    if steps == 1000:
        v = randn(shape, seed + 1, dtype).abs() ** 2 * 1e-3
        state = {
            "step": torch.tensor(999.0),
            "exp_avg": randn(shape, seed + 2, dtype) * 1e-2,
            "exp_avg_sq": v,
        }
        if amsgrad:
            state["max_exp_avg_sq"] = v * 1.5
        s.put_state({"w": state})
        steps = 1
    for k in range(steps):
        s.step({"w": randn(shape, 100 + k, dtype)})
    p = s.params[0]
    return s, {"p": p, "state": s.optimizer.state[p], "group": s.optimizer.param_groups[0]}


def registered(name: str, build: Callable[[], Stepper]) -> Stepper:
    """A stepper as the service registers it: with the signals observer that a registry
    hook attaches (the app installs that hook; the engine knows nothing of signals)."""
    registry = Registry()
    registry.hooks.append(attach_signals)
    return registry.create(name, build)


def reference_views(
    p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The views as _single_tensor_adam's own lines compute them (PyTorch source), on the
    real view of complex tensors as it does."""
    raw = {"param": p.detach(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
    state = {k: real(v) if torch.is_tensor(v) else v for k, v in state.items()}
    t = state["step"].item()
    beta1, beta2 = group["betas"]
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size = group["lr"] / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    denom = (v.sqrt() / bias_correction2_sqrt).add_(group["eps"])
    wide = torch.float64 if p.dtype == torch.float64 else torch.float32
    d = denom.to(wide)
    m = state["exp_avg"].to(wide)
    return {
        **raw,
        "m_hat": m / bias_correction1,
        "v_hat": v.to(wide) / bias_correction2,
        "lr_eff": torch.tensor(step_size, dtype=wide) / d,
        "update": (m / d) * -step_size,
    }


def grads_for(s: Stepper, k: int, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    return {
        n: randn(tuple(s.params[s.index[n]].shape), 50 + 10 * k + i, s.params[s.index[n]].dtype)
        for i, n in enumerate(names or s.names)
    }
