"""Per-step signals: cheap scalars that show what Adam just did, computed from the tensors.

The kernels are pure functions of tensors and options (:func:`begin` before a step,
:func:`finish` after it), with no import of the service: they run wherever an optimizer's
state lives (the service's :class:`~adamscope.service.inspect.signals.SignalObserver` runs
them for a hosted stepper). After a step they give::

    {"step": 12, "time": 1718000000.0,
     "tensors": {"w": {"grad_norm": ..., ...}, ...},   # every tensor that stepped
     "aggregate": {"grad_norm": ..., ...},              # the stepper as a whole
     "sample": {"w": 1024, ...}}                        # elements sampled per tensor

with the signals of :data:`SIGNALS` (floats; NaN where undefined, e.g. at the first step):

=================  ===============================================================
grad_norm          L2 norm of the gradient (as sent: before maximize/weight decay)
param_norm         L2 norm of the parameter after the step
update_norm        L2 norm of the step's change ``p_after - p_before``
update_ratio       ``update_norm / norm(p_before)``
exp_avg_norm       L2 norm of ``exp_avg`` (m) after the step
exp_avg_sq_mean    mean of ``exp_avg_sq`` (v) after the step
lr_eff_p1/p50/p99  quantiles of this step's effective learning rate ``step_size / denom``
                   (``denom`` from ``max_exp_avg_sq`` under amsgrad; see below)
shock_p99          p99 of ``g^2 / v_hat(t-1)``, g the gradient v sees (with Adam's L2
                   weight decay), ``v_hat(t-1) = exp_avg_sq / bc2`` before the step, over
                   the elements where that is > 0; NaN at a tensor's first step
gamma_frac         fraction of elements whose effective LR grew since the previous step
                   (Reddi et al.'s Gamma_t < 0, which AMSGrad rules out up to bias
                   correction); NaN at the first step
amsgrad_clamp      mean of ``max_exp_avg_sq / exp_avg_sq`` where ``exp_avg_sq > 0`` (1.0
                   exactly without amsgrad)
eps_dominance      fraction of elements with ``sqrt(v_hat) < eps``
nan_count          NaN elements in the gradient, exp_avg and exp_avg_sq together
inf_count          the same for +-Inf
=================  ===============================================================

Quantiles and fractions are over the elements where the value is defined (not NaN).

Cost: a fused CPU step of a 10M-element tensor takes a few milliseconds; the signals must
cost a small fraction of that, so they come from a sample. Each step samples about
:data:`STEP_SAMPLE` elements in all, shared among the stepped tensors in proportion to
their size with at least :data:`MIN_PER_TENSOR` each (a tensor that small is taken whole).
A sampled tensor contributes blocks of :data:`BLOCK` consecutive elements (one cache line
of fp32) every ``stride`` elements, the stride a multiple of the block chosen so that the
blocks pass through every column (:func:`block_plan`): the same elements every step, so
step-to-step comparisons such as gamma compare like with like. Norms are scaled up from the
sample (``norm * sqrt(numel / n)``), means and fractions are the sample's; for a tensor
taken whole every signal is exact. NaN/Inf counts are exact whenever they are reported
non-zero: when the sample holds a NaN/Inf, or when a scan finds one, they are counted over
the whole gradient, exp_avg and exp_avg_sq. The scan reads the next :data:`SCAN_STEP`
elements of the sampled tensors' exp_avg_sq (taken as one run) every step, round robin
(every NaN/Inf a gradient brings reaches v and stays there), so a fault outside the sample
is counted within ``numel / SCAN_STEP`` steps (76 for 10M elements, however many tensors
hold them). All of it runs on the stepper's device, vectorized over all stepped tensors
at once (a few dozen small operations per step however many tensors: each sample is
gathered by one foreach copy through views kept from step to step), with one transfer of
the results to the host.

The effective LR and its denominator reproduce PyTorch's for-loop (``_single_tensor_adam``)
bit for bit, including the roundings it does in 16-bit state dtypes (``denom`` is rounded
to the state's dtype after each of its operations) and the widening to float32 (float64 for
float64 tensors) for the division, exactly as :mod:`.stats` computes the ``lr_eff`` view.
The previous step's effective LR (for gamma) is the one this observer computed at that step
when the state is still the one it saw; otherwise (a restart, a state load) it is
recomputed from the state with the current options.

Aggregate signals treat the stepped tensors as one: norms combine as the root of the summed
squares, means and fractions weight each tensor by its size, counts add up, and quantiles
are taken over the pooled samples, each element weighted by its tensor's ``numel / n``
(exactly the quantile of the concatenation when every tensor is taken whole; otherwise the
weighted inverse CDF, without interpolation).
"""

from __future__ import annotations

from .cache import SignalCache
from .sampling import BLOCK, MIN_PER_TENSOR, STEP_SAMPLE, BlockPlan, Entry, Layout, block_plan
from .step import COMBINE, SCAN_STEP, SIGNALS, Pending, begin, empty_signals, finish

__all__ = [
    "BLOCK",
    "COMBINE",
    "MIN_PER_TENSOR",
    "SCAN_STEP",
    "SIGNALS",
    "STEP_SAMPLE",
    "BlockPlan",
    "Entry",
    "Layout",
    "Pending",
    "SignalCache",
    "begin",
    "block_plan",
    "empty_signals",
    "finish",
]
