"""RFC 9457 problem+json for every error the service returns.

Engine errors, codec errors, FastAPI's request validation errors, Starlette's HTTP errors
(unknown route, wrong method) and anything unexpected all leave as one shape::

    {"type": "urn:adamscope:problem:<code>", "title": ..., "status": ..., "detail": ...,
     "code": "<code>", "instance": "<path>", ...extra}

A ``detail`` is for the client: it never carries a stack trace, a source or library path or
a memory address (PyTorch's C++ errors carry all three; :func:`clean_detail` removes them
from every detail), and is cut at :data:`MAX_DETAIL` characters. An unexpected exception is
logged with its traceback under a short reference, and the client gets only the reference.
The allocator's own failure (the machine is out of memory) is 507, not a crash.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adamscope.client.codec import CodecError
from adamscope.client.errors import CODES
from adamscope.client.protocol import Problem

from .engine.errors import EngineError

__all__ = [
    "MAX_DETAIL",
    "PROBLEM_MEDIA_TYPE",
    "ApiError",
    "clean_detail",
    "install_error_handlers",
    "problem_response",
    "problems",
]

PROBLEM_MEDIA_TYPE = "application/problem+json"
log = logging.getLogger("adamscope")

#: Longest ``detail`` sent; a longer one (quoting a huge input, say) is cut.
MAX_DETAIL = 2000
#: A C++ backtrace (c10::Error's "Exception raised from ... frame #0: ...") or a Python
#: traceback, to the end of the text.
_TRACE = re.compile(
    r"\s*(?:Exception raised from |frame #\d+:|Traceback \(most recent call)"
    r".*",
    re.DOTALL,
)
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
#: Paths of source files and libraries (PyTorch quotes its own, and site-packages').
_SOURCE_PATH = re.compile(
    r"(?<![\w.])(?:[A-Za-z]:)?(?:[\\/][\w.+~-]+){2,}\.(?:py|pyc|so|dylib"
    r"|dll|cpp|cc|cu|cuh|h|hpp)\b(?::\d+)?"
)


def clean_detail(text: str) -> str:
    """``text`` without stack traces, source paths or addresses, at most MAX_DETAIL long."""
    text = _TRACE.sub("", text)
    text = _ADDRESS.sub("0x...", text)
    text = _SOURCE_PATH.sub("<source>", text)
    if len(text) > MAX_DETAIL:
        text = text[:MAX_DETAIL] + "... (cut)"
    return text


def _out_of_memory(exc: BaseException) -> bool:
    """The CPU allocator's failure (PyTorch raises RuntimeError, Python MemoryError)."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


class ApiError(Exception):
    """An error raised by the HTTP layer itself (body too large, bad media type, ...)."""

    def __init__(self, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.extra = extra


def problem_response(
    code: str, detail: str, instance: str | None = None, **extra: Any
) -> JSONResponse:
    status, title = CODES.get(code, (500, "Error"))
    body: dict[str, Any] = {
        "type": f"urn:adamscope:problem:{code}",
        "title": title,
        "status": status,
        "detail": clean_detail(detail),
        "code": code,
    }
    if instance:
        body["instance"] = instance
    body.update(jsonable_encoder(extra))
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE)


def problems(*codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the problems a route may return."""
    by_status: dict[int, list[str]] = {}
    for c in codes:
        by_status.setdefault(CODES[c][0], []).append(c)
    return {
        status: {
            "model": Problem,
            "description": "Problem: " + ", ".join(f"`{c}`" for c in cs),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status, cs in sorted(by_status.items())
    }


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        return problem_response(exc.code, exc.detail, request.url.path, **exc.extra)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return problem_response(exc.code, exc.detail, request.url.path, **exc.extra)

    @app.exception_handler(CodecError)
    async def _codec(request: Request, exc: CodecError) -> JSONResponse:
        return problem_response("malformed_body", str(exc), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        detail = (
            "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in errors)
            or "invalid request"
        )
        return problem_response("request_validation_error", detail, request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 400: FastAPI's "error parsing the body" (e.g. a JSON body that is not UTF-8).
        code = {
            400: "malformed_body",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            415: "unsupported_media_type",
        }.get(exc.status_code)
        if code is None:
            body = {
                "type": "about:blank",
                "title": str(exc.detail),
                "status": exc.status_code,
                "detail": str(exc.detail),
                "code": f"http_{exc.status_code}",
                "instance": request.url.path,
            }
            return JSONResponse(
                body,
                status_code=exc.status_code,
                media_type=PROBLEM_MEDIA_TYPE,
                headers=exc.headers,
            )
        return problem_response(code, str(exc.detail), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if _out_of_memory(exc):
            log.warning(
                "out of memory on %s %s: %s",
                request.method,
                request.url.path,
                clean_detail(str(exc)),
            )
            return problem_response(
                "memory_budget_exceeded",
                "the machine could not allocate the memory this "
                "request needs; nothing was changed (free memory or lower "
                "memory_budget_bytes)",
                request.url.path,
            )
        reference = secrets.token_hex(4)
        log.error(
            "unhandled error %s on %s %s", reference, request.method, request.url.path, exc_info=exc
        )
        return problem_response(
            "internal_error",
            f"internal error {reference}: the service's log has the details (please report it)",
            request.url.path,
            reference=reference,
        )
