"""Killable real servers for the durability tests.

:class:`ForkServer` starts ``forkserver.py`` once (it imports the service, ~1.5 s) and then
forks a fresh, complete server process on demand in a fraction of that, so a test can kill
one with SIGKILL and start the next many times within its time budget. :func:`killable_cli`
runs the real ``python -m adamscope.service.cli serve`` and hands back its Popen for a SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from adamscope.service.testing import serve_command, wait_healthy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Forked:
    """One forked server process."""

    pid: int
    url: str

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def _gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"server process {self.pid} did not exit")
            time.sleep(0.005)

    def kill(self) -> None:
        """SIGKILL: no handler, no flush, no goodbye."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self._gone(10)

    def terminate(self) -> None:
        """SIGTERM: uvicorn's graceful shutdown (the app's lifespan exit runs)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        self._gone(30)


class ForkServer:
    """The fork server process; :meth:`spawn` returns a healthy server on a fresh port."""

    def __init__(self, log_path: Path) -> None:
        self._log: TextIO = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.log_path = log_path
        self._children: list[Forked] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "forkserver.py")],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        ready = self._answer()
        assert ready.get("ready") is True, ready

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died: {self.log_path.read_text()}")
        return json.loads(line)  # type: ignore[no-any-return]

    def spawn(self, data_dir: Path, **settings: Any) -> Forked:
        assert self.proc.stdin is not None
        self.proc.stdin.write(
            json.dumps({"data_dir": str(data_dir), "args": {"device": "cpu", **settings}}) + "\n"
        )
        self.proc.stdin.flush()
        answer = self._answer()
        child = Forked(answer["pid"], f"http://127.0.0.1:{answer['port']}")
        self._children.append(child)
        try:
            wait_healthy(child.url, child.alive, timeout=30, poll=0.02)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self.log_path.read_text()}") from None
        return child

    def close(self) -> None:
        for child in self._children:
            child.kill()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@contextlib.contextmanager
def killable_cli(data_dir: Path, port: int, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """``adamscope serve`` (the console script's code path) as a Popen the test may kill."""
    cmd = serve_command(port, data_dir, "--device", "cpu", *extra)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", lambda: proc.poll() is None, timeout=60)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
