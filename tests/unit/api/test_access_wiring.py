"""How a scope becomes a route's guard, built while the test runs.

The app's own routes take their dependencies from ``access._REQUIREMENTS``, built once at
import; these tests build the dependencies again (``access._requirement``) on a small app,
so a change to how one is made shows here: the public one asks for nothing, a scoped one
refuses a lower scope with the RFC 6750 challenge and is documented with its scope in
OpenAPI, and each carries the scope the inventory (:func:`access.endpoints`) reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi import routing as fastapi_routing
from fastapi.testclient import TestClient
from pydantic import ValidationError
from starlette.staticfiles import StaticFiles

from adamscope.service.api import access
from adamscope.service.auth import (
    ANONYMOUS_ADMIN,
    Principal,
    TokenConfigError,
    TokenSpec,
    TokenTable,
    describe_validation_error,
    is_loopback,
    load_access,
    load_tokens_file,
)
from adamscope.service.settings import Settings

READ = "read-token-0123456789abcdef"
WRITE = "write-token-0123456789abcdef"


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/open", dependencies=[Depends(access._requirement("public"))])
    async def open_route() -> dict[str, str]:
        return {"open": "yes"}

    @app.post("/things/{name}", dependencies=[Depends(access._requirement("write"))])
    async def write_route(name: str) -> dict[str, str]:
        return {"wrote": name}

    table = TokenTable(
        [
            (TokenSpec.model_validate({"token": READ, "scope": "read"}), "reader"),
            (TokenSpec.model_validate({"token": WRITE, "scope": "write"}), "writer"),
        ]
    )
    access.install(app, table)
    return app


def test_a_requirement_built_now_guards_and_declares_its_scope() -> None:
    app = _app()
    scopes = {(e.method, e.path): e.scope for e in access.endpoints(app)}
    assert scopes[("GET", "/open")] == "public"
    assert scopes[("POST", "/things/{name}")] == "write"
    with TestClient(app) as client:
        r = client.get("/open")
        assert r.status_code == 200 and r.json() == {"open": "yes"}
        assert client.post("/things/a").status_code == 401
        refused = client.post("/things/a", headers={"authorization": f"Bearer {READ}"})
        assert refused.status_code == 403
        assert refused.headers["www-authenticate"] == (
            'Bearer realm="adamscope", error="insufficient_scope", scope="write"'
        )
        assert refused.json()["required_scope"] == "write"
        ok = client.post("/things/a", headers={"authorization": f"Bearer {WRITE}"})
        assert ok.status_code == 200 and ok.json() == {"wrote": "a"}
        doc = client.get("/openapi.json").json()
    assert doc["paths"]["/things/{name}"]["post"]["security"] == [{"HTTPBearer": ["write"]}]
    assert doc["paths"]["/things/{name}"]["post"]["x-adamscope-scope"] == "write"
    assert doc["paths"]["/open"]["get"]["security"] == []


def test_settings_errors_name_the_nested_place() -> None:
    """A token inside the settings sits at ``tokens[0].token``: list indexes in brackets,
    field names after dots, nothing between them."""
    try:
        Settings(device="cpu", tokens=[{"token": "short", "scope": "read"}])
    except ValidationError as e:
        message = describe_validation_error(e, "settings")
    else:
        raise AssertionError("a 5-character token was accepted")
    assert message == (
        "settings.tokens[0].token: Value error, a token needs at least 16 characters"
    )


def _unreadable(tmp_path: Path) -> Path:
    """A file this process may not read: mode 000, or, for root (whom modes do not stop),
    a write-only kernel setting."""
    path = tmp_path / "secret.json"
    path.write_text("[]")
    path.chmod(0)
    if os.geteuid() != 0:
        return path
    for candidate in ("/proc/sys/vm/compact_memory", "/proc/sys/vm/drop_caches"):
        try:
            Path(candidate).read_bytes()
        except PermissionError:
            return Path(candidate)
        except OSError:
            continue
    pytest.skip("no file here that root may not read")


def test_an_unreadable_tokens_file_says_permission_denied(tmp_path: Path) -> None:
    path = _unreadable(tmp_path)
    with pytest.raises(TokenConfigError) as info:
        load_tokens_file(path)
    assert str(info.value) == f"tokens file {path}: permission denied"


def test_a_token_without_a_prefix_reaches_every_stepper_in_words() -> None:
    """What /v1/whoami and every 403 say of an unrestricted token."""
    for p in (Principal("operator", "admin"), ANONYMOUS_ADMIN):
        assert p.reach() == "every stepper"


def test_a_router_wide_scope_counts_for_each_of_its_routes() -> None:
    """A scope declared when a router is included (not on the route) is the route's: the
    inventory must read the included route's dependencies, not the bare route's."""
    router = APIRouter()

    @router.get("/x/{name}")
    async def x(name: str) -> dict[str, str]:
        return {"x": name}

    # declares two: the highest counts (admin > read, though "read" sorts after "admin")
    @router.get("/y", dependencies=[Depends(access.require("read"))])
    async def y() -> dict[str, str]:
        return {}

    app = FastAPI()
    app.include_router(router, prefix="/v", dependencies=[Depends(access.require("admin"))])
    scopes = {(e.method, e.path): e.scope for e in access.endpoints(app)}
    assert scopes[("GET", "/v/x/{name}")] == "admin"
    assert scopes[("GET", "/v/y")] == "admin"
    access.install(app, TokenTable())  # declared: installs


@pytest.mark.parametrize("host", ["X127.0.0.1", "X::1", "[::1]X", "127.0.0.1X"])
def test_a_host_name_around_a_loopback_address_is_not_loopback(host: str) -> None:
    assert not is_loopback(host)
    assert is_loopback(host.replace("X", ""))


def test_only_an_empty_json_list_in_the_environment_is_a_mistake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Settings built before the variable changed: a value that is not JSON is not an
    empty list (its own error comes from the settings), so it stops nothing here."""
    settings = Settings(device="cpu")
    for raw in ("not json", "{", "[1"):
        monkeypatch.setenv("ADAMSCOPE_TOKENS", raw)
        assert not load_access(settings).enabled
    monkeypatch.setenv("ADAMSCOPE_TOKENS", "[]")
    with pytest.raises(TokenConfigError) as info:
        load_access(settings)
    assert str(info.value) == (
        "ADAMSCOPE_TOKENS lists no tokens: give at least one, or leave the variable out "
        "to serve without tokens (loopback only)"
    )


