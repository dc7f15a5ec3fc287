"""Read throughput for dashboards: requests/s and latency quantiles under concurrent load.

    python benchmarks/bench_reads.py            # 16 connections, 5 s per endpoint

A real ``adamscope serve`` hosts a 10M-parameter stepper (129 tensors, stepped so it has
state); ``loadgen.py`` (raw asyncio sockets, not httpx, in its own process, so the client
is not the bottleneck) keeps 16 kept-alive connections busy on one endpoint at a time and
reports requests/s and p50/p99 latency. Goal: summary and statistics reads sustain at
least 2,000 requests/s with p99 under 20 ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import httpx
import torch
from bench_step import server, transformer_shapes

from adamscope.client import Client

HERE = Path(__file__).resolve().parent
ENDPOINTS = [
    ("liveness (baseline)", "/healthz"),
    ("summary", "/v1/steppers/dash"),
    ("bias correction", "/v1/steppers/dash/bias-correction"),
    ("statistics", "/v1/steppers/dash/stats"),
    ("last-step signals", "/v1/steppers/dash/signals"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    print(
        f"read throughput: {args.connections} connections, {args.seconds:g} s per endpoint, "
        f"load from benchmarks/loadgen.py (raw sockets) in a separate process"
    )
    print(
        f"{'endpoint':<22} {'path':<38} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'non-200':>8}"
    )
    with server("cpu") as url, Client(url) as c:
        shapes = transformer_shapes(10**7)
        c.create(
            "dash",
            [(f"p{i}", torch.zeros(s)) for i, s in enumerate(shapes)],
            fused=True,
            durability="manual",
        )
        c.step("dash", {f"p{i}": torch.ones(s) for i, s in enumerate(shapes)})
        for label, path in ENDPOINTS:
            if httpx.get(url + path, timeout=30).status_code == 404:
                print(f"{label:<22} {path:<38} (no such endpoint in this build)")
                continue
            out = subprocess.run(
                [
                    sys.executable,
                    str(HERE / "loadgen.py"),
                    url,
                    path,
                    "--connections",
                    str(args.connections),
                    "--seconds",
                    str(args.seconds),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout)
            print(
                f"{label:<22} {path:<38} {r['rps']:>8.0f} {r['p50_ms']:>8.2f} "
                f"{r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} {r['non_200']:>8}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
