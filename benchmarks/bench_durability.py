"""Steps per second under each durability policy, through a real ``adamscope serve``.

    python benchmarks/bench_durability.py                  # 1M fp32 params, ~3 s per policy
    python benchmarks/bench_durability.py --size 10M --seconds 5

The server runs as a subprocess on 127.0.0.1 with a temporary data directory (on the
filesystem of ``--data-dir``'s parent, default the system temp directory: that disk's
fsync is what ``every_step`` pays). For each policy a fresh stepper of ``--size`` fp32
parameters (4 tensors, for-loop Adam) is created and stepped with ``Client.step`` (gradients
up, the JSON result back) for ``--seconds`` seconds after 10 warmup steps, the policies
taking turns in half-second blocks so machine noise hits them alike. Printed per policy:
steps/s (steps over the time spent in ``step`` calls), the median and max ms per step, how
many checkpoint writes happened (seen as ``persisted_step`` moving) and the file size.
``manual`` never writes: it is the in-memory baseline the others are compared with.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from bench_step import server as step_server

from adamscope.client import Client

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 10
#: Seconds each policy steps before the next one takes over.
BLOCK_S = 0.5
POLICIES = {
    "manual": {"mode": "manual"},
    "every_step": {"mode": "every_step"},
    "every_n:10": {"mode": "every_n", "n": 10},
    "every_n:100": {"mode": "every_n", "n": 100},
    "interval:1": {"mode": "interval", "seconds": 1.0},
}


def parse_size(text: str) -> int:
    t = text.strip().lower()
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(t[-1:], 1)
    return int(float(t[:-1] if scale != 1 else t) * scale)


def server(data_parent: str | None) -> AbstractContextManager[str]:
    """``adamscope serve`` on the CPU with its data directory inside ``data_parent``."""
    return step_server("cpu", data_parent=data_parent)


def params(numel: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    per = numel // 4
    sizes = [per, per, per, numel - 3 * per]
    return {f"p{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}


class Run:
    """One policy's stepper and its timings."""

    def __init__(self, client: Client, policy: str, numel: int) -> None:
        self.client = client
        self.policy = policy
        self.name = f"bench-{policy.replace(':', '-')}"
        values = params(numel)
        client.create(
            self.name, values, lr=1e-3, foreach=False, fused=False, durability=POLICIES[policy]
        )
        g = torch.Generator().manual_seed(1)
        self.grads = {n: torch.randn(t.shape, generator=g) for n, t in values.items()}
        for _ in range(WARMUP):
            client.step(self.name, self.grads)
        self.last = client.get(self.name).persisted_step
        self.times: list[float] = []
        self.writes = 0

    def block(self, seconds: float, max_steps: int) -> None:
        """Step for about ``seconds`` (untimed: counting the checkpoint writes)."""
        start = time.perf_counter()
        while time.perf_counter() - start < seconds and len(self.times) < max_steps:
            t0 = time.perf_counter()
            self.client.step(self.name, self.grads)
            self.times.append(time.perf_counter() - t0)
            now = self.client.get(self.name).persisted_step
            self.writes += now != self.last
            self.last = now

    def report(self) -> str:
        size = self.client.checkpoint(self.name).size
        self.client.delete(self.name)
        t = self.times
        return (
            f"{self.policy:<13}{len(t) / sum(t):>9.1f}{statistics.median(t) * 1e3:>11.2f}"
            f"{max(t) * 1e3:>9.1f}{len(t):>7}{self.writes:>8}{size / 2**20:>10.1f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("1M"),
        help="fp32 parameters per stepper (default 1M)",
    )
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per policy")
    ap.add_argument("--max-steps", type=int, default=2000, help="timed steps per policy at most")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument(
        "--data-dir",
        default=None,
        help="parent of the temporary data directory (default: system temp)",
    )
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"{args.size:,} fp32 params; data under {args.data_dir or tempfile.gettempdir()}"
    )
    print(
        f"{'policy':<13}{'steps/s':>9}{'median ms':>11}{'max ms':>9}{'steps':>7}"
        f"{'writes':>8}{'file MiB':>10}"
    )
    with server(args.data_dir) as url, Client(url) as client:
        runs = [Run(client, policy, args.size) for policy in args.policies]
        # Round robin in blocks, so that noise from the machine hits every policy alike.
        rounds = max(1, round(args.seconds / BLOCK_S))
        for _ in range(rounds):
            for run in runs:
                run.block(args.seconds / rounds, args.max_steps)
        for run in runs:
            print(run.report(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
