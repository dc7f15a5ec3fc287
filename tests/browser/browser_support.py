"""Browser tier helpers: Playwright driving the system's Chromium against a real uvicorn.

The browser is the distribution's ``chromium`` package (``.ci/run`` installs it with apt
where it is missing), never a Playwright download. Where no browser can be launched the
tests skip, saying why; anywhere else a failure to drive it is a failure.

Every page records its console errors and uncaught exceptions in a :class:`Watched`, whose
test then asserts there were none (or only those it provoked and named). Screenshots go
to ``test-artifacts/`` (ignored by git), the CI's artifacts.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
#: Debian's and Ubuntu's paths of the distribution's Chromium ($ADAMSCOPE_CHROMIUM first).
CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    env = os.environ.get("ADAMSCOPE_CHROMIUM")
    for candidate in ([env] if env else []) + list(CANDIDATES):
        if candidate and (Path(candidate).is_file() or shutil.which(candidate)):
            return candidate
    return None


@contextlib.contextmanager
def system_chromium() -> Iterator[Any]:
    """The distribution's Chromium driven by Playwright; skips (saying why) where there is
    none or it cannot start."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (it comes with the test extra)")
    path = chromium_path()
    if path is None:
        pytest.skip(
            f"no system Chromium at {' or '.join(CANDIDATES)} (.ci/run installs the "
            "distribution's chromium package where apt-get runs as root)"
        )
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=path, args=ARGS)
        except Error as e:
            pytest.skip(f"Chromium at {path} cannot be launched here: {e.message.splitlines()[0]}")
        try:
            yield b
        finally:
            b.close()


@dataclass
class Watched:
    """A page and every console error and uncaught exception it produced."""

    page: Any
    errors: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def allow(self, pattern: str) -> None:
        """Expect console errors matching ``pattern`` (e.g. a 401 the test provokes)."""
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.allowed)]

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@contextlib.contextmanager
def watched_page(browser: Any, name: str) -> Iterator[Watched]:
    """A fresh page (its own context: storage, cookies) that records its console errors and
    uncaught exceptions; its last state is saved as ``test-artifacts/<name>-last.png``."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(15_000)
    page = context.new_page()
    w = Watched(page)

    def on_console(message: Any) -> None:
        if message.type == "error":
            location = message.location.get("url", "") if message.location else ""
            w.errors.append(f"console: {message.text} ({location})")

    page.on("console", on_console)
    page.on("pageerror", lambda error: w.errors.append(f"page error: {error}"))
    try:
        yield w
    finally:
        with contextlib.suppress(Exception):  # a screenshot must not hide the real failure
            w.shot(f"{name}-last")
        context.close()
