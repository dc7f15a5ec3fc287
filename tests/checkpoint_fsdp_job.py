"""A real 2-rank FSDP2 (``fully_shard``) AdamW job on CPU over gloo, for the DCP tests.

    python fsdp_job.py OUT train N K    # N steps, save DCP, K more steps
    python fsdp_job.py OUT resume DCP N K  # load DCP as of step N, K more steps

``train`` writes ``OUT/dcp`` (get_state_dict's nested layout), ``OUT/dcp_flat``
(``flatten_optimizer_state_dict=True``), ``OUT/full_N.safetensors`` and
``OUT/full_final.safetensors`` (the full, gathered model and optimizer state, from
``get_state_dict(full_state_dict=True)`` on rank 0) and ``OUT/groups.json``. ``resume``
writes ``OUT/full_final.safetensors`` after its K steps. Step ``s`` on rank ``r`` always
sees the same batch, so a resumed job can be compared bit for bit with an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard

WORLD = 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(self.norm(h))


def build(seed: int) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (n.endswith("weight") and "norm" not in n)
    ]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.1},
            {"params": no_decay, "weight_decay": 0.0, "lr": 5e-3, "amsgrad": True},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    return model, optimizer


def train_step(model: Net, optimizer: torch.optim.Optimizer, step: int, rank: int) -> None:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, 16, (6,), generator=generator)
    model(tokens).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def dump_full(model: Net, optimizer: torch.optim.Optimizer, path: Path, rank: int) -> None:
    """Gather the full state on rank 0 and write it as safetensors (collective)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer, options=options)
    if rank != 0:
        return
    flat = {f"model/{k}": v for k, v in msd.items()}
    for fqn, state in osd["state"].items():
        flat.update({f"state/{fqn}/{k}": v for k, v in state.items()})
    save_file({k: v.contiguous() for k, v in flat.items()}, str(path))
    groups = [{k: v for k, v in g.items()} for g in osd["param_groups"]]
    path.with_suffix(".groups.json").write_text(json.dumps(groups))


def run(rank: int, port: int, out: Path, mode: str, args: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    timings: dict[str, Any] = {}
    start = time.perf_counter()
    if mode == "train":
        steps, extra = int(args[0]), int(args[1])
        model, optimizer = build(seed=0)
        for step in range(1, steps + 1):
            train_step(model, optimizer, step, rank)
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=out / "dcp")
        flat = StateDictOptions(flatten_optimizer_state_dict=True)
        msd, osd = get_state_dict(model, optimizer, options=flat)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=out / "dcp_flat")
        dump_full(model, optimizer, out / f"full_{steps}.safetensors", rank)
    else:
        source, steps, extra = Path(args[0]), int(args[1]), int(args[2])
        model, optimizer = build(seed=1)  # other weights: only the loaded state may count
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=source)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    for step in range(steps + 1, steps + extra + 1):
        train_step(model, optimizer, step, rank)
    dump_full(model, optimizer, out / "full_final.safetensors", rank)
    timings["job_s"] = time.perf_counter() - start
    if rank == 0:
        (out / "timings.json").write_text(json.dumps(timings))
    dist.destroy_process_group()


def main() -> None:
    out, mode, rest = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # fork: the children inherit the imported torch instead of importing it again (seconds
    # each on a small machine); nothing has started threads or touched a device yet.
    mp.start_processes(run, args=(port, out, mode, rest), nprocs=WORLD, start_method="fork")


if __name__ == "__main__":
    main()
