"""The alert bar's synthetic gradient sequence (shared by the unit and end-to-end tests).

The failure mode of the seed article (Reddi et al., 2018): large gradients (1.0) for 50
steps fill v, then 300 steps of tiny ones (1e-3) let Adam's v decay by beta2^300 (with
beta2 = 0.99, to about 5% of its peak) while its effective LR grows; then one large gradient
(5.0) makes v jump about 14-fold and the effective LR's p99 falls by about 73% in one step.
AMSGrad's denominator uses the max of v so far, which the spike (v = 0.27) does not exceed
(peak 0.39): its effective LR moves only by bias correction (at most 4%, at step 12).

With PyTorch's default beta2 = 0.999 the same happens over 100 + 2000 + 1 steps (spike 8.0):
Adam's p99 falls by 59%, AMSGrad's moves by at most 4.4%; the tests use 0.99 to stay short.
The rule that catches it is the default one: a swing of the effective LR's p99 by more than
50% in one step, after a 10-step warm-up (bias correction alone moves it by 47% at step 2).
"""

from __future__ import annotations

import torch

from adamscope.client.protocol import AlertRule

BETAS = (0.9, 0.99)
LR = 1e-3
PHASES = ((1.0, 50), (1e-3, 300), (5.0, 1), (1e-3, 20))
SPIKE_STEP = 351
NUMEL = 256
RULE = AlertRule(kind="swing", signal="lr_eff_p99", tensor="*", threshold=0.5, after_step=10)


def gradients(numel: int = NUMEL, seed: int = 0) -> list[torch.Tensor]:
    """The sequence: fixed per-element magnitudes, random signs, the phases' scales."""
    g = torch.Generator().manual_seed(seed)
    scale = 0.5 + torch.rand(numel, generator=g)
    out = []
    for magnitude, steps in PHASES:
        for _ in range(steps):
            sign = torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)
            out.append(sign * scale * magnitude)
    return out
