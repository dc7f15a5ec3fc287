"""Access control over HTTP: every route declares the scope it needs, in one line::

    @router.post("/steppers/{name}/step", dependencies=[Depends(require("write"))])

``require("public")`` marks a route that needs no token (``/healthz``, the documentation
pages ``/docs`` and ``/redoc`` and each of their files); FastAPI's own ``/openapi.json`` is
public too. :func:`install` refuses to build an app with a route that declares nothing, so
no route is open by mistake.

With tokens configured, two steps guard a request:

1. :class:`AuthenticationMiddleware` (pure ASGI, before routing, before anything reads the
   body) answers 401 ``unauthorized`` with ``WWW-Authenticate: Bearer`` to any request for
   a non-public path without a valid bearer token, and records the token's
   :class:`~adamscope.service.auth.Principal` in the request scope.
2. The route's :func:`require` dependency answers 403 ``forbidden`` when that principal's
   scope is below the route's, or when the route names a stepper (``{name}``) outside the
   token's prefix, whether or not that stepper exists (so existence does not leak).
   Routes with the stepper name in the body (create) call :func:`authorize_name`, and the
   list shows only :func:`visible` steppers.

Without tokens every request acts as an unrestricted admin (the CLI then serves loopback
only, see :func:`adamscope.service.auth.binding_problem`).
"""

# No ``from __future__ import annotations``: FastAPI must see the real Annotated object of
# each scope's dependency, which is built inside a function.
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import FastAPI, Request, Security
from fastapi import routing as fastapi_routing
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from ..auth import ANONYMOUS_ADMIN, RANK, Principal, TokenTable
from ..errors import PROBLEM_MEDIA_TYPE, ApiError, problem_response

__all__ = [
    "PRINCIPAL_KEY",
    "AccessDenied",
    "AuthenticationMiddleware",
    "Endpoint",
    "authenticate",
    "authorize_name",
    "endpoints",
    "install",
    "principal",
    "require",
    "visible",
]

log = logging.getLogger("adamscope.access")

#: Where the middleware leaves the request's Principal in the ASGI scope.
PRINCIPAL_KEY = "adamscope.principal"
_SCOPE_ATTR = "adamscope_scope"
REALM = 'Bearer realm="adamscope"'

# For the OpenAPI document: the scheme, and each operation's scope as its "role" (OpenAPI
# 3.1 allows role names in a non-OAuth security requirement). The middleware reads the header.
_bearer = HTTPBearer(auto_error=False, description="a token from the service's configuration")


class AccessDenied(ApiError):
    """401/403 problem, with the ``WWW-Authenticate`` challenge RFC 6750 asks for."""

    def __init__(self, code: str, detail: str, challenge: str | None = None, **extra: Any) -> None:
        super().__init__(code, detail, **extra)
        self.challenge = challenge

    def response(self, path: str) -> JSONResponse:
        r = problem_response(self.code, self.detail, path, **self.extra)
        if self.challenge is not None:
            r.headers["WWW-Authenticate"] = self.challenge
        return r


def _prefix_denied(p: Principal, stepper: str) -> AccessDenied:
    return AccessDenied(
        "forbidden",
        f"token {p.label!r} only reaches {p.reach()}; {stepper!r} does not",
        prefix=p.prefix,
    )


def principal(request: Request) -> Principal:
    """The request's principal, as the middleware authenticated it."""
    found = request.scope.get(PRINCIPAL_KEY)
    if not isinstance(found, Principal):  # fail closed
        raise RuntimeError(
            f"{request.url.path} was not authenticated: the access "
            "middleware is not installed or thinks the path is public"
        )
    return found


def _authorize(request: Request, level: str) -> Principal:
    """The request's principal if its scope reaches ``level`` and its prefix the stepper
    the path names (403 otherwise). Module-level, not inside :func:`_requirement`: the
    dependencies are built once at import, and mutation testing (benchmarks/mutation.py)
    can only swap code that is looked up when a request runs."""
    p = principal(request)
    if not p.allows(level):
        raise AccessDenied(
            "forbidden",
            f"token {p.label!r} has scope {p.scope}; {request.method} "
            f"{request.url.path} needs {level}",
            f'{REALM}, error="insufficient_scope", scope="{level}"',
            required_scope=level,
            scope=p.scope,
        )
    name = request.path_params.get("name")
    if isinstance(name, str) and not p.reaches(name):
        raise _prefix_denied(p, name)
    return p


def _requirement(level: str) -> Callable[..., Awaitable[Principal | None]]:
    if level == "public":

        async def public() -> None:
            return None

        dependency: Callable[..., Awaitable[Principal | None]] = public
    else:
        bearer = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer, scopes=[level])]

        async def scoped(request: Request, _: bearer) -> Principal:
            return _authorize(request, level)

        dependency = scoped
    dependency.__name__ = f"require_{level}"
    setattr(dependency, _SCOPE_ATTR, level)
    return dependency


_REQUIREMENTS = {level: _requirement(level) for level in RANK}


def require(level: str) -> Callable[..., Awaitable[Principal | None]]:
    """The dependency that declares and enforces a route's scope: ``"public"``,
    ``"read"``, ``"write"`` or ``"admin"`` (each includes the ones before it)."""
    try:
        return _REQUIREMENTS[level]
    except KeyError:
        raise ValueError(f"unknown scope {level!r}; expected one of {list(RANK)}") from None


