"""One step request, as one object: ``POST /v1/steppers/{name}/step``.

A :class:`Step` holds the stepper's write gate (:class:`~.serving.Hold`) from the first
byte of its body until its reply has left: it reads the gradients straight into the
stepper's buffers (:mod:`.http.ingest`), applies the step (or records a data-parallel
worker's contribution) where engine work runs, writes what the durability policy asks,
and replies, streaming the updated parameters from their memory when asked for them. The
reply then opens the gate, once the step's deferred signals and history are recorded.
"""

from __future__ import annotations

import json
from typing import Literal

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from adamscope.client import codec
from adamscope.client.constants import (
    INT64_MAX,
    META_GROUPS,
    META_REPLAYED,
    META_SKIPPED,
    META_STEPPED,
)
from adamscope.client.protocol import StepResult

from ..engine import StepOutcome, Stepper
from ..engine.accumulate import MAX_CONTRIBUTORS
from ..engine.errors import InvalidSpec, StepConflict
from . import deps
from .durability import persist_after
from .http.body import meta_json
from .http.ingest import WireLayout, ingest_layout
from .http.reply import TensorStreamResponse
from .options import group_updates_from_json
from .serving import Hold

__all__ = ["Step", "StepQuery", "result"]

WireDtype = Literal["bfloat16", "float16"]


class StepQuery(BaseModel):
    """A step's query parameters (validated in one pass: a step is the hot path)."""

    return_params: bool = Field(False, description="answer with the updated parameters")
    only_stepped: bool = Field(
        False, description="with return_params: only the parameters this step changed"
    )
    wire_dtype: WireDtype | None = Field(
        None,
        description="LOSSY: gradients may arrive, and parameters are returned, in this "
        "16-bit dtype (half the bytes); the stepper itself keeps full precision",
    )
    expected_step: int | None = Field(
        None,
        ge=0,
        le=INT64_MAX,
        description="the step the stepper must be at, else 409 step_conflict",
    )
    contributors: int | None = Field(
        None,
        ge=1,
        le=MAX_CONTRIBUTORS,
        description="accumulate mode: apply the step once this many workers contributed, "
        "with the mean of their gradients",
    )
    worker: int | None = Field(
        None, ge=0, le=INT64_MAX, description="accumulate mode: this worker's id"
    )
    wait: float = Field(
        0.0,
        ge=0,
        le=600,
        description="accumulate mode: seconds to wait for "
        "the step to be applied before "
        "answering 202 (pending)",
    )


def result(name: str, outcome: StepOutcome) -> StepResult:
    return StepResult(
        stepper=name,
        step=outcome.step,
        stepped=outcome.stepped,
        skipped=outcome.skipped,
        replayed=outcome.replayed,
    )


