"""Routes serving the API's documentation pages offline: ``GET /docs`` (Swagger UI),
``GET /redoc`` (ReDoc) and their files under ``/docs/static/``.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (and ReDoc's fonts from Google),
so they are blank on a machine without internet access. These pages are FastAPI's HTML
pointed at the copies the ``fastapi-offline`` package installs (a dependency, so nothing
minified lives in this repository), served by the service itself.

Like the dashboard's files, every file has its own public route (the access middleware
matches public paths exactly, so a ``{file}`` pattern or a static mount would not be
public) and stays out of the OpenAPI document. Each reply carries a Content-Security-Policy
that only allows this origin: the pages load nothing from elsewhere, and an injected script
could not phone out. The inline scripts FastAPI's pages start Swagger UI with are allowed
by their hash.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import Response

from ..access import require

__all__ = ["ASSETS", "DOCS", "OAUTH2_REDIRECT", "REDOC", "STATIC", "router"]

DOCS = "/docs"
REDOC = "/redoc"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
STATIC = "/docs/static"
#: The files the pages load, as fastapi-offline installs them, and their media types.
ASSETS: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
#: Swagger UI's settings beyond FastAPI's: no validator badge (it would ask
#: validator.swagger.io about the document).
SWAGGER_PARAMETERS: dict[str, Any] = {"validatorUrl": None}

#: Only this origin. Inline styles: Swagger UI and ReDoc set style attributes, ReDoc writes
#: its CSS into <style> elements; ReDoc's search runs in a worker it starts from a blob.
POLICY = (
    "default-src 'none'; script-src 'self'{scripts}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
    "worker-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)

router = APIRouter(include_in_schema=False)


def _page(html: bytes) -> Response:
    """An HTML page whose policy allows its own inline scripts (by hash) and nothing else
    from outside this origin."""
    hashes = "".join(
        " 'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _INLINE_SCRIPT.findall(html.decode())
    )
    headers = {**HEADERS, "Content-Security-Policy": POLICY.format(scripts=hashes)}
    return Response(html, media_type="text/html; charset=utf-8", headers=headers)


def _root(request: Request) -> str:
    """The path the app is mounted under (behind a proxy with ``--root-path``)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _openapi_url(request: Request) -> str:
    app: FastAPI = request.app
    return _root(request) + (app.openapi_url or "/openapi.json")


async def swagger_ui(request: Request) -> Response:
    root = _root(request)
    page = get_swagger_ui_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{STATIC}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{root}{STATIC}/favicon.png",
        oauth2_redirect_url=root + OAUTH2_REDIRECT,
        swagger_ui_parameters=SWAGGER_PARAMETERS,
    )
    return _page(bytes(page.body))


async def oauth2_redirect(request: Request) -> Response:
    return _page(bytes(get_swagger_ui_oauth2_redirect_html().body))


async def redoc(request: Request) -> Response:
    root = _root(request)
    page = get_redoc_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{STATIC}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{STATIC}/favicon.png",
        with_google_fonts=False,
    )
    return _page(bytes(page.body))


@functools.cache
def _load(file: str) -> tuple[bytes, str]:
    body = (files("fastapi_offline") / "static" / file).read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _serve(file: str) -> Callable[[Request], Awaitable[Response]]:
    media_type = ASSETS[file]

    async def asset(request: Request) -> Response:
        body, etag = _load(file)
        headers = {**HEADERS, "ETag": etag, "Cache-Control": "no-cache"}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    asset.__name__ = "docs_" + re.sub(r"\W", "_", file)
    return asset


for _path, _endpoint in ((DOCS, swagger_ui), (OAUTH2_REDIRECT, oauth2_redirect), (REDOC, redoc)):
    router.add_api_route(
        _path, _endpoint, methods=["GET"], dependencies=[Depends(require("public"))]
    )
for _file in ASSETS:
    router.add_api_route(
        f"{STATIC}/{_file}",
        _serve(_file),
        methods=["GET"],
        dependencies=[Depends(require("public"))],
    )
