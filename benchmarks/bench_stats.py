"""Statistics of a 50M-element tensor through a real server: time and reply bytes; and the
cost of the per-step signals on a 10M-element fused CPU step.

    python benchmarks/bench_stats.py                 # 50M elements, 5 timed requests each
    python benchmarks/bench_stats.py --size 10M --repeat 3

Part 1 starts ``adamscope serve`` in a subprocess on 127.0.0.1 (an ephemeral port), creates
a stepper holding one fp32 tensor of ``--size`` elements, steps it once (so it has Adam
state) and times ``GET /v1/steppers/{name}/stats`` for the parameter, a state tensor and the
effective-LR view (a derived view, computed chunk by chunk), each with quantiles, a 32-bin
histogram and a log histogram. Every timed request is a cache miss (its bins differ); the
cached reply, the signals and a one-row slice are timed too. It prints the wall time of the
whole request as the client sees it and the reply's size in bytes.

Part 2 (in this process) steps a ``--signal-size`` fp32 tensor with fused Adam, alternately
with and without the SignalObserver, and prints both medians and the difference: the
per-step price of leaving the signals on. Wall and process-CPU time are both shown (on a
shared machine, CPU time is the steadier of the two).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import httpx
import torch
from bench_step import parse_size, server

from adamscope.client import Client
from adamscope.service.engine import Stepper
from adamscope.service.inspect.signals import attach_signals, observer_of


def timed(fn: Callable[[], httpx.Response]) -> tuple[float, int]:
    t = time.perf_counter()
    r = fn()
    elapsed = time.perf_counter() - t
    r.raise_for_status()
    return elapsed, len(r.content)


def part1(size: int, repeat: int) -> None:
    print(
        f"\n[1] statistics of one fp32 tensor of {size:,} elements "
        f"({size * 4 / 2**20:.0f} MiB) through a real server; {repeat} timed requests "
        "each (median [min, max]), every one a cache miss"
    )
    with (
        server("cpu") as url,
        Client(url, timeout=600) as c,
        httpx.Client(base_url=url, timeout=600) as http,
    ):
        g = torch.Generator().manual_seed(0)
        c.create("big", {"w": torch.randn(size, generator=g)}, lr=1e-3, fused=True)
        c.step("big", {"w": torch.randn(size, generator=g)})
        path = "/v1/steppers/big/stats"
        print(f"{'request':<44} {'ms median [min, max]':>26} {'reply bytes':>12}")
        for key in ("param", "exp_avg_sq", "lr_eff"):
            times, sizes = [], []
            for i in range(repeat):
                elapsed, n = timed(
                    lambda i=i, key=key: http.get(
                        path, params={"key": key, "bins": 32 + i, "log": "true"}
                    )
                )
                times.append(elapsed)
                sizes.append(n)
            ms = [t * 1e3 for t in times]
            print(
                f"{'stats key=' + key + ' (quantiles, hist, log hist)':<44} "
                f"{statistics.median(ms):>9.1f} [{min(ms):7.1f}, {max(ms):7.1f}] "
                f"{max(sizes):>12,}"
            )
        cached = [
            timed(lambda: http.get(path, params={"key": "lr_eff", "bins": 32, "log": "true"}))
            for _ in range(repeat)
        ]
        rows = [
            ("stats, the same query again (cached)", cached),
            (
                "signals of the last step",
                [timed(lambda: http.get("/v1/steppers/big/signals")) for _ in range(repeat)],
            ),
            (
                "slice lr_eff rows=0:1000",
                [
                    timed(
                        lambda: http.get(
                            "/v1/steppers/big/slice",
                            params={"name": "w", "key": "lr_eff", "rows": "0:1000"},
                        )
                    )
                    for _ in range(repeat)
                ],
            ),
        ]
        for label, results in rows:
            ms = [t * 1e3 for t, _ in results]
            print(
                f"{label:<44} {statistics.median(ms):>9.1f} [{min(ms):7.1f}, {max(ms):7.1f}] "
                f"{max(n for _, n in results):>12,}"
            )
        c.delete("big")


def part2(size: int, steps: int) -> None:
    print(
        f"\n[2] per-step signals on a fused CPU Adam step of {size:,} fp32 elements "
        f"({steps} steps each way, interleaved)"
    )
    g = torch.Generator().manual_seed(1)
    s = Stepper(
        "sig",
        "adam",
        torch.device("cpu"),
        [("w", torch.randn(size, generator=g))],
        {"lr": 1e-3, "fused": True},
    )
    grads = {"w": torch.randn(size, generator=g)}
    observer = attach_signals(s)
    for _ in range(3):
        s.step(grads)
    assert observer_of(s) is observer
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * steps):
        on = bool(i % 2) ^ bool((i // 2) % 2)  # alternate which goes first
        if on and observer not in s.observers:
            s.observers.insert(0, observer)
        if not on and observer in s.observers:
            s.observers.remove(observer)
        t, c = time.perf_counter(), time.process_time()
        s.step(grads)
        cpu[on].append(time.process_time() - c)
        wall[on].append(time.perf_counter() - t)
    for label, data in (("wall", wall), ("process CPU", cpu)):
        off, on_ = statistics.median(data[False]) * 1e3, statistics.median(data[True]) * 1e3
        print(
            f"{label:>12}: step {off:7.2f} ms, with signals {on_:7.2f} ms, "
            f"difference {on_ - off:+6.2f} ms ({(on_ / off - 1) * 100:+5.1f}%); "
            f"min {min(data[False]) * 1e3:.2f} vs {min(data[True]) * 1e3:.2f} ms"
        )
    print(
        f"signals of the last step: sample {s.signals['sample']}, aggregate lr_eff_p99 "
        f"{s.signals['aggregate']['lr_eff_p99']:.4g}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        type=parse_size,
        default=5 * 10**7,
        help="elements of the described tensor (default 50M)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed requests per row")
    parser.add_argument(
        "--signal-size",
        type=parse_size,
        default=10**7,
        help="elements of the stepped tensor in part 2 (default 10M)",
    )
    parser.add_argument("--steps", type=int, default=30, help="part 2 steps each way")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.steps < 1:
        parser.error("--repeat and --steps must be >= 1")
    print(
        f"adamscope statistics benchmark: torch {torch.__version__}, python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
        f"torch threads"
    )
    part1(args.size, args.repeat)
    part2(args.signal_size, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
