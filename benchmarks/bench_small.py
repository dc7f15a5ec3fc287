"""Step latency of a small stepper against a tiny JSON round trip, measured interleaved.

    python benchmarks/bench_small.py                 # 10K parameters in 10 tensors

Many small steppers (one per experiment, per layer group, per test) must cost little more
than any request: this prints the median [min, max] ms of ``RemoteAdam.step()`` on a
10K-parameter stepper and of ``GET /healthz`` through the same client, and their ratio,
under the ``manual`` durability policy (no disk write per step) and under ``every_step``
(an fsync'd checkpoint before every reply).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_step import server

from client import Client, RemoteAdam

IMPL = {"foreach": True}


def fmt(ms: list[float]) -> str:
    return f"{statistics.median(ms):7.3f} [{min(ms):7.3f}, {max(ms):8.3f}]"


def measure(client: Client, numel: int, tensors: int, policy: str, steps: int) -> None:
    name = f"small-{policy}"
    params = [torch.randn(numel // tensors).requires_grad_() for _ in range(tensors)]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    client.create(name, [(n, p.detach()) for n, p in named], **IMPL, durability=policy)
    opt = RemoteAdam(named, client=client, name=name, **IMPL)
    for p in params:
        p.grad = torch.randn_like(p)
    step_ms, json_ms = [], []
    for i in range(steps + 20):
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        client.health()
        t2 = time.perf_counter()
        if i >= 20:
            step_ms.append((t1 - t0) * 1e3)
            json_ms.append((t2 - t1) * 1e3)
    client.delete(name)
    ratio = statistics.median(step_ms) / statistics.median(json_ms)
    print(f"{numel:>8,} {tensors:>7} {policy:>11}   {fmt(step_ms)}   {fmt(json_ms)}   "
          f"{ratio:6.2f}x", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=10_000)
    parser.add_argument("--tensors", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    print(f"small-stepper latency: torch {torch.__version__}, fused Adam, {args.steps} steps, "
          "interleaved with GET /healthz through the same client")
    print(f"{'params':>8} {'tensors':>7} {'durability':>11}   {'step ms median [min, max]':>27}"
          f"   {'JSON RTT ms median [min, max]':>27}   ratio")
    with server("cpu") as url, Client(url) as client:
        for policy in ("manual", "every_step"):
            measure(client, args.numel, args.tensors, policy, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