class Step:
    """One step request for ``stepper`` (see the module docstring)."""

    def __init__(
        self, request: Request, stepper: Stepper, query: StepQuery, key: str | None
    ) -> None:
        if (query.contributors is None) != (query.worker is None):
            raise InvalidSpec("accumulate mode needs both 'contributors' and 'worker'")
        self.request = request
        self.stepper = stepper
        self.query = query
        self.key = key
        self.serving = deps.serving(request)
        self.lossy = codec.dtype_from_name(query.wire_dtype) if query.wire_dtype else None

    async def run(self) -> Response:
        stepper = self.stepper
        async with self.serving.hold(stepper) as hold:
            received, groups = await self._receive()
            target = stepper.step_count + 1
            outcome = await self.serving.off_loop(stepper, lambda: self._apply(received, groups))
            await persist_after(self.request, stepper, "step")
            if outcome is not None and not outcome.replayed:
                self.serving.step_applied(stepper)
            if outcome is None and self.query.wait > 0:
                outcome = await self._wait(hold, target)
            if outcome is None:
                return self._pending()
            return await self._reply(outcome, hold)

    async def _receive(self) -> tuple[dict[str, torch.Tensor], list[dict[str, object]] | None]:
        """The gradients, read into the stepper's buffers (or the last body's layout, when
        this body has the same header), and the option changes its metadata carries."""
        stepper, lossy = self.stepper, self.lossy
        entry = self.serving.of(stepper)
        got = await ingest_layout(
            self.request,
            entry.layout,
            lossy,
            lambda e: stepper.check_gradient(e.name, e.shape, e.dtype, lossy),
            lambda e: stepper.grad_buffer(e.name, e.dtype),
            pin=stepper.device.type == "cuda",
            header_bytes=entry.header_limit,
        )
        if isinstance(got, WireLayout):
            entry.layout = got
            received, metadata = got.tensors, dict(got.metadata)
        else:
            received, metadata = got
        return received, group_updates_from_json(meta_json(metadata, META_GROUPS))

    def _apply(
        self, received: dict[str, torch.Tensor], groups: list[dict[str, object]] | None
    ) -> StepOutcome | None:
        """In the engine's thread: the step, or this worker's contribution (None while
        the step waits for the others)."""
        stepper, q = self.stepper, self.query
        grads = received
        if self.lossy is not None:  # widened into the parameter-dtype buffers
            grads = {
                n: g if g.dtype == (buf := stepper.grad_buffer(n)).dtype else buf.copy_(g)
                for n, g in received.items()
            }
        if q.contributors is not None and q.worker is not None:
            if groups is not None:
                raise InvalidSpec("contributions cannot change options; use PATCH")
            return stepper.contribute(q.worker, q.contributors, grads, self.key, q.expected_step)
        return stepper.step(grads, groups, key=self.key, expected_step=q.expected_step)

    async def _wait(self, hold: Hold, target: int) -> StepOutcome | None:
        """A recorded contribution waits (gate open) for the other workers' until the
        step is applied or ``wait`` seconds pass (None: still pending)."""
        stepper = self.stepper
        await hold.pause_until(self.serving.next_step(stepper), self.query.wait)
        if stepper.step_count < target:
            return None
        recorded = stepper.recorded(self.key) if self.key else None
        return recorded or StepOutcome(target, [], [])

    def _pending(self) -> JSONResponse:
        stepper = self.stepper
        pending = StepResult(
            stepper=stepper.name,
            step=stepper.step_count,
            stepped=[],
            skipped=[],
            applied=False,
            pending=stepper.pending_contributions(),
        )
        return JSONResponse(pending.model_dump(), status_code=202)

    async def _reply(self, outcome: StepOutcome, hold: Hold) -> Response:
        """The result, or the updated parameters streamed from their memory; either way
        the reply opens the gate once it has left."""
        stepper, q = self.stepper, self.query
        if not q.return_params:
            return JSONResponse(
                result(stepper.name, outcome).model_dump(),
                background=BackgroundTask(hold.hand_to_reply()),
            )
        if outcome.step != stepper.step_count:
            raise StepConflict(
                f"step {outcome.step} was applied, but stepper {stepper.name!r} has moved on "
                f"to step {stepper.step_count}: the parameters of step {outcome.step} are gone",
                current_step=stepper.step_count,
            )
        names = outcome.stepped if q.only_stepped else stepper.names
        params = await self.serving.off_loop(stepper, lambda: self._host_params(names))
        return TensorStreamResponse(
            params,
            stepper.name,
            outcome.step,
            {
                META_STEPPED: json.dumps(outcome.stepped),
                META_SKIPPED: json.dumps(outcome.skipped),
                META_REPLAYED: json.dumps(outcome.replayed),
            },
            release=hold.hand_to_reply(),
        )

    def _host_params(self, names: list[str]) -> dict[str, torch.Tensor]:
        params = self.stepper.host_params(names)
        lossy = self.lossy
        if lossy is not None:
            params = {
                n: t.to(lossy) if t.is_floating_point() and t.dtype != lossy else t
                for n, t in params.items()
            }
        return params
