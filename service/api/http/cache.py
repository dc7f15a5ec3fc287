"""Rendered JSON replies of one stepper, kept until the stepper changes.

Dashboards poll summaries, statistics and signals far more often than steppers change. A
reply is rendered once per query and then served as bytes while its validity token holds
(``Stepper.version``, moved by every mutation, and whatever else the reply depends on), so
a cached reply is never stale. One cache per stepper, kept by the app's serving state
(:mod:`..serving`), so a deleted stepper takes its entries with it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

__all__ = ["ReplyCache"]


class ReplyCache:
    """The last rendered body of each query, at most ``size`` queries (the least recently
    used go first)."""

    def __init__(self, size: int = 48) -> None:
        self.size = size
        self._bodies: OrderedDict[Hashable, tuple[object, bytes]] = OrderedDict()

    def get(self, query: Hashable, token: object) -> bytes | None:
        """The body of ``query`` if it was rendered under ``token`` (the same object, or
        an equal one)."""
        found = self._bodies.get(query)
        if found is None or not (found[0] is token or found[0] == token):
            return None
        self._bodies.move_to_end(query)
        return found[1]

    def put(self, query: Hashable, token: object, body: bytes) -> None:
        self._bodies[query] = (token, body)
        self._bodies.move_to_end(query)
        while len(self._bodies) > self.size:
            self._bodies.popitem(last=False)

    def body(self, query: Hashable, token: object, render: Callable[[], bytes]) -> bytes:
        """The body cached for ``query`` under ``token``, else ``render()`` (cached)."""
        found = self.get(query, token)
        if found is None:
            found = render()
            self.put(query, token, found)
        return found
