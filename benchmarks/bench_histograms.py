"""The histograms over time's own cost: one recording (every tensor's grad, exp_avg,
exp_avg_sq and effective-LR histograms, :func:`histograms`) and its cost per step (one
recording every HISTOGRAM_EVERY steps), beside a plain ``torch.optim.Adam`` step of the
same model measured in the same run, on one thread.

    python benchmarks/bench_histograms.py                  # 10K and 10M
    python benchmarks/bench_histograms.py --sizes 1M --repeat 9

The 10M model is bench_step.py's (129 tensors); smaller sizes are one tensor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import model, parse_size  # noqa: E402

from adamscope.client.numerics import adam_factors  # noqa: E402
from adamscope.service.inspect.kernels.histogram import HISTOGRAM_EVERY, histograms  # noqa: E402
from adamscope.service.inspect.kernels.sampling import Entry  # noqa: E402


def measure(numel: int, repeat: int) -> tuple[float, float]:
    """Median seconds of one Adam step and of one recording of the histograms."""
    _, names, init, grads = (
        model(numel)
        if numel >= 10**6
        else (None, ["w"], [torch.randn(numel)], [torch.randn(numel)])
    )
    params = [t.clone().requires_grad_(True) for t in init]
    opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    group = opt.param_groups[0]
    entries = [
        Entry(n, p, g, opt.state[p], group) for n, p, g in zip(names, params, grads, strict=True)
    ]
    factors = [adam_factors(group, float(opt.state[p]["step"])) for p in params]
    steps, records = [], []
    for k in range(repeat):
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        histograms(entries, factors, k)
        t2 = time.perf_counter()
        steps.append(t1 - t0)
        records.append(t2 - t1)
    return statistics.median(steps), statistics.median(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=parse_size, default=[10_000, 10_000_000])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"one thread; a recording every {HISTOGRAM_EVERY} steps; medians of {args.repeat}")
    print(
        f"{'params':>10} {'adam step':>10} {'recording':>10} {'per step':>10} {'per step/adam':>14}"
    )
    for n in args.sizes:
        step, record = measure(n, args.repeat)
        per = record / HISTOGRAM_EVERY
        print(
            f"{n:>10} {step * 1e3:>8.2f}ms {record * 1e3:>8.2f}ms {per * 1e3:>8.3f}ms"
            f" {per / step:>13.2f}x"
        )


if __name__ == "__main__":
    main()
