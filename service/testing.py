"""The service as a separate process, for tests, benchmarks and crash tests.

``adamscope serve`` (the console script's code path: ``python -m adamscope.service.cli``)
on 127.0.0.1 and an ephemeral port, started and waited for until ``/healthz`` answers,
stopped afterwards. Its output goes to a file, which a failure quotes: a pipe nobody reads
would fill and block the server.

    with spawned(data_dir, "--durability", "every_step") as server:
        Client(server.url).list()
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["Spawned", "free_port", "serve_command", "spawned", "wait_healthy"]


def free_port() -> int:
    """A port nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(
    port: int, data_dir: str | Path, *extra: str, log_level: str = "warning"
) -> list[str]:
    """The command line of ``adamscope serve`` on 127.0.0.1:``port`` (``extra`` last)."""
    return [
        sys.executable,
        "-m",
        "adamscope.service.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        log_level,
        *extra,
    ]


def wait_healthy(
    url: str,
    alive: Callable[[], bool],
    timeout: float = 60,
    output: Callable[[], str] | None = None,
    poll: float = 0.05,
) -> None:
    """Return once ``url``'s ``/healthz`` answers 200; raise when ``alive()`` says the
    server died first, or after ``timeout`` seconds (quoting ``output()`` when given)."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            said = f": {output()}" if output is not None else ""
            raise RuntimeError(f"server at {url} exited before becoming healthy{said}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            said = f": {output()}" if output is not None else ""
            raise RuntimeError(f"server at {url} did not become healthy in {timeout:g} s{said}")
        time.sleep(poll)


@dataclass
class Spawned:
    """A running server: where it answers, and its process."""

    url: str
    port: int
    proc: subprocess.Popen[str]


@contextlib.contextmanager
def spawned(
    data_dir: str | Path,
    *extra: str,
    timeout: float = 60,
    stop_timeout: float = 15,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    command: Sequence[str] | None = None,
    port: int | None = None,
) -> Iterator[Spawned]:
    """``adamscope serve`` with ``extra`` arguments (or ``command``, a whole command line
    whose ``{port}`` is filled in) serving ``data_dir`` on ``port`` (a free one if None:
    give the same one to restart a server where its clients expect it); stopped with
    SIGTERM after, killed when it takes longer than ``stop_timeout`` seconds."""
    port = port or free_port()
    cmd = (
        [c.format(port=port) for c in command]
        if command is not None
        else serve_command(port, data_dir, *extra)
    )
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

        def output() -> str:
            log.flush()
            log.seek(0)
            return log.read()[-4000:]

        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, lambda: proc.poll() is None, timeout, output)
            yield Spawned(url, port, proc)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
