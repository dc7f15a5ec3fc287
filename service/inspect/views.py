"""Adam's derived views of a parameter's state, and statistics of any of them.

Derived views of the Adam state (:data:`VIEW_KEYS`), per parameter at its own state step
``t`` with its group's current options, computed as ``_single_tensor_adam`` (PyTorch's
for-loop implementation, the reference) does::

    bc1 = 1 - beta1 ** t;  bc2 = 1 - beta2 ** t;  step_size = lr / bc1
    denom  = (v.sqrt() / bc2 ** 0.5).add_(eps)     # v: max_exp_avg_sq under amsgrad
    m_hat  = m / bc1;  v_hat = v / bc2;  lr_eff = step_size / denom
    update = -step_size * (m / denom)               # Adam's update from this state

``update`` is the update the current state and options give: the last step's as long as the
group's options are the ones it stepped with (after an option change between steps, it is
computed with the new ones: the update the next step would make from m and v as they are,
before its own gradient). ``denom`` is computed in the state's own dtype with PyTorch's
operations (so it is bit for bit the denominator the for-loop used); the views are then
widened to float32 (float64 for float64 state) before dividing. ``update`` leaves out
AdamW's decoupled decay term ``lr * weight_decay * p``. A parameter at step 0 has no defined
views.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adamscope.client.numerics import Factors, adam_factors, wide_dtype

from .optimizer import OptimizerState
from .stats import EXACT_LIMIT, Described, Source, StatsSpec, aggregate, describe

__all__ = ["STATE_VIEWS", "VIEW_KEYS", "View", "describe_optimizer", "view_of"]

#: Tensors the stats of a parameter can describe: the parameter, its state, derived views.
VIEW_KEYS = (
    "param",
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "m_hat",
    "v_hat",
    "lr_eff",
    "update",
)
#: The raw state tensors among VIEW_KEYS.
STATE_VIEWS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _denominator(v: torch.Tensor, f: Factors, wide: torch.dtype) -> torch.Tensor:
    """PyTorch's for-loop denominator ``(v.sqrt() / bc2_sqrt).add_(eps)``, computed in the
    state's dtype (bit for bit), then widened; one fresh tensor, the rest in place."""
    return v.sqrt().div_(f.bc2_sqrt).add_(f.eps).to(wide)


@dataclass(frozen=True)
class View:
    """An elementwise view of one parameter's tensors: ``fn`` of the real views of
    ``inputs`` (identity for a stored tensor), computed in ``dtype``."""

    inputs: tuple[torch.Tensor, ...]
    fn: Callable[..., torch.Tensor] | None
    dtype: torch.dtype

    def source(self) -> Source:
        if self.fn is None:
            return Source.of(self.inputs[0])
        return Source.derived(self.inputs, self.fn, self.dtype)

    def select(self, index: tuple[Any, ...]) -> torch.Tensor:
        """The view at ``index`` (ints and slices over the parameter's shape), computed on
        the selected elements only; complex parameters gain a trailing (real, imag) axis
        in derived views."""
        picked = [t.detach()[index] for t in self.inputs]
        if self.fn is None:
            return picked[0]
        reals = [torch.view_as_real(t) if t.is_complex() else t for t in picked]
        return self.fn(*reals)


def view_of(
    param: torch.Tensor, state: Mapping[str, Any], group: Mapping[str, Any], key: str
) -> View | str:
    """View ``key`` (one of :data:`VIEW_KEYS`) of one parameter, or why it has none."""
    if key == "param":
        return View((param,), None, param.dtype)
    if key not in VIEW_KEYS:
        raise ValueError(f"unknown view {key!r}; expected one of {', '.join(VIEW_KEYS)}")
    if not state:
        return "no Adam state yet (the parameter has not stepped)"
    if key in STATE_VIEWS:
        if key not in state:
            return "amsgrad is off" if key == "max_exp_avg_sq" else f"no {key} in the state"
        return View((state[key],), None, state[key].dtype)
    f = adam_factors(group, float(state["step"]))
    if not f.defined:
        return f"state step is {f.step:g}: bias correction is 0 there, the view is undefined"
    v_src = (
        state["max_exp_avg_sq"] if f.amsgrad and "max_exp_avg_sq" in state else state["exp_avg_sq"]
    )
    wide = wide_dtype(param.dtype)
    step_size = f.step_size
    if key == "m_hat":
        return View((state["exp_avg"],), lambda m: m.to(wide) / f.bc1, wide)
    if key == "v_hat":
        return View((v_src,), lambda v: v.to(wide) / f.bc2, wide)
    if key == "lr_eff":

        def lr_eff(v: torch.Tensor) -> torch.Tensor:
            denom = _denominator(v, f, wide)
            numerator = torch.tensor(step_size, dtype=wide)  # 0-dim CPU: an argument, no sync
            return torch.div(numerator, denom, out=denom)

        return View((v_src,), lr_eff, wide)

    def update(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        denom = _denominator(v, f, wide)
        return torch.div(m.to(wide), denom, out=denom).mul_(-step_size)

    return View((state["exp_avg"], v_src), update, wide)


def describe_optimizer(
    opt: OptimizerState,
    names: Sequence[str] | None,
    keys: Sequence[str],
    spec: StatsSpec,
    with_aggregate: bool = True,
) -> dict[str, Any]:
    """Statistics of views ``keys`` of the named parameters (all if None), per tensor and
    aggregated per key over those tensors, read under the optimizer's lock (one step)."""
    unknown = [k for k in keys if k not in VIEW_KEYS]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; expected some of {', '.join(VIEW_KEYS)}")
    with opt.lock:
        selected = opt.select(names)
        tensors: dict[str, dict[str, Any]] = {n: {} for n in selected}
        missing: list[dict[str, str]] = []
        aggregated: dict[str, Any] = {}
        for key in keys:  # one key at a time: the values kept for its aggregate are freed
            parts: list[Described] = []
            kept = 0
            for n in selected:
                view = view_of(opt.param(n), opt.param_state(n), opt.param_group(n), key)
                if isinstance(view, str):
                    missing.append({"name": n, "key": key, "reason": view})
                    continue
                source = view.source()
                keep = with_aggregate and kept + source.numel <= EXACT_LIMIT
                kept += source.numel if keep else 0
                d = describe(source, spec, keep_values=keep)
                tensors[n][key] = d.stats
                parts.append(d)
            if with_aggregate and parts:
                aggregated[key] = aggregate(parts, spec)
        out: dict[str, Any] = {
            "step": opt.step_count,
            "version": opt.version,
            "tensors": {n: t for n, t in tensors.items() if t},
            "missing": missing,
        }
        if with_aggregate:
            out["aggregate"] = aggregated
        return out
