"""/docs (Swagger UI) and /redoc (ReDoc) render in a real browser with nothing but the
service to talk to: every request to another host is refused and recorded, and the test
asserts there was none, that the page's Content-Security-Policy blocked nothing, and that
the page shows the API's operations."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import LiveServer, run_uvicorn

from adamscope.service.settings import Settings

from .browser_support import Watched, watched_page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

STEP = "/v1/steppers/{name}/step"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with run_uvicorn(Settings(data_dir=tmp_path_factory.mktemp("apidocs"), device="cpu")) as s:
        yield s


@pytest.fixture
def offline(browser: Any, request: pytest.FixtureRequest) -> Iterator[tuple[Watched, list[str]]]:
    """A page that may only reach 127.0.0.1, and the other URLs it asked for."""
    elsewhere: list[str] = []

    def only_local(route: Any) -> None:
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1" or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    with watched_page(browser, request.node.name) as w:
        w.page.context.route("**/*", only_local)
        yield w, elsewhere


def test_swagger_ui_renders_offline(server: LiveServer, offline: tuple[Watched, list[str]]) -> None:
    watched, elsewhere = offline
    page = watched.page
    page.goto(f"{server.url}/docs")
    step = page.locator(".opblock").filter(has=page.locator(f'[data-path="{STEP}"]'))
    step.first.wait_for()
    assert "post" in (step.first.get_attribute("class") or "")
    assert page.locator(".opblock").count() > 20
    assert page.locator(".info .title").first.inner_text().startswith("adamscope")
    step.first.locator(".opblock-summary").click()  # an operation opens, with its parameters
    step.first.locator(".parameters").first.wait_for()
    watched.shot("apidocs-swagger")
    assert elsewhere == []
    assert watched.unexpected() == []


def test_redoc_renders_offline(server: LiveServer, offline: tuple[Watched, list[str]]) -> None:
    watched, elsewhere = offline
    page = watched.page
    # ReDoc's sidebar badge ("API docs by Redocly") shows a logo from cdn.redoc.ly, with no
    # option to turn it off: the page's policy refuses it (a console error) and ReDoc hides
    # the image when it fails to load. Nothing else may be refused.
    watched.allow(r"Loading the image 'https://cdn\.redoc\.ly/redoc/logo-mini\.svg' violates")
    page.goto(f"{server.url}/redoc")
    page.locator(".api-info h1").first.wait_for()
    assert page.locator(".api-info h1").first.inner_text().startswith("adamscope")
    page.get_by_text(STEP).first.wait_for(state="attached")
    assert page.locator("[data-section-id^='operation/']").count() > 20
    watched.shot("apidocs-redoc")
    assert page.locator("img[alt='redocly logo']").count() == 0  # hidden once refused
    assert elsewhere == []
    assert watched.unexpected() == []
