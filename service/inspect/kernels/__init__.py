"""Per-step signals: cheap scalars that show what Adam just did, computed from the tensors.

The kernels are pure functions of tensors and options (:func:`begin` before a step,
:func:`finish` after it), with no import of the service: they run wherever an optimizer's
state lives (the service's :class:`~adamscope.service.inspect.signals.SignalObserver` runs
them for a hosted stepper). After a step they give::

    {"step": 12, "time": 1718000000.0,
     "tensors": {"w": {"grad_norm": ..., ...}, ...},   # every tensor that stepped
     "aggregate": {"grad_norm": ..., ...},              # the stepper as a whole
     "sample": {"w": 1024, ...},                        # elements sampled per tensor
     "estimates": {...},                                # which signals are estimates
     "faults": {"w": {"grad": {"nan": 1, "inf": 0}}}}   # only at a step with NaN/Inf

with the signals of :data:`SIGNALS` (floats; NaN where undefined, e.g. at the first step).
**Exact** (over every element of the full tensors, every step):

=================  ===============================================================
grad_norm          L2 norm of the gradient (as sent: before maximize/weight decay)
param_norm         L2 norm of the parameter after the step
update_norm        L2 norm of the step's update: Adam's step recomputed from the state
                   it leaves (:mod:`.exact`), within ``estimates["update_rounding"]`` of
                   the stored change ``p_after - p_before``
update_ratio       ``update_norm / norm(p_before)``
exp_avg_norm       L2 norm of ``exp_avg`` (m) after the step
exp_avg_sq_mean    mean of ``exp_avg_sq`` (v) after the step
<role>_sum/_min    sum, minimum and maximum of each role (``grad``, ``param``,
/_max              ``update``, ``exp_avg``, ``exp_avg_sq``), and ``exp_avg_sq_norm``;
                   the update's within the same rounding (its sum within ``sqrt(numel)``
                   times it)
nan_count          NaN elements in the gradient, the parameter, exp_avg, exp_avg_sq (and
                   max_exp_avg_sq) together, counted at the step they appear
inf_count          the same for +-Inf
lr_scale           ``step_size * sqrt(bc2)`` of the tensor's group at its step: how the
                   effective LR moves with the schedule alone (lr, bias correction) when
                   v does not; the alert rules divide it out of an effective-LR swing
=================  ===============================================================

**Estimated** from each tensor's sample (exact for a tensor taken whole; ``estimates``
says which, see below):

=================  ===============================================================
lr_eff_p1/p50/p99  quantiles of this step's effective learning rate ``step_size / denom``
                   (``denom`` from ``max_exp_avg_sq`` under amsgrad; see below)
shock_p99          p99 of ``g^2 / v_hat(t-1)``, g the gradient v sees (with Adam's L2
                   weight decay), ``v_hat(t-1)`` the denominator's second moment before
                   the step (``max_exp_avg_sq / bc2`` under amsgrad, else ``exp_avg_sq /
                   bc2``), over the elements where that is > 0; NaN at a tensor's first step
gamma_frac         fraction of elements whose effective LR grew since the previous step
                   (Reddi et al.'s Gamma_t < 0, which AMSGrad rules out up to bias
                   correction); NaN at the first step
amsgrad_clamp      mean of ``max_exp_avg_sq / exp_avg_sq`` where ``exp_avg_sq > 0`` (1.0
                   exactly without amsgrad)
eps_dominance      fraction of elements with ``sqrt(v_hat) < eps``
=================  ===============================================================

Quantiles and fractions are over the elements where the value is defined (not NaN).

``estimates`` names the estimated signals by kind (``quantiles``, ``fractions``, ``scaled``),
gives the exact update's rounding bound (``update_rounding[tensor]``,
``aggregate_update_rounding``) and bounds the estimates: ``rank_error[tensor]`` is the
Dvoretzky-Kiefer-Wolfowitz bound of the tensor's sample at ``confidence`` (0.99): a
quantile's rank, and a fraction, is within it
of the full tensor's (0.0: taken whole, exact); ``aggregate_rank_error`` the same for the
pooled sample (its effective size). The bound holds for a sample drawn independently of
the values; the block sample is systematic, which is as good unless the values vary with
the stride. ``scaled`` values have no distribution-free bound.

Cost: the exact reductions read every stepped tensor's gradient, parameter, m and v once
from memory, in chunks (:mod:`.exact`: per chunk 6 dot products, 5 sums, 10 minima and
maxima and the update's 3 elementwise passes, in cache), run after the step's reply has left
when the service defers it, on one thread (``signals.one_thread``). The localized signals
(:mod:`.local`) cover a budget of elements. Measured with ``benchmarks/bench_signals.py`` on
a busy 2-core VM (load 4.5 to 8): about 2.8 ms a step at 10K parameters and 100 to 190 ms
at 10M (bench_step's 129-tensor layout), against 2.5 and 53 to 93 ms with the exact norms
alone, in the same rounds. The rest comes
from a sample: the smallest stepped tensors are taken whole while they add up to
:data:`WHOLE_BUDGET` elements; the others share about :data:`STEP_SAMPLE` sampled elements
in proportion to their size, with at least :data:`MIN_PER_TENSOR` each. A sampled tensor
contributes blocks of :data:`BLOCK` consecutive elements (one cache line of fp32) every
``stride`` elements, the stride a multiple of the block chosen so that the blocks pass
through every column (:func:`block_plan`): the same elements every step, so step-to-step
comparisons such as gamma compare like with like. Fractions are the sample's. NaN and Inf propagate
through the exact reductions, so a step that brings one is seen at that step and its NaN/Inf
elements are counted then, per role, over the whole tensors (``faults``). All of it runs on
the stepper's device, vectorized over all stepped tensors at once, with one transfer of the
results to the host.

The effective LR and its denominator reproduce PyTorch's for-loop (``_single_tensor_adam``)
bit for bit, including the roundings it does in 16-bit state dtypes (``denom`` is rounded
to the state's dtype after each of its operations) and the widening to float32 (float64 for
float64 tensors) for the division, exactly as :mod:`.stats` computes the ``lr_eff`` view.
The previous step's effective LR (for gamma) is the one this observer computed at that step
when the state is still the one it saw; otherwise (a restart, a state load) it is
recomputed from the state with the current options.

Aggregate signals treat the stepped tensors as one: norms combine as the root of the summed
squares, means and fractions weight each tensor by its size, counts add up, ``lr_scale`` is
the tensors' when they share it (else NaN), and quantiles are taken over the pooled samples,
each element weighted by its tensor's ``numel / n`` (exactly the quantile of the
concatenation when every tensor is taken whole; otherwise the weighted inverse CDF, without
interpolation).
"""

from __future__ import annotations

from .assemble import CONFIDENCE, ESTIMATES, rank_error
from .cache import SignalCache
from .exact import FAULT_ROLES, REDUCED
from .sampling import (
    BLOCK,
    MIN_PER_TENSOR,
    STEP_SAMPLE,
    WHOLE_BUDGET,
    BlockPlan,
    Entry,
    Layout,
    block_plan,
)
from .step import COMBINE, SIGNALS, Pending, begin, empty_signals, finish

__all__ = [
    "BLOCK",
    "COMBINE",
    "CONFIDENCE",
    "ESTIMATES",
    "FAULT_ROLES",
    "MIN_PER_TENSOR",
    "REDUCED",
    "SIGNALS",
    "STEP_SAMPLE",
    "WHOLE_BUDGET",
    "BlockPlan",
    "Entry",
    "Layout",
    "Pending",
    "SignalCache",
    "begin",
    "block_plan",
    "empty_signals",
    "finish",
    "rank_error",
]
