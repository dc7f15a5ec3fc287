"""Checkpoint size and write time as a run grows: they must not grow with the step count.

    python benchmarks/bench_checkpoint.py                 # 723 tensors, steps 100 and 5,000
    python benchmarks/bench_checkpoint.py --steps 100 1000 5000 --skip 0.1

A stepper shaped like Llama-2-70B's parameter list (80 layers: 723 tensors with their real
names, each tensor tiny so the checkpoint's header, not its data, is what is measured) is
stepped with a fresh idempotency key per step, as ``RemoteAdam`` and the clients send them.
At each of ``--steps`` the checkpoint is written the way the service writes it (to a
temporary file, fsynced, renamed over ``checkpoint.safetensors``) ``--writes`` times; printed
per point: the file and header sizes, the median and max write time, the keys the journal
holds, and a check that the file loads back with the reference ``safetensors`` library and
with the service's own reader (the script exits 1 if one does not). ``--skip F`` leaves a
random fraction F of the tensors without a gradient in each step (every step a different
stepped set: the journal's worst case).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from adamscope.service.engine import Stepper
from adamscope.service.engine import checkpoint as checkpoints
from adamscope.service.persistence.store import Store

LAYER = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


def llama_names(layers: int) -> list[str]:
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{t}" for i in range(layers) for t in LAYER]
    return names + ["model.norm.weight", "lm_head.weight"]


def write_once(store: Store, stepper: Stepper) -> tuple[float, int]:
    """Seconds to write the checkpoint as the service does, and its size."""
    start = time.perf_counter()
    out = store.begin_checkpoint(stepper.name)
    enc = checkpoints.write(stepper, out.write, {"durability": {"mode": "every_step"}})
    out.commit()
    return time.perf_counter() - start, enc.size


def header_size(path: Path) -> int:
    with open(path, "rb") as f:
        return int(struct.unpack("<Q", f.read(8))[0])


def reads_back(path: Path) -> str:
    """'ok' when both the reference library and the service's reader load the file."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception as e:  # noqa: BLE001 - reported, not raised: the old format fails here
        return f"safetensors: {type(e).__name__}"
    try:
        checkpoints.decode(path.read_bytes())
    except Exception as e:  # noqa: BLE001
        return f"service: {type(e).__name__}"
    return "ok"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=80, help="decoder layers (80: 723 tensors)")
    ap.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[100, 5000],
        help="steps at which to measure (ascending)",
    )
    ap.add_argument("--writes", type=int, default=5, help="checkpoint writes per point")
    ap.add_argument(
        "--skip",
        type=float,
        default=0.0,
        help="fraction of tensors left without a gradient in each step",
    )
    ap.add_argument("--numel", type=int, default=16, help="elements per tensor")
    ap.add_argument("--data-dir", default=None, help="parent of the temporary data directory")
    args = ap.parse_args()
    names = llama_names(args.layers)
    print(
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"{len(names)} tensors of {args.numel} fp32 elements (Llama-style names), "
        f"{args.skip:.0%} skipped per step; data under {args.data_dir or tempfile.gettempdir()}"
    )
    print(
        f"{'step':>6}{'file KiB':>10}{'header KiB':>12}{'median ms':>11}{'max ms':>8}"
        f"{'keys':>6}  reads back"
    )
    g = torch.Generator().manual_seed(0)
    params = [(n, torch.randn(args.numel, generator=g)) for n in names]
    stepper = Stepper("llama", "adam", torch.device("cpu"), params, {"lr": 1e-3, "foreach": True})
    grads = {n: torch.randn(args.numel, generator=g) for n in names}
    pick = torch.Generator().manual_seed(1)
    unreadable = 0
    with tempfile.TemporaryDirectory(dir=args.data_dir) as tmp:
        store = Store(Path(tmp))
        store.open()
        done = 0
        for target in args.steps:
            while done < target:
                if args.skip:
                    keep = torch.rand(len(names), generator=pick) >= args.skip
                    sent = {n: grads[n] for n, k in zip(names, keep.tolist(), strict=True) if k}
                else:
                    sent = grads
                stepper.step(sent, key=uuid.uuid4().hex)
                done += 1
            times, size = [], 0
            for _ in range(args.writes):
                t, size = write_once(store, stepper)
                times.append(t)
            path = store.checkpoint_path(stepper.name)
            keys = (
                len(stepper.keys)
                if hasattr(stepper, "keys")
                else len(stepper.journal.get("keys", {}))
            )
            verdict = reads_back(path)
            unreadable += verdict != "ok"
            print(
                f"{target:>6}{size / 1024:>10.0f}{header_size(path) / 1024:>12.0f}"
                f"{statistics.median(times) * 1e3:>11.1f}{max(times) * 1e3:>8.1f}"
                f"{keys:>6}  {verdict}",
                flush=True,
            )
    return 1 if unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
