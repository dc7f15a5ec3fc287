"""A real 2-rank job over gloo on CPU that watches its AdamW with ``adamscope.watch``, for
the distributed watch tests.

    python watch_dist_job.py OUT MODE URL NAME [EVERY]   # MODE: fsdp (fully_shard) or ddp

Every rank calls ``watch`` alike. Each step the job itself records, on rank 0, the full
(gathered: ``DTensor.full_tensor()``) gradient, parameter and state of every tensor, after
the step and at the next step's boundary (once the watch applied its commands), and on
every rank the learning rates each step used; it trains until the file ``OUT/stop`` exists
(the ranks agree on it with an all-reduce, so they stop at the same step) and writes
``OUT/full.safetensors`` (keys ``"<step>/<param>/<key>"``) and ``OUT/lr_<rank>.json``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch import nn

import adamscope

WORLD = 2
#: A bound on the job's length whatever the test does (steps; about 40 ms each).
MAX_STEPS = 3000


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.norm = nn.LayerNorm(8)
        # Uneven shards: 5 rows split 3 + 2; one row split 1 + 0 (rank 1's shard is empty).
        self.gate = nn.Linear(8, 1)
        self.head = nn.Linear(8, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(self.norm(h) * torch.sigmoid(self.gate(h)))


def build(mode: str) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(the module to call, the one whose parameters are named, the optimizer)."""
    torch.manual_seed(0)
    net = Net()
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in net.layers:
            fully_shard(layer)
        fully_shard(net)
        called: nn.Module = net
    else:
        called = nn.parallel.DistributedDataParallel(net)
    decay = [p for n, p in net.named_parameters() if n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in net.named_parameters() if not (n.endswith("weight") and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.1},
            {"params": rest, "weight_decay": 0.0, "lr": 5e-3, "amsgrad": True},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    return called, net, optimizer


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor), copied to the CPU."""
    got = t.full_tensor() if hasattr(t, "full_tensor") else t  # type: ignore[operator]
    return got.detach().to("cpu", copy=True)


def run(rank: int, port: int, out: Path, mode: str, url: str, name: str, every: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    called, net, optimizer = build(mode)
    named = dict(net.named_parameters())
    records: dict[str, torch.Tensor] = {}
    lrs: list[list[float]] = []
    watch = adamscope.watch(optimizer, model=net, url=url, name=name, timeout=5.0, every=every)

    def at_boundary(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        """After the watch's pre-hook (registered after it): the state as the commands
        due at this boundary left it, as ``"pre<step>/<param>/<key>"``."""
        for n, p in named.items():
            value = full(p)
            if rank == 0:
                records[f"pre{watch.step}/{n}/param"] = value
            for k, v in opt.state[p].items():
                got = full(v)
                if rank == 0:
                    records[f"pre{watch.step}/{n}/{k}"] = got

    optimizer.register_step_pre_hook(at_boundary)
    for step in range(1, MAX_STEPS + 1):
        stop = torch.tensor([1.0 if (out / "stop").exists() else 0.0])
        dist.all_reduce(stop)
        if stop.item():
            break
        generator = torch.Generator().manual_seed(1000 * step + rank)
        called(torch.randint(0, 16, (6,), generator=generator)).pow(2).mean().backward()
        grads = {n: full(p.grad) for n, p in named.items() if p.grad is not None}
        optimizer.step()
        lrs.append([float(g["lr"]) for g in optimizer.param_groups])
        for n, p in named.items():
            value = full(p)  # every rank: a collective
            if rank == 0:
                records[f"{step}/{n}/grad"] = grads[n]
                records[f"{step}/{n}/param"] = value
            for k, v in optimizer.state[p].items():
                got = full(v)  # every rank: a collective
                if rank == 0:
                    records[f"{step}/{n}/{k}"] = got
        optimizer.zero_grad()
        time.sleep(0.03)
    watch.close(10)
    (out / f"lr_{rank}.json").write_text(
        json.dumps({"lrs": lrs, "errors": watch.counters.errors, "last": watch.counters.last_error})
    )
    if rank == 0:
        save_file({k: v.contiguous() for k, v in records.items()}, str(out / "full.safetensors"))
    dist.destroy_process_group()


def main() -> None:
    out, mode, url, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    every = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # fork: the children inherit the imported torch (seconds each on a small machine).
    mp.start_processes(
        run, args=(port, out, mode, url, name, every), nprocs=WORLD, start_method="fork"
    )


if __name__ == "__main__":
    main()
