"""Fixtures of the browser tier: the system Chromium (one per module) and a page watched
for console errors (one per test)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .browser_support import Watched, system_chromium, watched_page


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with system_chromium() as b:
        yield b


@pytest.fixture
def watched(browser: Any, request: pytest.FixtureRequest) -> Iterator[Watched]:
    with watched_page(browser, request.node.name) as w:
        yield w
