"""What the routes call about durability: write after a mutation, summaries, the flusher.

Every route that changes a stepper calls :func:`persist_after` once the change is applied
and before it replies, so under the ``every_step`` policy an acknowledged change is on disk
(the write runs in the threadpool, never on the event loop)::

    outcome = await run_in_threadpool(stepper.step, grads, groups)
    await persist_after(request, stepper, "step")
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..engine import Stepper
from ..inspect.recorder import summary_fields
from ..persistence import Persistence
from .deps import persistence

__all__ = ["FLUSH_TICK", "flusher", "persist_after", "summary"]

log = logging.getLogger("adamscope.persistence")

#: How often the background flusher looks for ``interval`` steppers that are due (seconds).
FLUSH_TICK = 0.5


async def persist_after(request: Request, stepper: Stepper, kind: str = "change") -> None:
    """Write the stepper's checkpoint if its durability policy wants one after a mutation of
    ``kind`` (``"step"`` for steps, ``"change"`` for anything else)."""
    p = persistence(request)
    if p.due(stepper, kind):
        await run_in_threadpool(p.persist, stepper)


def summary(request: Request, stepper: Stepper) -> dict[str, Any]:
    """The stepper's summary with its durability fields (and its alerts)."""
    return {
        **stepper.summary(),
        **persistence(request).describe(stepper),
        **summary_fields(stepper),
    }


async def flusher(p: Persistence, tick: float = FLUSH_TICK) -> None:
    """Background task: write ``interval`` steppers whose changes have waited long enough."""
    while True:
        await asyncio.sleep(tick)
        try:
            await run_in_threadpool(p.flush_due)
        except Exception:  # noqa: BLE001 - the flusher must outlive one bad write
            log.exception("background flush failed")
