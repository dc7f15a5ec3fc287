"""A watched run under ``torch.distributed``: which rank this is, and what each rank holds.

Every rank calls ``watch`` the same way; the service shows one run. Two layouts:

- ``replicated`` (DDP, or plain tensors on every rank): every rank holds the whole state.
  Rank 0 computes the signals and answers state reads; the others report only their step
  (to receive the commands) and apply the edits.
- ``sharded`` (FSDP2 ``fully_shard``: parameters and state are DTensors): each rank
  computes the signals of its local shards (``DTensor.to_local()``: no collective) and
  answers reads with them, each tensor's place in the whole given by :func:`placement`;
  the service merges by parameter name.

Nothing here runs a collective: the ranks agree on a step only through the step at which
the service asks every rank to apply a command (``at``), which each rank applies at exactly
that boundary or reports as missed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "LocalView",
    "Topology",
    "is_sharded",
    "local",
    "placement",
    "slice_for",
    "topology",
]

REPLICATED, SHARDED = "replicated", "sharded"


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (the very tensor, no copy and
    no collective), else the tensor itself."""
    if is_sharded(t):
        with torch.no_grad():
            found: torch.Tensor = t.to_local()  # type: ignore[attr-defined]
        return found
    return t


def placement(t: torch.Tensor) -> dict[str, list[int]] | None:
    """Where a DTensor's local shard sits in the whole: ``{"offset": [...], "shape":
    [...]}`` (the offset per dimension, the local shape); None for a plain tensor."""
    if not is_sharded(t):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        t.shape,
        t.device_mesh,  # type: ignore[attr-defined]
        t.placements,  # type: ignore[attr-defined]
    )
    return {"offset": [int(o) for o in offset], "shape": [int(s) for s in shape]}


def slice_for(full: torch.Tensor, where: Mapping[str, Any] | None) -> torch.Tensor:
    """The part of ``full`` (a whole tensor) that a shard at ``where`` holds."""
    if where is None:
        return full
    index = tuple(slice(o, o + s) for o, s in zip(where["offset"], where["shape"], strict=True))
    return full[index]


@dataclass(frozen=True)
class Topology:
    """This process's place in the job (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    layout: str = REPLICATED

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def reports_signals(self) -> bool:
        """Whether this rank computes signals: every rank of a sharded job, rank 0 else."""
        return self.layout == SHARDED or self.rank == 0

    def wire(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world, "layout": self.layout}


def topology(opt: torch.optim.Optimizer, rank: int | None, world_size: int | None) -> Topology:
    """The job's topology: ``rank``/``world_size`` if given, else torch.distributed's when
    it is initialized; sharded when any parameter is a DTensor."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    world = int(world_size or 1)
    rank = int(rank or 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world_size {world}")
    sharded = any(is_sharded(p) for g in opt.param_groups for p in g["params"])
    return Topology(rank, world, SHARDED if sharded else REPLICATED)


class _LocalState(Mapping[torch.Tensor, dict[str, Any]]):
    """``opt.state`` seen through the local shards: each state's DTensors as their local
    tensors, read at each access (a state created by a step is seen after it)."""

    def __init__(self, opt: torch.optim.Optimizer, by_local: Mapping[torch.Tensor, torch.Tensor]):
        self._opt, self._by_local = opt, by_local

    def __getitem__(self, key: torch.Tensor) -> dict[str, Any]:
        state = self._opt.state[self._by_local[key]]
        return {k: local(v) if torch.is_tensor(v) else v for k, v in state.items()}

    def get(self, key: torch.Tensor, default: Any = None) -> Any:
        p = self._by_local.get(key)
        if p is None or p not in self._opt.state:
            return default
        return self[key]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(k for k, p in self._by_local.items() if p in self._opt.state)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class LocalView:
    """An optimizer as the signal kernels see it on one rank of a sharded job: its groups
    with each parameter's local shard (a view of it, whose ``grad`` is the local shard of
    the parameter's gradient) and its state's local shards. Built at each step's pre-hook
    (the gradients are those of that step); :meth:`release` drops the gradient references
    once the step's signals are computed."""

    def __init__(self, opt: torch.optim.Optimizer, names: Mapping[torch.Tensor, str]) -> None:
        self.param_groups: list[dict[str, Any]] = []
        self.names: dict[torch.Tensor, str] = {}
        by_local: dict[torch.Tensor, torch.Tensor] = {}
        for g in opt.param_groups:
            views = []
            for p in g["params"]:
                lp = local(p.detach())
                view = lp.view(lp.shape)
                if p.grad is not None:
                    view.grad = local(p.grad)
                views.append(view)
                by_local[view] = p
                self.names[view] = names[p]
            self.param_groups.append({**g, "params": views})
        self.state = _LocalState(opt, by_local)
        self._views = list(by_local)

    def release(self) -> None:
        for v in self._views:
            v.grad = None
