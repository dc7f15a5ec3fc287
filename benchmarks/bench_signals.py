"""The per-step signals' own cost: a stepper's step with its SignalObserver on and off,
interleaved, on one thread (where the service runs them on a busy machine), at 10K and
10M fp32 parameters by default.

    python benchmarks/bench_signals.py                   # 10K and 10M, fused Adam
    python benchmarks/bench_signals.py --sizes 10K 1M 10M --steps 20 --threads 2

The 10M model is bench_step.py's (a transformer-like layout: 129 tensors); smaller sizes
are one tensor. Each round steps once with the signals off and once on (which goes first
alternates); the signals' cost is the difference of the medians (and of the minima, the
figure least touched by other processes), in wall time and in this thread's CPU time
(``time.thread_time``: on one torch thread every operation runs here, so it is the
signals' own work, little changed by other processes sharing the cores). The service runs
the after-step half of the signals once the step's reply has left, so a client waits for
it only when its next request comes sooner than the signals take.
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

from adamscope.service.engine import Stepper  # noqa: E402
from adamscope.service.inspect.signals import attach_signals  # noqa: E402


def bench(numel: int, steps: int, impl: dict[str, bool]) -> dict[str, list[float]]:
    if numel >= 1_000_000:
        _, names, init, grads = model(numel)
    else:
        gen = torch.Generator().manual_seed(0)
        names, init, grads = ["w"], [torch.randn(numel, generator=gen)], [torch.randn(numel)]
    s = Stepper("bench", "adam", torch.device("cpu"), list(zip(names, init, strict=True)), impl)
    observer = attach_signals(s)
    g = dict(zip(names, grads, strict=True))
    times: dict[str, list[float]] = {"off": [], "on": [], "off_cpu": [], "on_cpu": []}
    for i in range(steps + 3):
        for on in (True, False) if i % 2 else (False, True):
            observer.enabled = on
            c0, t0 = time.thread_time(), time.perf_counter()
            s.step(g)
            took, cpu = time.perf_counter() - t0, time.thread_time() - c0
            if i >= 3:
                times["on" if on else "off"].append(took * 1e3)
                times["on_cpu" if on else "off_cpu"].append(cpu * 1e3)
        if i == 0:
            observer.enabled = True
            s.step(g)  # the signals' layout and caches, built once
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[10**4, 10**7])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--impl", choices=["fused", "foreach", "forloop"], default="fused")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    impl = {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "forloop": {"foreach": False},
    }[args.impl]
    print(
        f"per-step signals: {args.impl} Adam step with the SignalObserver off and on, "
        f"{args.threads} torch thread(s), {args.steps} interleaved rounds, ms"
    )
    print(
        f"{'params':>11}   {'step off median [min]':>22}   {'step on median [min]':>22}"
        f"   {'signals median':>14}   {'signals min':>11}   {'signals CPU median [min]':>24}"
    )
    for numel in args.sizes:
        t = bench(numel, args.steps, impl)
        off, on = t["off"], t["on"]
        cpu = statistics.median(t["on_cpu"]) - statistics.median(t["off_cpu"])
        cpu_min = min(t["on_cpu"]) - min(t["off_cpu"])
        print(
            f"{numel:>11,}   {statistics.median(off):>12.3f} [{min(off):>7.3f}]"
            f"   {statistics.median(on):>12.3f} [{min(on):>7.3f}]"
            f"   {statistics.median(on) - statistics.median(off):>14.3f}"
            f"   {min(on) - min(off):>11.3f}   {cpu:>14.3f} [{cpu_min:>7.3f}]",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
