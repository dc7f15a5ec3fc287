"""Commands a watched run's trainer applies between two steps (on the training thread).

Each returns an acknowledgement ``{id, op, step, ok, detail}``: ``step`` is the number of
steps taken when it applied (a state read answers with the state as of that step). A
command that fails is acknowledged with ``ok: false`` and changes nothing it had not
validated: it never raises into training.

``options``: ``{"group": i | None, "options": {"lr": ..., "betas": [..], ...}}``;
``state`` and ``snapshot``: upload the state (of ``names``, or all) as safetensors, keys
``"<param>/<key>"`` (the parameter too under ``"<param>/param"`` when asked);
``load``: copy ``tensors`` (same keys; ``param`` into the parameter itself) into the
optimizer's state: a ``restore`` of a snapshot is a load of what the snapshot uploaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ._watch_dist import Topology, is_sharded, local, placement, slice_for

if TYPE_CHECKING:
    from ._watch_sender import Sender

__all__ = ["apply_command", "state_tensors"]

SETTABLE = ("lr", "betas", "weight_decay", "eps")


def apply_command(
    opt: torch.optim.Optimizer,
    names: Mapping[torch.Tensor, str],
    command: Mapping[str, Any],
    step: int,
    sender: Sender,
    topo: Topology | None = None,
) -> dict[str, Any]:
    """Apply ``command`` (see the module docstring); under torch.distributed (``topo``)
    each rank uploads its local shards with their places in the whole (rank 0 alone when
    the state is replicated) and loads its part of the whole tensors it is sent."""
    topo = topo or Topology()
    ack: dict[str, Any] = {"id": command["id"], "op": command.get("op"), "step": step}
    if topo.distributed:
        ack["rank"] = topo.rank
    try:
        op = command.get("op")
        if op == "options":
            _set_options(opt, command.get("group"), command.get("options", {}))
        elif op in ("state", "snapshot"):
            from ._watch_sender import Upload

            if topo.reports_signals:  # a replicated job's rank 0 answers for every rank
                tensors = state_tensors(
                    opt, names, command.get("names"), bool(command.get("with_params"))
                )
                meta = {"rank": str(topo.rank)} if topo.distributed else {}
                if topo.distributed:
                    meta["places"] = json.dumps(places(opt, names, tensors))
                sender.put_upload(Upload(command["id"], step, tensors, meta))
        elif op == "load":
            _load(opt, names, command.get("tensors") or {})
        else:
            raise ValueError(f"unknown command {op!r}")
        ack.update(ok=True, detail="")
    except Exception as e:  # noqa: BLE001 - acknowledged as failed, never raised
        ack.update(ok=False, detail=f"{type(e).__name__}: {e}")
    return ack


def _set_options(opt: torch.optim.Optimizer, group: int | None, options: Mapping[str, Any]) -> None:
    unknown = set(options) - set(SETTABLE)
    if unknown:
        raise ValueError(f"cannot set {sorted(unknown)} on a watched run; settable: {SETTABLE}")
    n = len(opt.param_groups)
    if group is not None and not 0 <= group < n:
        raise ValueError(f"param group {group} does not exist (have {n})")
    for gi, g in enumerate(opt.param_groups):
        if group is not None and gi != group:
            continue
        for k, v in options.items():
            if k == "betas":
                v = tuple(float(b) for b in v)
                if len(v) != 2 or not all(0.0 <= b < 1.0 for b in v):
                    raise ValueError(f"invalid betas {v}")
            elif float(v) < 0.0:
                raise ValueError(f"invalid {k}: {v}")
            if k == "lr" and torch.is_tensor(g["lr"]):
                g["lr"].fill_(float(v))
            elif k != "betas":
                g[k] = float(v)
            else:
                g[k] = v


def state_tensors(
    opt: torch.optim.Optimizer,
    names: Mapping[torch.Tensor, str],
    wanted: list[str] | None,
    with_params: bool = False,
) -> dict[str, torch.Tensor]:
    """Copies of the state (on the CPU), keyed ``"<param>/<key>"``: of a DTensor, its
    local shard (see :func:`places`)."""
    pick = None if wanted is None else set(wanted)
    if pick is not None:
        missing = pick - set(names.values())
        if missing:
            raise KeyError(f"no parameter named {sorted(missing)}")
    out: dict[str, torch.Tensor] = {}
    for p, n in names.items():
        if pick is not None and n not in pick:
            continue
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                out[f"{n}/{k}"] = local(v.detach()).to("cpu", copy=True)
        if with_params:
            out[f"{n}/param"] = local(p.detach()).to("cpu", copy=True)
    return out


def places(
    opt: torch.optim.Optimizer, names: Mapping[torch.Tensor, str], keys: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Where each uploaded local shard sits in its whole tensor: ``{key: {"offset",
    "shape", "global"}}`` for the keys that are DTensor shards (the others are whole)."""
    by_name = {n: p for p, n in names.items()}
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        n, _, k = key.rpartition("/")
        p = by_name[n]
        t = p if k == "param" else opt.state.get(p, {}).get(k)
        where = placement(t) if t is not None else None
        if where is not None:
            out[key] = {**where, "global": list(t.shape)}
    return out


def _load(
    opt: torch.optim.Optimizer, names: Mapping[torch.Tensor, str], tensors: Mapping[str, Any]
) -> None:
    by_name = {n: p for p, n in names.items()}
    staged: list[tuple[torch.Tensor, str, torch.Tensor]] = []
    for key, t in tensors.items():  # validate everything before changing anything
        n, _, k = key.rpartition("/")
        p = by_name.get(n)
        if p is None:
            raise KeyError(f"no parameter named {n!r}")
        if k == "step":
            if t.numel() != 1:
                raise ValueError(f"{key}: a step is one number")
        elif k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "param"):
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{key}: shape {list(t.shape)}, parameter {list(p.shape)}")
        else:
            raise ValueError(f"{key}: unknown state key {k!r}")
        staged.append((p, k, t))
        if is_sharded(p) and k != "step" and k != "param":
            v = opt.state.get(p, {}).get(k)
            if not is_sharded(v):
                raise ValueError(f"{key}: no state to load into yet on a sharded run (step first)")
    with torch.no_grad():
        for p, k, t in staged:
            if k == "param":
                local(p).copy_(slice_for(t.reshape(p.shape), placement(p)))
                continue
            state = opt.state[p]
            if k in state and torch.is_tensor(state[k]):
                target = state[k]
                part = slice_for(t.reshape(target.shape), placement(target))
                local(target).copy_(part)
            else:
                state[k] = t.to(p.device if k != "step" else _step_device(opt, p), copy=True)


def _step_device(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.device:
    """Where PyTorch keeps a fresh state's step: on the parameter's device when fused or
    capturable, else on the CPU."""
    for g in opt.param_groups:
        if any(q is p for q in g["params"]) and (g.get("fused") or g.get("capturable")):
            return p.device
    return torch.device("cpu")
