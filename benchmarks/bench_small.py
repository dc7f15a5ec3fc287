"""Step latency of a small stepper against a tiny JSON round trip, measured interleaved.

    python benchmarks/bench_small.py                 # 10K parameters in 10 tensors

Many small steppers (one per experiment, per layer group, per test) must cost little more
than any request: this prints the median [min, max] ms of ``RemoteAdam.step()`` on a
10K-parameter stepper (fused Adam) and of ``GET /healthz`` through the same client, and
their ratio, under the ``manual`` durability policy (no disk write per step) and under
``every_step`` (an fsync'd checkpoint before every reply).

The service records a step's signals and history once its reply has left, while the
client computes its next gradients. So each round first waits ``--gap`` ms (the client's
forward and backward pass; the server settles the last step meanwhile), then times one JSON
round trip and one step: both on a server with nothing left to do, neither one paying for
the other. A second row per policy steps back to back (no gap): a step that arrives before
the last one settled waits for it, so that row is the per-step cost including the signals.
Every step's result is checked against a local ``torch.optim.Adam`` stepped alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_step import server

from adamscope.client import Client, RemoteAdam

IMPL = {"fused": True}


def fmt(ms: list[float]) -> str:
    return f"{statistics.median(ms):7.3f} [{min(ms):7.3f}, {max(ms):8.3f}]"


def measure(
    client: Client, numel: int, tensors: int, policy: str, steps: int, gap_ms: float
) -> bool:
    name = f"small-{policy}"
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(numel // tensors, generator=gen).requires_grad_() for _ in range(tensors)]
    local = [p.detach().clone().requires_grad_() for p in params]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    client.create(name, [(n, p.detach()) for n, p in named], **IMPL, durability=policy)
    remote = RemoteAdam(named, client=client, name=name, **IMPL)
    reference = torch.optim.Adam(local, **IMPL)
    for p, q in zip(params, local, strict=True):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    rows = []
    for gap in (gap_ms, 0.0):
        step_ms, json_ms = [], []
        for i in range(steps + 20):
            if gap:
                time.sleep(gap / 1e3)
            t0 = time.perf_counter()
            client.health()
            t1 = time.perf_counter()
            remote.step()
            t2 = time.perf_counter()
            reference.step()
            if i >= 20:
                json_ms.append((t1 - t0) * 1e3)
                step_ms.append((t2 - t1) * 1e3)
        rows.append((gap, step_ms, json_ms))
    client.delete(name)
    exact = all(torch.equal(p, q) for p, q in zip(params, local, strict=True))
    base = statistics.median(rows[0][2])  # the JSON round trip on a settled server
    for gap, step_ms, json_ms in rows:
        label = f"{gap:g} ms gap" if gap else "back to back"
        print(
            f"{numel:>8,} {tensors:>7} {policy:>11} {label:>13}   {fmt(step_ms)}   "
            f"{fmt(json_ms)}   {statistics.median(step_ms) / base:6.2f}x"
            f"{'' if exact else '   NOT BIT-EXACT'}",
            flush=True,
        )
    return exact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=10_000)
    parser.add_argument("--tensors", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--gap",
        type=float,
        default=5.0,
        help="ms the client waits before each round (its forward/backward)",
    )
    args = parser.parse_args(argv)
    print(
        f"small-stepper latency: torch {torch.__version__}, fused Adam, {args.steps} rounds "
        "of one GET /healthz and one step through the same client; ratio = step median / "
        "JSON round-trip median after a gap"
    )
    print(
        f"{'params':>8} {'tensors':>7} {'durability':>11} {'rounds':>13}   "
        f"{'step ms median [min, max]':>27}   {'JSON RTT ms median [min, max]':>27}   ratio"
    )
    exact = True
    with server("cpu") as url, Client(url) as client:
        for policy in ("manual", "every_step"):
            exact &= measure(client, args.numel, args.tensors, policy, args.steps, args.gap)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
