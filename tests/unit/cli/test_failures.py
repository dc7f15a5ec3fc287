"""The one line the command line prints for each way a request can get no answer (the
connection refused case is also run for real, in tests/e2e/test_cli_friendly.py)."""

from __future__ import annotations

import errno
import socket

import httpx
import pytest

from adamscope.client.errors import TransportError
from adamscope.service.cli.failures import unreachable

URL = "http://gpu-box:8470"


def failed(cause: BaseException) -> TransportError:
    """A TransportError as the client raises it: from httpx's, from the socket's."""
    outer = httpx.ConnectError(str(cause))
    outer.__cause__ = cause
    error = TransportError(f"GET /v1/steppers: {outer!r}")
    error.__cause__ = outer
    return error


def timed_out(kind: type[httpx.TimeoutException]) -> TransportError:
    error = TransportError("GET /v1/steppers: timed out")
    error.__cause__ = kind("timed out")
    return error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            failed(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")),
            f"adamscope: cannot reach the service at {URL} (connection refused) — is it "
            'running? Start it with "adamscope serve", or set --url/ADAMSCOPE_URL',
        ),
        (
            failed(socket.gaierror(socket.EAI_NONAME, "Name or service not known")),
            f"adamscope: cannot reach the service at {URL} (host 'gpu-box' not found) — "
            "check the host name, or set --url/ADAMSCOPE_URL",
        ),
        (
            failed(OSError(errno.EHOSTUNREACH, "No route to host")),
            f"adamscope: cannot reach the service at {URL} (no route to gpu-box) — "
            "check the network, or set --url/ADAMSCOPE_URL",
        ),
        (
            timed_out(httpx.ConnectTimeout),
            f"adamscope: cannot reach the service at {URL} (connection timed out) — is the "
            "address right, and reachable from here? Check --url/ADAMSCOPE_URL",
        ),
        (
            timed_out(httpx.ReadTimeout),
            f"adamscope: the service at {URL} did not answer in time (ReadTimeout) — "
            "it may be busy; try again",
        ),
    ],
    ids=["refused", "dns", "unreachable", "connect-timeout", "read-timeout"],
)
def test_each_failure_is_one_line_saying_what_to_do(error: TransportError, expected: str) -> None:
    assert unreachable(error, URL) == expected


def test_a_connection_broken_mid_answer_says_so() -> None:
    error = TransportError("GET /v1/events: RemoteProtocolError(...)")
    error.__cause__ = httpx.RemoteProtocolError("peer closed connection without response")
    line = unreachable(error, URL)
    assert line == (
        f"adamscope: the connection to the service at {URL} broke (peer closed connection "
        "without response) — did it stop or restart?"
    )
    assert "\n" not in line
