"""Rendered JSON replies cached per stepper until it changes.

Dashboards poll summaries and statistics far more often than steppers change. A reply is
rendered once per (stepper, what, version key) and then served as bytes: ``Stepper.version``
moves with every mutation, so a cached reply is never stale. The cache lives with the
stepper (a weak mapping), so a deleted stepper takes its entries with it.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Hashable
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.responses import Response

from ...engine import Stepper

__all__ = ["cached_json"]

_entries: weakref.WeakKeyDictionary[Stepper, dict[str, tuple[Hashable, bytes]]] = (
    weakref.WeakKeyDictionary()
)
#: Distinct queries remembered per stepper (e.g. bias correction at several steps).
PER_STEPPER = 32


def cached_json(stepper: Stepper, what: str, key: Hashable,
                render: Callable[[], Any]) -> Response:
    """``render()`` as a JSON response, reused while ``(stepper.version, key)`` holds."""
    version_key = (stepper.version, key)
    slots = _entries.setdefault(stepper, {})
    hit = slots.get(what)
    if hit is not None and hit[0] == version_key:
        body = hit[1]
    else:
        body = json.dumps(jsonable_encoder(render()), separators=(",", ":"),
                          allow_nan=False).encode()
        if len(slots) >= PER_STEPPER and what not in slots:
            slots.pop(next(iter(slots)))
        slots[what] = (version_key, body)
    return Response(body, media_type="application/json")
