"""What watching costs a training job: a ~10M-parameter model trained locally with fused
AdamW, unwatched and watched (``every=1`` and ``every=10``), interleaved in one run.

    python benchmarks/bench_watch.py                  # 10M parameters, 30 rounds, CPU
    python benchmarks/bench_watch.py --rounds 100 --batch 64 --device cuda

Three identical models and optimizers train side by side; each round takes a block of
``--block`` training steps (forward, backward, ``opt.step()``, ``zero_grad``) of each, in an
order that rotates every round, so that the machine's drift touches all three alike. A
block's time ends once its last step's signals are computed (``run.settle()``: the watch
computes them off the training thread, and the next step waits for them), so that no
variant's work spills into another's block. The watched ones report
to a real service (``adamscope serve`` on 127.0.0.1, started here). Printed: each
variant's median and minimum step time, and the watched/unwatched ratios of the medians
(goal on a CPU machine: <= 1.05 at every=1, <= 1.01 at every=10) and of the minima.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import adamscope
from adamscope.service.testing import spawned


def build(width: int, depth: int, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 16)).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def train_block(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    n: int,
    run: adamscope.Watch | None,
) -> float:
    """Seconds per step of ``n`` steps (and the last one's signals)."""
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    if run is not None:
        run.settle()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=9)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    variants = {name: build(args.width, args.depth, args.device) for name in ("off", "1", "10")}
    numel = sum(p.numel() for p in variants["off"][0].parameters())
    x = torch.randn(args.batch, args.width, device=args.device)
    times: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as data, spawned(data) as server:
        runs = {
            k: adamscope.watch(opt, model=m, url=server.url, name=f"bench-every-{k}", every=int(k))
            for k, (m, opt) in variants.items()
            if k != "off"
        }
        order = list(variants)
        for r in range(args.warmup + args.rounds):
            order = order[1:] + order[:1]
            for k in order:
                t = train_block(*variants[k], x, args.block, runs.get(k))
                if r >= args.warmup:
                    times[k].append(t)
        for run in runs.values():
            run.close()
        sent = {k: (run.counters.sent, run.dropped, run.counters.errors) for k, run in runs.items()}
    print(f"model: {numel / 1e6:.2f}M parameters, fused AdamW on {args.device}, batch {args.batch}")
    print(
        f"threads: {torch.get_num_threads()}, rounds: {args.rounds} (+{args.warmup} warm-up) "
        f"of {args.block} steps per variant; times are per step"
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    for k in variants:
        label = "unwatched" if k == "off" else f"watched every={k}"
        extra = "" if k == "off" else f"  (sent, dropped, errors: {sent[k]})"
        print(f"{label:>18}: median {med[k] * 1e3:8.2f} ms  min {low[k] * 1e3:8.2f} ms{extra}")
    for k in ("1", "10"):
        print(
            f"ratio every={k:>2}: median {med[k] / med['off']:.3f}  min {low[k] / low['off']:.3f}"
        )


if __name__ == "__main__":
    main()
