"""The ``adamscope`` console script as a newcomer meets it, in subprocesses: ``--version``,
help texts in plain text, one clear line when no service answers, a quiet end when its
output is piped into ``head``, and ``watch`` printing through a pipe as steps arrive."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import ROOT, LiveServer

from adamscope.client import Client
from adamscope.service import cli

pytestmark = pytest.mark.e2e

#: The console script pip installed next to this interpreter.
SCRIPT = str(Path(sys.executable).with_name("adamscope"))
#: reStructuredText and Markdown that a terminal would print verbatim.
MARKUP = re.compile(r"``|`[^`\s][^`]*`|:(?:func|mod|class|meth|attr|data|ref):|\*\*")


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: Python's output buffered as usual (a CI runner
    may set PYTHONUNBUFFERED, which would hide a missing flush)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return {**env, **extra}


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=user_env(**(env or {})),
    )


def test_version_is_the_installed_distribution() -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"adamscope {importlib.metadata.version('adamscope')}\n"


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    found = {"adamscope": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update({f"adamscope {n}": p for n, p in action.choices.items()})
    return found


def test_no_help_text_has_markup() -> None:
    parsers = all_parsers()
    assert len(parsers) >= 20 and "adamscope serve" in parsers
    for name, parser in parsers.items():
        text = parser.format_help()
        assert not MARKUP.search(text), f"{name} --help shows markup:\n{text}"
    top = run("--help")  # and as the console script prints it
    assert top.returncode == 0 and "serve" in top.stdout and not MARKUP.search(top.stdout)


def test_every_command_has_a_description() -> None:
    for name, parser in all_parsers().items():
        assert parser.description and len(parser.description) > 10, name
    serve = all_parsers()["adamscope serve"].description or ""
    assert "service" in serve and "/docs" in serve and "ADAMSCOPE_" in serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_service_is_one_line_with_what_to_do() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv, env in ((["ls", "--url", url], {}), (["show", "net"], {"ADAMSCOPE_URL": url})):
        result = run(*argv, env=env)
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr == (
            f"adamscope: cannot reach the service at {url} (connection refused) — is it "
            'running? Start it with "adamscope serve", or set --url/ADAMSCOPE_URL\n'
        )


def test_output_piped_into_head_ends_quietly(live_server: LiveServer) -> None:
    name = f"cli-wide-{uuid.uuid4().hex[:8]}"
    with Client(live_server.url) as c:  # `show` prints ~150 KB: more than a pipe holds
        c.create(name, {f"layer{i}.weight": torch.zeros(2) for i in range(3000)})
    pipeline = (
        f'"{SCRIPT}" show {name} --url {live_server.url} | head -n 1; exit ${{PIPESTATUS[0]}}'
    )
    result = subprocess.run(
        ["bash", "-c", pipeline],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=user_env(),
    )
    assert result.stdout.startswith(f"{name}: adam on cpu, step 0, 6,000 parameters")
    assert result.stdout.count("\n") == 1
    assert result.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored"
    assert result.returncode == 141  # as for a program SIGPIPE stopped


def lines_of(process: subprocess.Popen[bytes]) -> queue.Queue[bytes]:
    """The lines ``process`` prints, as they come (read by a thread)."""
    lines: queue.Queue[bytes] = queue.Queue()
    stdout = process.stdout
    assert stdout is not None
    threading.Thread(target=lambda: [lines.put(x) for x in stdout], daemon=True).start()
    return lines


def next_header(lines: queue.Queue[bytes], name: str, timeout: float = 30) -> bytes:
    """The next frame's first line (stepper, step, time)."""
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        if line.startswith(f"{name}  step ".encode()):
            return line


def test_watch_prints_through_a_pipe_as_steps_arrive(live_server: LiveServer) -> None:
    """Each frame reaches the pipe when it is drawn, not when a buffer fills: the stepper
    steps once before the watch starts (its frame comes from the replay) and once after."""
    name = f"cli-piped-{uuid.uuid4().hex[:8]}"
    with Client(live_server.url) as c:
        c.create(name, {"w": torch.zeros(3)}, durability="manual")
        c.step(name, {"w": torch.ones(3)})
        watch = subprocess.Popen(
            [SCRIPT, "watch", name, "--url", live_server.url, "--timeout", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=user_env(),
        )
        try:
            lines = lines_of(watch)
            assert next_header(lines, name).startswith(f"{name}  step 1  ".encode())
            c.step(name, {"w": torch.ones(3)})
            assert next_header(lines, name).startswith(f"{name}  step 2  ".encode())
        finally:
            watch.terminate()
            _, err = watch.communicate(timeout=30)
    assert b"Traceback" not in err