def authorize_name(request: Request, stepper: str) -> None:
    """403 unless the request's token reaches ``stepper`` (for names carried in a body)."""
    p = principal(request)
    if not p.reaches(stepper):
        raise _prefix_denied(p, stepper)


def visible(request: Request, stepper: str) -> bool:
    """Whether a listing shows ``stepper`` to this request's token."""
    return principal(request).reaches(stepper)


# ---------------------------------------------------------------------- route inventory


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    scope: str | None  # None: declares nothing
    #: The function that serves it (the distributed ingress routes by it).
    call: Callable[..., Any] | None = field(default=None, compare=False)


def _declared(dependant: Dependant) -> list[str]:
    found = []
    for dep in dependant.dependencies:
        level = getattr(dep.call, _SCOPE_ATTR, None)
        if level is not None:
            found.append(level)
        found += _declared(dep)
    return found


def endpoints(app: FastAPI) -> Iterator[Endpoint]:
    """Every (method, path) the app serves, with the scope it declares (the highest if it
    declares several), including routes of included routers."""
    contexts = getattr(fastapi_routing, "iter_route_contexts", None)
    if contexts is not None:  # FastAPI >= 0.165 keeps included routers lazily
        items = [
            (ctx.original_route, ctx.path_format, ctx.methods, getattr(ctx, "dependant", None))
            for ctx in contexts(app.routes)
        ]
    else:
        items = [
            (
                r,
                getattr(r, "path_format", None),
                getattr(r, "methods", None),
                getattr(r, "dependant", None),
            )
            for r in app.routes
        ]
    docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    for route, path, methods, dependant in items:
        if path is None:
            continue
        if isinstance(route, fastapi_routing.APIRoute):
            levels = _declared(dependant or route.dependant)
            level = max(levels, key=RANK.__getitem__) if levels else None
        else:
            level = "public" if path in docs else None
        call = getattr(route, "endpoint", None)
        for method in sorted(methods or {"*"}):
            if method != "HEAD":
                yield Endpoint(method, path, level, call)


# ---------------------------------------------------------------------- authentication


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def authenticate(table: TokenTable, authorization: str | None) -> Principal:
    """The principal an ``Authorization`` header value authenticates (401 otherwise)."""
    if not table.enabled:
        return ANONYMOUS_ADMIN
    if authorization is None:
        raise AccessDenied(
            "unauthorized",
            "this endpoint needs a bearer token: send 'Authorization: Bearer <token>'",
            REALM,
        )
    kind, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if kind.lower() != "bearer" or not credentials:
        raise AccessDenied(
            "unauthorized",
            "the Authorization header must be 'Bearer <token>'",
            f'{REALM}, error="invalid_request"',
        )
    found = table.lookup(credentials)
    if found is None:
        raise AccessDenied(
            "unauthorized", "the bearer token is not valid", f'{REALM}, error="invalid_token"'
        )
    return found


class AuthenticationMiddleware:
    """Authenticates every HTTP request for a non-public path before the app sees it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._public: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        app: FastAPI = scope["app"]
        if self._public is None:
            self._public = frozenset(e.path for e in endpoints(app) if e.scope == "public")
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # behind a proxy that mounts the app (--root-path)
            path = path[len(root) :]
        if path not in self._public:
            try:
                scope[PRINCIPAL_KEY] = authenticate(
                    app.state.access, _header(scope, b"authorization")
                )
            except AccessDenied as denied:
                client = scope.get("client") or ("?", 0)
                # The reason only: never the presented token.
                log.info(
                    "401 %s %s from %s: %s",
                    scope["method"],
                    scope["path"],
                    client[0],
                    denied.detail,
                )
                await denied.response(scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------- wiring


def _problem_doc(code: str, text: str) -> dict[str, Any]:
    return {
        "description": f"Problem: `{code}` ({text})",
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _document(app: FastAPI) -> None:
    """Each operation's scope as ``x-adamscope-scope``, and its 401/403 problems."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        paths = schema.get("paths", {})
        for e in endpoints(app):
            op = paths.get(e.path, {}).get(e.method.lower())
            if op is None or e.scope is None:
                continue
            op["x-adamscope-scope"] = e.scope
            if e.scope == "public":
                op["security"] = []
                continue
            responses = op.setdefault("responses", {})
            responses.setdefault(
                "401",
                _problem_doc("unauthorized", "tokens are configured and no valid one was sent"),
            )
            responses.setdefault(
                "403",
                _problem_doc(
                    "forbidden",
                    f"the token's scope is below {e.scope} or its prefix excludes the stepper",
                ),
            )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI, table: TokenTable) -> None:
    """Guard ``app`` with ``table`` (call after every route is added)."""
    undeclared = [f"{e.method} {e.path}" for e in endpoints(app) if e.scope is None]
    if undeclared:
        raise RuntimeError(
            "routes without an access scope: "
            + ", ".join(undeclared)
            + "; add dependencies=[Depends(require('read'|'write'|'admin'|'public'))]"
        )
    app.state.access = table
    app.add_middleware(AuthenticationMiddleware)

    async def denied(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AccessDenied)
        return exc.response(request.url.path)

    app.add_exception_handler(AccessDenied, denied)
    _document(app)
