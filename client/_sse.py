"""Server-Sent Events of ``GET /v1/events``: the request, and a parser of its lines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ._base import event_floats, names_query
from .constants import API_PREFIX
from .errors import ProtocolError

__all__ = ["SSEParser", "events_request"]


def events_request(
    steppers: Sequence[str] | str | None,
    tensors: Sequence[str] | None,
    replay: int,
    last_event_id: str | None,
    heartbeat: float | None,
    max_events: int | None,
    duration: float | None,
) -> tuple[str, list[tuple[str, str]], dict[str, str]]:
    """Path, query and headers of a ``GET /v1/events`` stream."""
    if isinstance(steppers, str):
        steppers = [steppers]
    params = names_query(steppers, "stepper") + names_query(tensors, "tensor")
    for key, value in (
        ("replay", replay or None),
        ("heartbeat", heartbeat),
        ("max_events", max_events),
        ("duration", duration),
    ):
        if value is not None:
            params.append((key, str(value)))
    headers = {"accept": "text/event-stream"}
    if last_event_id is not None:
        headers["last-event-id"] = last_event_id
    return f"{API_PREFIX}/events", params, headers


class SSEParser:
    """Server-Sent Events, line by line (the WHATWG event-stream rules this service uses):
    ``feed(line)`` returns a finished event ``{"event", "id", "data"}`` at a blank line,
    and with ``heartbeats`` a ``{"event": "heartbeat"}`` for a comment line."""

    def __init__(self, heartbeats: bool = False) -> None:
        self.heartbeats = heartbeats
        self.last_id: str | None = None
        self._kind = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> dict[str, Any] | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._kind = "message"
                return None
            text = "\n".join(self._data)
            kind, self._kind, self._data = self._kind, "message", []
            try:
                data = json.loads(text)
            except ValueError as e:
                raise ProtocolError(f"event {kind!r} carries invalid JSON: {e}") from None
            if isinstance(data, dict):
                data = event_floats(data)
            return {"event": kind, "id": self.last_id, "data": data}
        if line.startswith(":"):
            return (
                {"event": "heartbeat", "id": self.last_id, "data": None}
                if self.heartbeats
                else None
            )
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self._kind = value
        elif field == "data":
            self._data.append(value)
        elif field == "id":
            self.last_id = value
        return None
