"""What the command line says when a request gets no answer, and how it ends when its
reader goes away.

A request that never reached the service (a :class:`~adamscope.client.errors.TransportError`)
is one line on stderr naming the URL, what went wrong in words (connection refused, a host
name that does not resolve, a timeout) and what to try, instead of the exception's repr::

    adamscope: cannot reach the service at http://127.0.0.1:8470 (connection refused) —
    is it running? Start it with "adamscope serve", or set --url/ADAMSCOPE_URL

Output piped into a reader that stops early (``adamscope history NAME | head``) ends
quietly with status 141, as a program killed by SIGPIPE reports in a shell
(:func:`end_on_broken_pipe`).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from urllib.parse import urlsplit

import httpx

from adamscope.client.errors import TransportError

__all__ = ["BROKEN_PIPE_STATUS", "end_on_broken_pipe", "unreachable"]

#: 128 + SIGPIPE: what a shell reports for a program that stopped because its reader did.
BROKEN_PIPE_STATUS = 141
SET_URL = "set --url/ADAMSCOPE_URL"


def _causes(error: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in found:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def unreachable(error: TransportError, url: str) -> str:
    """The one line to print for a request to ``url`` that got no HTTP answer."""
    causes = _causes(error)
    host = urlsplit(url).hostname or url
    timeout = next((c for c in causes if isinstance(c, httpx.TimeoutException)), None)
    if isinstance(timeout, httpx.ConnectTimeout):
        return (
            f"adamscope: cannot reach the service at {url} (connection timed out) — "
            f"is the address right, and reachable from here? Check --url/ADAMSCOPE_URL"
        )
    if timeout is not None:
        return (
            f"adamscope: the service at {url} did not answer in time "
            f"({type(timeout).__name__}) — it may be busy; try again"
        )
    if any(isinstance(c, socket.gaierror) for c in causes):
        return (
            f"adamscope: cannot reach the service at {url} (host {host!r} not found) — "
            f"check the host name, or {SET_URL}"
        )
    codes = {getattr(c, "errno", None) for c in causes}
    if errno.ECONNREFUSED in codes:
        return (
            f"adamscope: cannot reach the service at {url} (connection refused) — "
            f'is it running? Start it with "adamscope serve", or {SET_URL}'
        )
    if codes & {errno.ENETUNREACH, errno.EHOSTUNREACH}:
        return (
            f"adamscope: cannot reach the service at {url} (no route to {host}) — "
            f"check the network, or {SET_URL}"
        )
    if any(isinstance(c, httpx.ConnectError) for c in causes):
        return f"adamscope: cannot reach the service at {url} ({causes[-1]}) — {SET_URL}"
    return (
        f"adamscope: the connection to the service at {url} broke ({causes[-1]}) — "
        "did it stop or restart?"
    )


def end_on_broken_pipe() -> int:
    """After a ``BrokenPipeError`` on stdout: the exit status, with stdout pointed at
    /dev/null so that Python's final flush at exit cannot fail again (the pattern of the
    Python documentation, "Note on SIGPIPE" in the signal module)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return BROKEN_PIPE_STATUS
