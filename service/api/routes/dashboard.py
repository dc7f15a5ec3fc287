"""Routes serving the browser dashboard: ``GET /dashboard`` and its files.

The files are static (no data in them), so the routes are public; the page asks for a token
and sends it with each API request it makes. Each file has its own route because the access
middleware matches public paths exactly (a ``{file}`` pattern would not make them public).
The routes stay out of the OpenAPI document: they are not part of the API.

Replies carry a Content-Security-Policy that only allows this origin (the page loads
nothing from elsewhere, so it works offline and an injected script could not phone out),
and an ETag so that browsers revalidate cheaply instead of running stale code.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ...dashboard import static
from ..access import require

__all__ = ["ASSETS", "PAGE", "router"]

PAGE = "/dashboard"
#: Every file of the dashboard and its media type (a file not listed here is not served).
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "table.js": "text/javascript; charset=utf-8",
    "detail.js": "text/javascript; charset=utf-8",
    "controls.js": "text/javascript; charset=utf-8",
    "focus.js": "text/javascript; charset=utf-8",
    "compare.js": "text/javascript; charset=utf-8",
    "heatmap.js": "text/javascript; charset=utf-8",
}

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@functools.cache
def _load(file: str) -> tuple[bytes, str]:
    body = (static() / file).read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _serve(file: str) -> Callable[[Request], Awaitable[Response]]:
    media_type = ASSETS[file]

    async def asset(request: Request) -> Response:
        body, etag = _load(file)
        headers = {**HEADERS, "ETag": etag}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    asset.__name__ = "dashboard_" + file.replace(".", "_")
    return asset


for _file in ASSETS:
    router.add_api_route(
        PAGE if _file == "index.html" else f"{PAGE}/{_file}",
        _serve(_file),
        methods=["GET"],
        dependencies=[Depends(require("public"))],
    )
