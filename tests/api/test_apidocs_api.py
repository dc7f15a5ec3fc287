"""/docs (Swagger UI) and /redoc (ReDoc) work offline: every file they load comes from the
service itself, under a Content-Security-Policy that forbids loading anything from
elsewhere. tests/browser/test_apidocs.py renders them in a real browser."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from adamscope.service.app import create_app
from adamscope.service.settings import Settings

#: The media type each kind of file must be served with.
MEDIA = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".json": None}


class _Links(HTMLParser):
    """Every URL an HTML page references: src, href, and ReDoc's spec-url."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in {"src", "href", "spec-url"} and v]


def referenced(html: str) -> list[str]:
    links = _Links()
    links.feed(html)
    # Swagger UI's start script names the document in JavaScript: url: '/openapi.json'
    links.urls += re.findall(r"url:\s*'([^']+)'", html)
    return links.urls


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_files_the_service_serves(app_client: TestClient, page: str) -> None:
    r = app_client.get(page)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://|//[a-z]", r.text), f"{page} names another host:\n{r.text}"
    urls = referenced(r.text)
    assert "/openapi.json" in urls
    assert any(u.endswith(".js") for u in urls) and "/docs/static/favicon.png" in urls
    for url in urls:
        assert url.startswith("/"), url
        asset = app_client.get(url)
        assert asset.status_code == 200, url
        expected = MEDIA[url[url.rindex(".") :]] or "application/json"
        assert asset.headers["content-type"].startswith(expected), (url, asset.headers)
        assert asset.content, url
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert not re.search(r"https?:|\*", policy), policy


def test_swagger_ui_asks_no_validator_and_its_start_script_is_allowed_by_hash(
    app_client: TestClient,
) -> None:
    r = app_client.get("/docs")
    assert '"validatorUrl": null' in r.text
    assert "'unsafe-inline'" not in r.headers["content-security-policy"].split("style-src")[0]
    assert "script-src 'self' 'sha256-" in r.headers["content-security-policy"]


def test_docs_files_revalidate_with_an_etag(app_client: TestClient) -> None:
    r = app_client.get("/docs/static/swagger-ui.css")
    assert r.status_code == 200 and r.headers["etag"]
    again = app_client.get(
        "/docs/static/swagger-ui.css", headers={"if-none-match": r.headers["etag"]}
    )
    assert again.status_code == 304 and again.content == b""


def test_docs_pages_behind_a_root_path_reference_their_files_under_it(
    settings: Settings,
) -> None:
    with TestClient(create_app(settings), root_path="/adamscope") as c:
        for page in ("/docs", "/redoc"):
            urls = referenced(c.get(f"/adamscope{page}").text)
            assert urls and all(u.startswith("/adamscope/") for u in urls), urls
            for url in urls:
                assert c.get(url).status_code == 200, url


def test_only_the_listed_files_are_served(app_client: TestClient) -> None:
    for path in ("/docs/static/", "/docs/static/core.py", "/docs/static/../consts.py"):
        assert app_client.get(path).status_code == 404, path
