"""``GET /v1/events``: the live Server-Sent Events stream of step events (see
:mod:`adamscope.service.api.events` for what travels and how)."""

from __future__ import annotations

from collections import deque
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from adamscope.client.constants import INT64_MAX

from ...errors import problems
from ..access import authorize_name, principal, require
from ..deps import hub, registry, settings
from ..events import Subscription, backlog, event_stream
from ..http.sse import EVENT_STREAM, EventStreamResponse

__all__ = ["router"]

router = APIRouter(tags=["history"])


def _parse_last_id(value: str | None) -> tuple[str, int] | None:
    if value is None or not value.strip():
        return None
    epoch, sep, seq = value.strip().rpartition("-")
    if not sep or not seq.isdigit():
        raise RequestValidationError(
            [
                {
                    "loc": ["header", "Last-Event-ID"],
                    "type": "value_error",
                    "msg": f"{value!r} is not an id this stream sent ('<epoch>-<seq>')",
                }
            ]
        )
    return epoch, int(seq)


@router.get(
    "/events",
    summary="Live step events of every stepper (Server-Sent Events)",
    dependencies=[Depends(require("read"))],
    response_class=EventStreamResponse,
    responses={
        200: {
            "content": {EVENT_STREAM: {"schema": {"type": "string"}}},
            "description": "text/event-stream: events open, step, loss and dropped; "
            "a comment every heartbeat",
        },
        **problems("request_validation_error"),
    },
)
async def events(
    request: Request,
    stepper: Annotated[
        list[str] | None,
        Query(description="only these steppers (default: every stepper the token reaches)"),
    ] = None,
    tensor: Annotated[
        list[str] | None, Query(description="only these tensors' signals in step events")
    ] = None,
    replay: Annotated[
        int,
        Query(
            ge=0,
            le=100_000,
            description="first send the last N retained step events of each stepper",
        ),
    ] = 0,
    heartbeat: Annotated[
        float | None, Query(ge=0.01, le=3600, description="seconds between keep-alive comments")
    ] = None,
    max_events: Annotated[
        int | None,
        Query(ge=1, le=INT64_MAX, description="close the stream after this many step events"),
    ] = None,
    duration: Annotated[
        float | None, Query(ge=0, le=86_400, description="close the stream after this many seconds")
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            max_length=100,
            description="resume after this event (sent by EventSource on reconnect)",
        ),
    ] = None,
) -> Response:
    events_hub = hub(request)
    for name in stepper or []:
        authorize_name(request, name)
    resume = _parse_last_id(last_event_id)
    who = principal(request)
    sub = Subscription(
        steppers=frozenset(stepper) if stepper else None,
        reaches=who.reaches,
        tensors=list(tensor) if tensor else None,
        max_tensors=events_hub.max_tensors,
        queue=deque(maxlen=events_hub.queue_size),
    )
    events_hub.subscribe(sub)  # before the history is read: nothing falls between the two
    try:
        found: list[dict[str, Any]] = []
        if resume is not None or replay:  # up to history_steps events per stepper: off loop
            found = await run_in_threadpool(
                backlog, registry(request), events_hub, sub, resume, replay
            )
    except BaseException:
        events_hub.unsubscribe(sub)
        raise
    every = heartbeat if heartbeat is not None else settings(request).events_heartbeat

    stream = event_stream(
        events_hub,
        sub,
        found,
        resumed=resume is not None,
        heartbeat=every,
        max_events=max_events,
        duration=duration,
    )
    return EventStreamResponse(stream, lambda: events_hub.unsubscribe(sub))
