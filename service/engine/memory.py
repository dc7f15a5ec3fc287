"""Device memory for steppers: out-of-memory errors, the step's working set, releasing caches.

A step must be atomic, and a CUDA out-of-memory error inside PyTorch's ``step()`` can come
after some state was updated (``_foreach_sqrt``'s temporaries are allocated after the
moments). So before a step of a new kind (the first, one that creates state, one with other
parameters or options) touches anything, the stepper asks the allocator for the memory it
will allocate (:func:`reserve`: the state it creates plus the workspace of
:mod:`.footprint`) and frees it at once; the caching allocator keeps the block, which the
step's own allocations then reuse. Failing there, the step is refused with nothing changed.
Later steps of the same kind find their temporaries' blocks cached by the one before. An
allocation can still fail inside the update when another stepper or request took that
cached memory in between; the stepper then says so (``partial``) rather than pretend.

A checkpoint of a GPU stepper reads every tensor back to the host; one ``.cpu()`` per tensor
is one synchronous copy each, all under the stepper's lock. :func:`stage_on_host` queues
every copy into one page-locked buffer and waits once.

PyTorch's allocators keep freed memory cached for reuse in the process: device blocks (shown
as used by ``nvidia-smi`` and ``torch.cuda.mem_get_info``) and page-locked host blocks.
:func:`release_cached` hands both back once a stepper is deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

__all__ = ["OOM_ERRORS", "is_out_of_memory", "release_cached", "reserve", "stage_on_host"]

#: Alignment of each tensor in a staging buffer (any dtype's view needs its itemsize).
_ALIGN = 16

log = logging.getLogger("adamscope")

#: What PyTorch raises when an allocation fails (``torch.OutOfMemoryError`` since 2.5 is the
#: same class as ``torch.cuda.OutOfMemoryError``).
OOM_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: PyTorch's OutOfMemoryError, or the
    RuntimeError a failed page-locked (pinned) host allocation or kernel launch raises
    ("CUDA error: out of memory")."""
    if isinstance(error, OOM_ERRORS):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error)


def reserve(device: torch.device, nbytes: int) -> None:
    """Allocate ``nbytes`` on ``device`` and free them again (raises as the allocation
    would): a step's working set is there now, and cached for the step to reuse."""
    if nbytes <= 0 or device.type == "cpu":
        return
    block = torch.empty(nbytes, dtype=torch.uint8, device=device)
    del block


def release_cached(device: torch.device) -> None:
    """Return the cached blocks of PyTorch's allocators to the driver and the operating
    system: device memory on ``device``'s kind, and page-locked host memory."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    try:
        torch.cuda.empty_cache()
        empty_host = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
        if empty_host is None:
            empty_host = getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:
            empty_host()
    except RuntimeError:  # a broken context: nothing left to release
        log.warning("could not release cached CUDA memory", exc_info=True)


def stage_on_host(
    tensors: Mapping[str, torch.Tensor],
    moved: Callable[[torch.Tensor], bool] = lambda t: t.device.type != "cpu",
    pin: bool = True,
    wait: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """``tensors`` with each one ``moved`` says is elsewhere (default: not on the CPU)
    replaced by a host copy: every copy queued into one buffer (page-locked with ``pin``,
    so the copies are asynchronous), then one ``wait`` (default: a synchronize of each
    device involved). The copies are views of that buffer, valid as long as they are held.
    Falls back to one synchronous copy per tensor when the buffer cannot be allocated."""
    remote = [(k, t) for k, t in tensors.items() if moved(t)]
    if not remote:
        return dict(tensors)
    offsets, total = [], 0
    for _, t in remote:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    try:
        flat = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        log.warning("no page-locked memory for a host copy: copying tensor by tensor")
        return {k: t.detach().cpu() if moved(t) else t for k, t in tensors.items()}
    out = dict(tensors)
    for (k, t), at in zip(remote, offsets, strict=True):
        n = t.numel() * t.element_size()
        dst = flat[at : at + n].view(t.dtype).view(t.shape)
        dst.copy_(t.detach(), non_blocking=pin)
        out[k] = dst
    if wait is not None:
        wait()
    else:
        for device in {t.device for _, t in remote}:
            torch.cuda.synchronize(device)
    return out
