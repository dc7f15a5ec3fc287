"""What the app keeps per stepper to serve it, and where engine work runs.

One :class:`ServingState` per app (``app.state.serving``, made by the app factory and
started and closed by its lifespan) holds, for each hosted stepper, a
:class:`StepperServing`: its write gate, the event a waiting contribution sleeps on, the
layout of its last step body, the largest header a body for it may have, and its cached
JSON replies. The entry goes with the stepper (a weak mapping: a deleted stepper takes it
with it, and :meth:`ServingState.forget` drops its page-locked buffers at once).

Engine work runs where it runs best (:meth:`ServingState.off_loop`): inline when tiny,
CPU work on the one compute thread that runs PyTorch on every core, GPU work in the
thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from starlette.concurrency import run_in_threadpool

from ..engine import Stepper
from .http.cache import ReplyCache
from .http.ingest import WireLayout, header_limit

__all__ = ["INLINE_NUMEL", "ComputeThread", "Hold", "ServingState", "StepperServing"]

T = TypeVar("T")

#: Steppers at most this large step on the event loop itself: their update takes tens of
#: microseconds, less than the hand-off to a worker thread and back.
INLINE_NUMEL = 1 << 16


@functools.cache
def _process_threads() -> int:
    """PyTorch's intra-op thread count before this process changed it (its default: the
    physical cores, or OMP_NUM_THREADS). A fact of the process, read once: after the first
    app set other threads to one, ``torch.get_num_threads()`` there says 1."""
    return torch.get_num_threads()


class ComputeThread:
    """The one thread that runs PyTorch on every core, for CPU steppers too big to step
    inline; every other thread, the event loop included, runs PyTorch on one thread.

    Measured on the 2-core VM: once two threads have run parallel PyTorch operations, two
    OpenMP pools exist, OpenMP stops spinning between parallel regions (more pool threads
    than cores) and every region pays a wake-up: a fused Adam step of 10M parameters in 129
    tensors takes 17 to 19 ms instead of 8. On the event loop, a parallel region in a tiny
    inline step costs more than the step where the client shares the cores (a 10K-parameter
    step: 2.9 to 5.4 ms, against 2.1 ms on one thread). PyTorch keeps the count per thread,
    and a thread that has not run an operation yet takes the value last set anywhere.
    """

    def __init__(self) -> None:
        self.executor: ThreadPoolExecutor | None = None
        #: Its intra-op threads: PyTorch's default count in this process.
        self.threads = 0

    def start(self) -> None:
        """Called on the event loop at startup."""
        if self.executor is None:
            n = self.threads = _process_threads()

            def keep_every_core() -> None:
                torch.get_num_threads()  # this thread's count is now its own ...
                torch.set_num_threads(n)  # ... and stays n when the default changes below

            self.executor = ThreadPoolExecutor(1, "adamscope-torch", initializer=keep_every_core)
            self.executor.submit(lambda: None).result()
        torch.get_num_threads()
        torch.set_num_threads(1)  # this thread, and every thread that starts from now on

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None


@dataclass(eq=False)
class StepperServing:
    """What the app keeps to serve one stepper (see the module docstring)."""

    #: Held by every request that mutates the stepper, from the first byte of its body
    #: until its reply has left, so a reply streamed from parameter memory never sees the
    #: next mutation. Reads do not take it (they copy under the engine lock).
    gate: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Set when the next step is applied (accumulate mode waits on it).
    applied: asyncio.Event | None = None
    #: The last step body's layout: the next step with the same header is read straight
    #: into its buffer.
    layout: WireLayout | None = None
    #: The largest safetensors header a body for the stepper can need.
    header_limit: int = 0
    replies: ReplyCache = field(default_factory=ReplyCache)


class ServingState:
    """The per-stepper serving state and the compute thread of one app."""

    def __init__(self) -> None:
        self.compute = ComputeThread()
        self._steppers: weakref.WeakKeyDictionary[Stepper, StepperServing] = (
            weakref.WeakKeyDictionary()
        )

    def of(self, stepper: Stepper) -> StepperServing:
        found = self._steppers.get(stepper)
        if found is None:
            found = self._steppers[stepper] = StepperServing(header_limit=header_limit(stepper))
        return found

    def forget(self, stepper: Stepper) -> None:
        """Drop what the app keeps for a deleted stepper (its body buffer is page-locked
        on a GPU stepper)."""
        self._steppers.pop(stepper, None)

    async def off_loop(self, stepper: Stepper, work: Callable[[], T]) -> T:
        """Run engine work for ``stepper`` where it runs best: inline when it is tiny and
        on the CPU; larger CPU work on the compute thread (all cores, one at a time); GPU
        work in the thread pool (it launches kernels, the GPU computes). Heavy or GPU work
        never blocks the event loop."""
        executor = self.compute.executor
        if stepper.device.type == "cpu":
            if stepper.numel <= INLINE_NUMEL:
                return work()
            if executor is not None:
                context = contextvars.copy_context()
                return await asyncio.get_running_loop().run_in_executor(
                    executor, functools.partial(context.run, work)
                )
        return await run_in_threadpool(work)

    async def settled(self, stepper: Stepper) -> Stepper:
        """``stepper`` once its last step's signals and history are recorded: every read
        of them (signals, history, alerts, summaries, metrics) waits for this. The step
        route records them after its reply has left; a read that arrives meanwhile waits
        where that work runs, never blocking the event loop for it."""
        if stepper.unsettled:
            await self.off_loop(stepper, stepper.settle)
        return stepper

    def hold(self, stepper: Stepper) -> Hold:
        """The stepper's write gate, to be held by one request (``async with``)."""
        return Hold(self, stepper)

    def step_applied(self, stepper: Stepper) -> None:
        """Wake whoever waits for the step just applied; later waiters get a fresh event."""
        entry = self.of(stepper)
        event, entry.applied = entry.applied, None
        if event is not None:
            event.set()

    def next_step(self, stepper: Stepper) -> Awaitable[bool]:
        """Resolves once the stepper's next step is applied."""
        entry = self.of(stepper)
        if entry.applied is None:
            entry.applied = asyncio.Event()
        return entry.applied.wait()


class Hold:
    """One request's hold on a stepper's write gate: taken on ``async with``, released
    exactly once, when the block ends or, if the reply took it over
    (:meth:`hand_to_reply`), once the reply's bytes have left. Releasing settles the
    stepper first: a step's deferred observers (signals, history) run after its reply has
    left and before anyone can write the gradient buffers they read."""

    def __init__(self, serving: ServingState, stepper: Stepper) -> None:
        self.serving = serving
        self.stepper = stepper
        self._lock = serving.of(stepper).gate
        self._held = False
        self._handed = False

    async def __aenter__(self) -> Hold:
        await self._lock.acquire()
        self._held = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._handed:
            await self.release()

    async def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            await self.serving.off_loop(self.stepper, self.stepper.settle)
        except BaseException:
            self.stepper.settle()  # cancelled: wait for a settle still running in a worker
            raise
        finally:
            self._lock.release()

    def hand_to_reply(self) -> Callable[[], Awaitable[None]]:
        """The release, for the reply to run once its bytes have left."""
        self._handed = True
        return self.release

    async def pause_until(self, event: Awaitable[bool], timeout: float) -> None:
        """Open the gate while waiting (at most ``timeout`` seconds) for ``event``, then
        take it again: other workers' contributions go through meanwhile."""
        await self.release()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event, timeout)
        await self._lock.acquire()
        self._held = True
