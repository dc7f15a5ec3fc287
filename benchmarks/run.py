"""Every benchmark, one command: ``python benchmarks/run.py [--quick]``.

Runs, in order: the step benchmark (remote vs local vs the raw-socket floor, 1M/10M/50M
fp32, fused Adam), the small-stepper latency benchmark, the read-throughput benchmark, the
durability-policy benchmark and (where Ray Serve is installed) the distributed mode's
overhead, each in its own process, and prints their tables.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
QUICK = "--quick" in sys.argv[1:]
SUITE = [
    ["bench_step.py"] + (["--sizes", "1M", "10M", "--steps", "8"] if QUICK else []),
    ["bench_small.py"] + (["--steps", "100"] if QUICK else []),
    ["bench_reads.py"] + (["--seconds", "2"] if QUICK else []),
    ["bench_durability.py"] + (["--seconds", "1"] if QUICK else []),
    ["bench_checkpoint.py"] + (["--steps", "100", "1000", "--writes", "2"] if QUICK else []),
]
try:  # the distributed mode's overhead, where Ray Serve is installed (the test extra has it)
    import ray.serve  # noqa: F401

    SUITE.append(["bench_ray.py"] + (["--sizes", "10K", "1M", "--steps", "8"] if QUICK else []))
except ImportError:
    pass


def main() -> int:
    print(
        f"adamscope benchmarks on {platform.node()}: {platform.platform()}, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}, torch {torch.__version__}, "
        f"cuda {'yes' if torch.cuda.is_available() else 'no'}\n",
        flush=True,
    )
    status = 0
    for cmd in SUITE:
        t0 = time.monotonic()
        print(f"$ python benchmarks/{' '.join(cmd)}", flush=True)
        rc = subprocess.run(
            [sys.executable, str(HERE / cmd[0]), *cmd[1:]],
            cwd=HERE.parent,
            env={**os.environ, "PYTHONPATH": str(HERE)},
        ).returncode
        print(f"({time.monotonic() - t0:.0f} s, exit {rc})\n", flush=True)
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
