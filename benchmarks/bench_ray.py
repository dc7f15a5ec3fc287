"""What the distributed mode costs: step latency through ``adamscope serve --ray`` vs the
single-process ``adamscope serve``, on this machine, measured interleaved.

    python benchmarks/bench_ray.py                       # 10K, 1M, 10M fp32 params, fused
    python benchmarks/bench_ray.py --sizes 1M --steps 30

Both services run as subprocesses on 127.0.0.1 (the Ray one on a new local Ray instance
with two slot actors), both with in-memory durability (``manual``) so that the figures are
the routing, not the disk. For each size, three ``RemoteAdam`` twins step the same
gradients, one step each in turn (rotating who goes first):

- **single**: the single-process service;
- **ray**: the Ray deployment, the stepper on one slot (Serve's proxy -> the ingress
  replica -> the slot's service: two more hops than single);
- **ray sharded**: the same stepper split over both slots (``shards=2``): the ingress
  splits each step by tensor, the shards step in parallel, the replies are merged.

It prints the median [min, max] ms per step of each, the ratios to single, and whether all
three stayed bit-identical to a local ``torch.optim.Adam`` (exit status 1 if not).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from bench_step import IMPLS, fmt, model, parse_size, server

from adamscope.client import Client, RemoteAdam


def bench_size(
    clients: dict[str, Client], numel: int, impl: str, warmup: int, steps: int
) -> tuple[dict[str, list[float]], bool, int]:
    shapes, names, init, grads = model(numel)
    options = {"lr": 1e-3, **IMPLS[impl]}
    local_params = [t.clone().requires_grad_() for t in init]
    local = torch.optim.Adam(local_params, **options)
    runs: dict[str, tuple[RemoteAdam, list[torch.Tensor]]] = {}
    plan = {"single": ("single", None), "ray": ("ray", None), "ray sharded": ("ray", 2)}
    for label, (which, shards) in plan.items():
        params = [t.clone().requires_grad_() for t in init]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        name = f"bench-{label.replace(' ', '-')}-{numel}-{os.getpid()}"
        opt = RemoteAdam(
            list(zip(names, params, strict=True)),
            **options,
            client=clients[which],
            name=name,
            durability="manual",
            shards=shards,
        )
        runs[label] = (opt, params)
    for p, g in zip(local_params, grads, strict=True):
        p.grad = g.clone()

    def timed(opt: RemoteAdam) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            opt.step()
            return time.perf_counter() - t0

        return run

    order = list(runs)
    times: dict[str, list[float]] = {label: [] for label in order}
    try:
        for i in range(warmup + steps):
            turn = order[i % len(order) :] + order[: i % len(order)]
            took = {label: timed(runs[label][0])() for label in turn}
            local.step()
            if i >= warmup:
                for label in order:
                    times[label].append(took[label] * 1e3)
        identical = all(
            torch.equal(a, b)
            for _, params in runs.values()
            for a, b in zip(params, local_params, strict=True)
        )
    finally:
        for opt, _ in runs.values():
            opt.client.delete(opt.name)
    return times, identical, len(shapes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=[10**4, 10**6, 10**7],
        help="parameter counts (default 10K 1M 10M)",
    )
    parser.add_argument("--impl", choices=sorted(IMPLS), default="fused")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per size")
    args = parser.parse_args(argv)
    print(
        f"adamscope distributed-mode overhead: torch {torch.__version__}, python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, impl {args.impl}, fp32, "
        f"{args.steps} timed steps after {args.warmup} warmup, interleaved; ray = a local "
        f"Ray with 2 slot actors on this machine"
    )
    header = (
        f"{'params':>11} {'tensors':>7}   {'single ms':>29}   {'ray ms':>29}   "
        f"{'ray sharded (2) ms':>29}   {'ray/single':>10} {'sharded/single':>14}"
        f"  identical"
    )
    print(header)
    print("-" * len(header))
    ok = True
    with (
        server("cpu") as single_url,
        server("cpu", timeout=300, extra=("--ray", "--slots", "2"), stop_timeout=120) as ray_url,
        Client(single_url) as single,
        Client(ray_url, timeout=300) as ray,
    ):
        for numel in args.sizes:
            times, identical, tensors = bench_size(
                {"single": single, "ray": ray}, numel, args.impl, args.warmup, args.steps
            )
            ok &= identical
            med = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"{numel:>11,} {tensors:>7}   {fmt(times['single']):>29}   "
                f"{fmt(times['ray']):>29}   {fmt(times['ray sharded']):>29}   "
                f"{med['ray'] / med['single']:>9.2f}x "
                f"{med['ray sharded'] / med['single']:>13.2f}x  {identical}",
                flush=True,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
