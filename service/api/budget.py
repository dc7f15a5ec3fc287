"""The machine's memory as a limit: a new stepper must fit what is actually available.

``memory_budget_bytes`` (:mod:`.quota`) caps what all steppers may take by configuration.
Whether it is set or not, creating or importing a stepper is also refused with 507
``memory_budget_exceeded`` (before its tensors are allocated) unless the memory left *now*
on its device holds it:

* RAM for CPU steppers: ``MemAvailable`` from ``/proc/meminfo`` (else ``os.sysconf``),
  lowered to what the process's cgroup (a container's memory limit) leaves;
* GPU memory for CUDA steppers: the free bytes ``torch.cuda.mem_get_info`` reports.

From that, :data:`HEADROOM` is kept free for everything else (request bodies, replies, the
interpreter), and so is what the steppers already on that device will still take: Adam
allocates a parameter's state at its first step, so a stepper that has not stepped holds
only a quarter to a third of what it will. So a 66-byte request for a ``[2147483648]``
tensor is refused in microseconds, saying what it asked for and what is left, instead of
ending in the allocator's failure or taking the machine's memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..engine import Registry, Stepper
from ..errors import ApiError
from .quota import STEP_BYTES

__all__ = ["HEADROOM", "available_bytes", "check_room", "pending_bytes"]

#: Fraction of the memory available now that new steppers may take.
HEADROOM = 0.9
_CGROUP = Path("/sys/fs/cgroup")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_left() -> int | None:
    """Bytes the process's cgroup may still use (v2, else v1), page cache it may reclaim
    included; None without a limit."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(_CGROUP / limit_file), _read_int(_CGROUP / usage_file)
        if limit is None or usage is None or limit >= 1 << 60:  # "max" or v1's "no limit"
            continue
        reclaimable = 0
        try:
            for line in (
                (_CGROUP / Path(limit_file).parent / "memory.stat").read_text().splitlines()
            ):
                key, _, value = line.partition(" ")
                if key in ("inactive_file", "total_inactive_file") and value.isdigit():
                    reclaimable = int(value)
        except OSError:
            pass
        return max(0, limit - usage + reclaimable)
    return None


def _ram_available() -> int | None:
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = None
    cgroup = _cgroup_left()
    known = [v for v in (available, cgroup) if v is not None]
    return min(known) if known else None


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current
    )


def available_bytes(device: torch.device) -> int | None:
    """Memory available now on ``device`` (None where it cannot be told, e.g. ``mps``)."""
    if device.type == "cpu":
        return _ram_available()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def pending_bytes(registry: Registry, device: torch.device) -> int:
    """Bytes the steppers on ``device`` will still allocate: the Adam state of parameters
    that have not stepped (read without locks: a parameter's state appears whole)."""
    total = 0
    for s in registry.list():
        if not _same_device(s.device, device):
            continue
        total += _unstepped_state(s)
    return total


def _unstepped_state(stepper: Stepper) -> int:
    groups = stepper.optimizer.param_groups
    total = 0
    for n, p in zip(stepper.names, stepper.params, strict=True):
        if not stepper.optimizer.state.get(p):
            moments = 3 if groups[stepper.group_of[n]]["amsgrad"] else 2
            total += p.numel() * p.element_size() * moments + STEP_BYTES
    return total


def check_room(registry: Registry, name: str, device: torch.device, new_bytes: int) -> None:
    """507 ``memory_budget_exceeded`` unless a stepper of ``new_bytes`` (its footprint:
    parameters, Adam state, gradient buffer, workspace) fits the memory ``device`` has left,
    see the module docstring."""
    available = available_bytes(device)
    if available is None:
        return
    pending = pending_bytes(registry, device)
    left = max(0, int(available * HEADROOM) - pending)
    if new_bytes > left:
        raise ApiError(
            "memory_budget_exceeded",
            f"stepper {name!r} needs {new_bytes} bytes on {device} (its footprint: "
            f"parameters, Adam state, gradient buffer, step workspace); {left} bytes are "
            f"left for it ({available} available now, "
            f"{pending} still to be taken by steppers that have not stepped, "
            f"{1 - HEADROOM:.0%} kept free)",
            needed=new_bytes,
            left=left,
            available=available,
            device=str(device),
        )