def test_the_inventory_reads_the_same_routes_without_route_contexts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FastAPI before 0.165 has no ``routing.iter_route_contexts``: the inventory then reads
    ``app.routes`` itself, and must find the same endpoints (a mount, with no methods,
    included; a host route, with no path, left out)."""
    app = FastAPI()
    app.host("api.example", FastAPI())  # no path: skipped, and the routes after it read

    @app.get("/a/{name}", dependencies=[Depends(access.require("write"))])
    async def a(name: str) -> dict[str, str]:
        return {"a": name}

    app.mount("/static", StaticFiles(directory=Path(__file__).parent))
    with_contexts = list(access.endpoints(app))
    monkeypatch.delattr(fastapi_routing, "iter_route_contexts")
    without = list(access.endpoints(app))
    assert without == with_contexts
    assert [e.call for e in without] == [e.call for e in with_contexts]
    found = {(e.method, e.path): e for e in without}
    assert found[("GET", "/a/{name}")].scope == "write" and found[("GET", "/a/{name}")].call is a
    assert found[("*", "/static/{path}")].scope is None
    assert found[("GET", "/docs")].scope == "public" and ("HEAD", "/docs") not in found


def test_install_names_every_route_without_a_scope_and_the_fix() -> None:
    app = FastAPI()

    @app.get("/a")
    async def a() -> dict[str, str]:
        return {}

    @app.post("/b")
    async def b() -> dict[str, str]:
        return {}

    with pytest.raises(RuntimeError) as info:
        access.install(app, TokenTable())
    assert str(info.value) == (
        "routes without an access scope: GET /a, POST /b; "
        "add dependencies=[Depends(require('read'|'write'|'admin'|'public'))]"
    )


@pytest.mark.parametrize(
    ("header", "detail", "challenge"),
    [
        (
            None,
            "this endpoint needs a bearer token: send 'Authorization: Bearer <token>'",
            'Bearer realm="adamscope"',
        ),
        (
            "Basic dXNlcjpwYXNz",
            "the Authorization header must be 'Bearer <token>'",
            'Bearer realm="adamscope", error="invalid_request"',
        ),
        (
            f"Bearer {READ}x",
            "the bearer token is not valid",
            'Bearer realm="adamscope", error="invalid_token"',
        ),
    ],
)
def test_each_401_says_exactly_what_to_send(
    header: str | None, detail: str, challenge: str
) -> None:
    table = TokenTable([(TokenSpec.model_validate({"token": READ, "scope": "read"}), "r")])
    with pytest.raises(access.AccessDenied) as info:
        access.authenticate(table, header)
    assert (info.value.code, info.value.detail, info.value.challenge) == (
        "unauthorized",
        detail,
        challenge,
    )
    assert access.authenticate(table, f"  bearer   {READ}  ") == Principal("r", "read")


def test_a_public_path_outside_the_root_path_stays_public() -> None:
    """Behind ``--root-path``, only a path that starts with it loses it: ``/open`` asked
    of an app mounted at ``/adamscope`` is still ``/open``."""
    with TestClient(_app(), root_path="/adamscope") as client:
        assert client.get("/open").status_code == 200
        assert client.get("/adamscope/open").status_code == 200
        assert client.post("/adamscope/things/a").status_code == 401


def test_a_401_is_logged_with_the_client_and_the_reason_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with TestClient(_app()) as client, caplog.at_level(logging.INFO, "adamscope.access"):
        client.post("/things/a", headers={"authorization": f"Bearer {READ}x"})
    assert [r.getMessage() for r in caplog.records if r.name == "adamscope.access"] == [
        "401 POST /things/a from testclient: the bearer token is not valid"
    ]


def test_a_401_without_a_client_address_logs_a_question_mark(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ASGI leaves ``client`` None where there is no address (a Unix socket)."""
    app = _app()
    sent: list[dict[str, object]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/things/a",
        "raw_path": b"/things/a",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": None,
        "server": None,
    }

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    with caplog.at_level(logging.INFO, "adamscope.access"):
        asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 401
    assert [r.getMessage() for r in caplog.records if r.name == "adamscope.access"] == [
        "401 POST /things/a from ?: this endpoint needs a bearer token: "
        "send 'Authorization: Bearer <token>'"
    ]
