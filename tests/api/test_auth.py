"""Access control: the auth matrix (every route x every kind of caller), the 401/403
problems, prefix isolation, constant-time token lookup, tokens kept out of logs, the
loopback rule without tokens, and the token configuration (environment, JSON, TOML).

The matrix is built from the app's own routes, so a new route without a declared scope or
without a row in SCOPES/RECIPES fails here.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from api_support import (
    OCTET,
    SPEC,
    V1,
    assert_problem,
    create,
    initial_values,
    registered,
    snapshot,
    step,
)
from conftest import run_uvicorn
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from test_packaging import instructions

from adamscope.client import AsyncClient, Client, RemoteAdam, codec
from adamscope.client.errors import ForbiddenError, UnauthorizedError
from adamscope.service import auth, cli
from adamscope.service.api import access
from adamscope.service.api.access import Endpoint, endpoints, require
from adamscope.service.app import create_app
from adamscope.service.auth import TokenConfigError, TokenTable, load_access, load_tokens_file
from adamscope.service.cli import build_parser
from adamscope.service.settings import Settings
from adamscope.service.testing import free_port

ROOT = Path(__file__).resolve().parents[2]

TOKENS = {
    "read": "read-token-0123456789abcdef",
    "write": "write-token-0123456789abcdef",
    "admin": "admin-token-0123456789abcdef",
    "wrong_prefix": "team-b-admin-0123456789abcdef",
    "prefix_ok": "team-a-admin-0123456789abcdef",
}
CONFIG: list[dict[str, Any]] = [
    {"token": TOKENS["read"], "scope": "read", "name": "dashboard"},
    {"token": TOKENS["write"], "scope": "write", "name": "trainer"},
    {"token": TOKENS["admin"], "scope": "admin", "name": "operator"},
    {"token": TOKENS["wrong_prefix"], "scope": "admin", "prefix": "team-b-", "name": "team-b"},
    {"token": TOKENS["prefix_ok"], "scope": "admin", "prefix": "team-a-", "name": "team-a"},
]
#: Caller kinds of the matrix: the token's scope, and whether it reaches team-a-* steppers.
KINDS: dict[str, tuple[str | None, bool]] = {
    "none": (None, False),
    "invalid": (None, False),
    "read": ("read", True),
    "write": ("write", True),
    "admin": ("admin", True),
    "wrong_prefix": ("admin", False),
    "prefix_ok": ("admin", True),
}
RANK = {"read": 1, "write": 2, "admin": 3}

#: The dashboard's page and files (public: they hold no data).
DASHBOARD = [
    "/dashboard",
    *(
        f"/dashboard/{f}"
        for f in (
            "style.css",
            "app.js",
            "api.js",
            "charts.js",
            "table.js",
            "detail.js",
            "controls.js",
            "focus.js",
            "compare.js",
            "heatmap.js",
        )
    ),
]

#: The files /docs and /redoc load, served by the service (public: no data, no CDN).
API_DOCS = [
    f"/docs/static/{f}"
    for f in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
]

NAME = "team-a-net"
OTHER = "team-b-other"
N = f"{V1}/{{name}}"
WATCH = "/v1/watch/{name}"
W = f"/v1/watch/{NAME}"

#: The documented scope of every route (README's table); the app must declare exactly these.
SCOPES: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "public",
    ("GET", "/openapi.json"): "public",
    ("GET", "/docs"): "public",
    ("GET", "/docs/oauth2-redirect"): "public",
    ("GET", "/redoc"): "public",
    ("GET", V1): "read",
    ("POST", V1): "admin",
    ("GET", N): "read",
    ("DELETE", N): "admin",
    ("PATCH", N): "admin",
    ("PATCH", f"{N}/hyperparameters"): "write",
    ("GET", f"{N}/bias-correction"): "read",
    ("POST", f"{N}/step"): "write",
    ("POST", f"{N}/commit"): "write",
    ("GET", f"{N}/params"): "read",
    ("PUT", f"{N}/params"): "write",
    ("GET", f"{N}/state"): "read",
    ("PUT", f"{N}/state"): "write",
    ("DELETE", f"{N}/state"): "write",
    ("POST", f"{N}/checkpoint"): "write",
    ("PUT", f"{N}/durability"): "admin",
    ("POST", f"{N}/snapshots"): "admin",
    ("GET", f"{N}/snapshots"): "admin",
    ("GET", f"{N}/snapshots/{{snap}}"): "admin",
    ("POST", f"{N}/snapshots/{{snap}}/restore"): "admin",
    ("DELETE", f"{N}/snapshots/{{snap}}"): "admin",
    ("POST", f"{V1}/import"): "admin",
    # history, alerts, live events and metrics
    ("GET", f"{N}/history"): "read",
    ("GET", f"{N}/histograms"): "read",
    ("GET", f"{N}/alerts"): "read",
    ("PUT", f"{N}/alerts"): "write",
    ("POST", f"{N}/loss"): "write",
    ("GET", "/v1/events"): "read",
    ("GET", "/metrics"): "read",
    ("GET", "/v1/whoami"): "read",
    **{("GET", path): "public" for path in DASHBOARD},
    **{("GET", path): "public" for path in API_DOCS},
    # statistics, signals, slices, dry runs and diffs (service/api/stats.py)
    ("GET", f"{N}/stats"): "read",
    ("GET", f"{N}/signals"): "read",
    ("GET", f"{N}/slice"): "read",
    ("POST", f"{N}/dry-run"): "read",
    ("GET", "/v1/diff"): "read",
    # watched runs (service/api/routes/watch.py): reports and commands need write
    ("POST", f"{WATCH}/report"): "write",
    ("POST", f"{WATCH}/commands"): "write",
    ("PUT", f"{WATCH}/state"): "write",
    ("GET", f"{WATCH}/commands/{{cid}}"): "read",
    ("GET", f"{WATCH}/commands/{{cid}}/body"): "write",
    ("POST", f"{WATCH}/commands/{{cid}}/upload"): "write",
    ("GET", f"{WATCH}/state"): "read",
    ("GET", f"{WATCH}/snapshots"): "read",
}
#: A snapshot file of NAME, as downloaded (the import recipe uploads it).
SNAPSHOT_FILE: dict[str, bytes] = {}


@dataclass
class Recipe:
    """A well-formed request to a route (on stepper NAME where it names one) and the
    status it gets from a caller who is allowed to make it."""

    send: Callable[[TestClient], httpx.Response]
    status: int
    names_stepper: bool = True


def _get(path: str) -> Callable[[TestClient], httpx.Response]:
    return lambda c: c.get(path)


RECIPES: dict[tuple[str, str], Recipe] = {
    ("GET", "/healthz"): Recipe(_get("/healthz"), 200, False),
    ("GET", "/openapi.json"): Recipe(_get("/openapi.json"), 200, False),
    ("GET", "/docs"): Recipe(_get("/docs"), 200, False),
    ("GET", "/docs/oauth2-redirect"): Recipe(_get("/docs/oauth2-redirect"), 200, False),
    ("GET", "/redoc"): Recipe(_get("/redoc"), 200, False),
    ("GET", V1): Recipe(_get(V1), 200, False),
    ("POST", V1): Recipe(lambda c: c.post(V1, json={**SPEC, "name": "team-a-new"}), 201),
    ("GET", N): Recipe(_get(f"{V1}/{NAME}"), 200),
    ("DELETE", N): Recipe(lambda c: c.delete(f"{V1}/{NAME}"), 204),
    ("PATCH", N): Recipe(lambda c: c.patch(f"{V1}/{NAME}", json={"kind": "frozen"}), 200),
    ("PATCH", f"{N}/hyperparameters"): Recipe(
        lambda c: c.patch(f"{V1}/{NAME}/hyperparameters", json={"lr": 0.5}), 200
    ),
    ("GET", f"{N}/bias-correction"): Recipe(_get(f"{V1}/{NAME}/bias-correction"), 200),
    ("POST", f"{N}/step"): Recipe(
        lambda c: step(c, NAME, {"w": torch.ones(2, 3), "b": torch.ones(3)}), 200
    ),
    # Nothing is pending, so an allowed caller gets the documented conflict.
    ("POST", f"{N}/commit"): Recipe(lambda c: c.post(f"{V1}/{NAME}/commit"), 409),
    ("GET", f"{N}/params"): Recipe(_get(f"{V1}/{NAME}/params"), 200),
    ("PUT", f"{N}/params"): Recipe(
        lambda c: c.put(
            f"{V1}/{NAME}/params", content=codec.encode({"b": torch.zeros(3)}), headers=OCTET
        ),
        200,
    ),
    ("GET", f"{N}/state"): Recipe(_get(f"{V1}/{NAME}/state"), 200),
    ("PUT", f"{N}/state"): Recipe(
        lambda c: c.put(
            f"{V1}/{NAME}/state",
            content=codec.encode({"b.exp_avg": torch.full((3,), 0.5)}),
            headers=OCTET,
        ),
        200,
    ),
    ("DELETE", f"{N}/state"): Recipe(lambda c: c.delete(f"{V1}/{NAME}/state"), 200),
    ("POST", f"{N}/checkpoint"): Recipe(lambda c: c.post(f"{V1}/{NAME}/checkpoint"), 200),
    ("PUT", f"{N}/durability"): Recipe(
        lambda c: c.put(f"{V1}/{NAME}/durability", json={"mode": "manual"}), 200
    ),
    ("POST", f"{N}/snapshots"): Recipe(
        lambda c: c.post(f"{V1}/{NAME}/snapshots", json={"name": "snap2"}), 201
    ),
    ("GET", f"{N}/snapshots"): Recipe(_get(f"{V1}/{NAME}/snapshots"), 200),
    ("GET", f"{N}/snapshots/{{snap}}"): Recipe(_get(f"{V1}/{NAME}/snapshots/snap1"), 200),
    ("POST", f"{N}/snapshots/{{snap}}/restore"): Recipe(
        lambda c: c.post(f"{V1}/{NAME}/snapshots/snap1/restore"), 200
    ),
    ("DELETE", f"{N}/snapshots/{{snap}}"): Recipe(
        lambda c: c.delete(f"{V1}/{NAME}/snapshots/snap1"), 204
    ),
    ("POST", f"{V1}/import"): Recipe(
        lambda c: c.post(
            f"{V1}/import",
            params={"name": "team-a-imported"},
            content=SNAPSHOT_FILE["snap1"],
            headers=OCTET,
        ),
        201,
    ),
    ("GET", f"{N}/history"): Recipe(_get(f"{V1}/{NAME}/history"), 200),
    ("GET", f"{N}/histograms"): Recipe(_get(f"{V1}/{NAME}/histograms?tensor=w"), 200),
    ("GET", f"{N}/alerts"): Recipe(_get(f"{V1}/{NAME}/alerts"), 200),
    ("PUT", f"{N}/alerts"): Recipe(
        lambda c: c.put(f"{V1}/{NAME}/alerts", json={"rules": None}), 200
    ),
    ("POST", f"{N}/loss"): Recipe(
        lambda c: c.post(f"{V1}/{NAME}/loss", json={"step": 1, "loss": 0.5}), 200
    ),
    # A stream that ends at once (duration=0): its opening event, then the end.
    ("GET", "/v1/events"): Recipe(
        lambda c: c.get("/v1/events", params={"duration": 0}), 200, False
    ),
    ("GET", "/metrics"): Recipe(_get("/metrics"), 200, False),
    ("GET", "/v1/whoami"): Recipe(_get("/v1/whoami"), 200, False),
    **{("GET", path): Recipe(_get(path), 200, False) for path in DASHBOARD},
    **{("GET", path): Recipe(_get(path), 200, False) for path in API_DOCS},
    ("GET", f"{N}/stats"): Recipe(_get(f"{V1}/{NAME}/stats"), 200),
    ("GET", f"{N}/signals"): Recipe(_get(f"{V1}/{NAME}/signals"), 200),
    ("GET", f"{N}/slice"): Recipe(_get(f"{V1}/{NAME}/slice?name=w&key=exp_avg&index=0"), 200),
    # A dry run changes nothing, so the read scope may ask for one.
    ("POST", f"{N}/dry-run"): Recipe(
        lambda c: c.post(
            f"{V1}/{NAME}/dry-run", content=codec.encode({"w": torch.ones(2, 3)}), headers=OCTET
        ),
        200,
    ),
    # Names its steppers in the query: a token must reach both.
    ("GET", "/v1/diff"): Recipe(_get(f"/v1/diff?a={NAME}&b={NAME}"), 200),
}


def _app_endpoints() -> list[Endpoint]:
    app = create_app(Settings(device="cpu", tokens=[], tokens_file=None))
    return sorted(endpoints(app), key=lambda e: (e.path, e.method))


ENDPOINTS = _app_endpoints()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Overrides the shared fixture: ``app_client`` serves with CONFIG's tokens."""
    return Settings(data_dir=tmp_path / "data", device="cpu", tokens=CONFIG)


@contextlib.contextmanager
def calling_as(client: TestClient, kind: str) -> Iterator[TestClient]:
    """Send requests as ``kind`` (a KINDS key) while the block runs."""
    previous = client.headers.get("authorization")
    client.headers.pop("authorization", None)
    if kind == "invalid":
        client.headers["authorization"] = "Bearer not-a-configured-token-0123456789"
    elif kind != "none":
        client.headers["authorization"] = f"Bearer {TOKENS[kind]}"
    try:
        yield client
    finally:
        client.headers.pop("authorization", None)
        if previous is not None:
            client.headers["authorization"] = previous


def everything(client: TestClient) -> tuple[Any, ...]:
    """All a client can observe of the service's steppers and snapshots (as admin)."""
    with calling_as(client, "admin"):
        summaries = client.get(V1).json()["steppers"]
        durability = {s["name"]: s.get("durability") for s in summaries}
        snaps = client.get(f"{V1}/{NAME}/snapshots")
        assert snaps.status_code == 200, snaps.text
        return (
            registered(client),
            snapshot(client, NAME),
            snapshot(client, OTHER),
            durability,
            snaps.json(),
        )


# NAME is hosted: an allowed caller's watch request reaches the route, which answers that
# a watched run needs a name of its own (409), changing nothing.
RECIPES.update(
    {
        ("POST", f"{WATCH}/report"): Recipe(
            lambda c: c.post(f"{W}/report", json={"step": 1, "params": [], "groups": []}), 409
        ),
        ("POST", f"{WATCH}/commands"): Recipe(
            lambda c: c.post(f"{W}/commands", json={"op": "state"}), 409
        ),
        ("PUT", f"{WATCH}/state"): Recipe(
            lambda c: c.put(f"{W}/state", content=codec.encode({}), headers=OCTET), 409
        ),
        ("GET", f"{WATCH}/commands/{{cid}}"): Recipe(_get(f"{W}/commands/c1"), 409),
        ("GET", f"{WATCH}/commands/{{cid}}/body"): Recipe(_get(f"{W}/commands/c1/body"), 409),
        ("POST", f"{WATCH}/commands/{{cid}}/upload"): Recipe(
            lambda c: c.post(f"{W}/commands/c1/upload", content=b"", headers=OCTET), 409
        ),
        ("GET", f"{WATCH}/state"): Recipe(_get(f"{W}/state?timeout=0.1"), 409),
        ("GET", f"{WATCH}/snapshots"): Recipe(_get(f"{W}/snapshots"), 409),
    }
)


@pytest.fixture
def served(app_client: TestClient) -> TestClient:
    """Steppers NAME (stepped once, so it has state) and OTHER, made by the admin."""
    with calling_as(app_client, "admin"):
        values = initial_values()
        create(app_client, {**SPEC, "name": NAME}, values)
        create(app_client, {**SPEC, "name": OTHER}, values)
        assert (
            step(app_client, NAME, {k: torch.ones_like(v) for k, v in values.items()}).status_code
            == 200
        )
        r = app_client.post(f"{V1}/{NAME}/snapshots", json={"name": "snap1"})
        assert r.status_code == 201, r.text
        SNAPSHOT_FILE["snap1"] = app_client.get(f"{V1}/{NAME}/snapshots/snap1").content
    return app_client


def expected(kind: str, route: Endpoint) -> int | None:
    """401/403 where the caller must be refused; None where the recipe must succeed."""
    if route.scope == "public":
        return None
    scope, reaches = KINDS[kind]
    if scope is None:
        return 401
    assert route.scope is not None
    if RANK[scope] < RANK[route.scope]:
        return 403
    if not reaches and RECIPES[(route.method, route.path)].names_stepper:
        return 403
    return None


# ---------------------------------------------------------------------- the matrix


def test_every_route_declares_its_documented_scope() -> None:
    declared = {(e.method, e.path): e.scope for e in ENDPOINTS}
    undeclared = sorted(k for k, v in declared.items() if v is None)
    assert not undeclared, f"routes without Depends(require(...)): {undeclared}"
    assert declared == SCOPES
    assert set(RECIPES) == set(SCOPES)


def test_the_route_inventory_covers_the_openapi_document(app_client: TestClient) -> None:
    """endpoints() (which the matrix and the middleware use) misses no documented route."""
    with calling_as(app_client, "none"):
        doc = app_client.get("/openapi.json").json()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented <= {(e.method, e.path) for e in ENDPOINTS}
    assert len(documented) >= 13


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("route", ENDPOINTS, ids=lambda e: f"{e.method} {e.path}")
def test_auth_matrix(served: TestClient, route: Endpoint, kind: str) -> None:
    recipe = RECIPES.get((route.method, route.path))
    assert recipe is not None, f"no recipe for {route}: add it to RECIPES and SCOPES"
    before = everything(served)
    with calling_as(served, kind):
        r = recipe.send(served)
    want = expected(kind, route)
    if want == 401:
        assert_problem(r, "unauthorized")
        assert r.headers["www-authenticate"].startswith('Bearer realm="adamscope"')
    elif want == 403:
        assert_problem(r, "forbidden")
    else:
        assert r.status_code == recipe.status, r.text
        return
    assert everything(served) == before  # a refused request changes nothing


def test_install_refuses_a_route_without_a_scope() -> None:
    app = FastAPI()

    @app.get("/open", dependencies=[Depends(require("public"))])
    async def open_route() -> dict[str, str]:
        return {}

    @app.post("/forgotten")
    async def forgotten() -> dict[str, str]:
        return {}

    with pytest.raises(RuntimeError, match=r"routes without an access scope: POST /forgotten"):
        access.install(app, TokenTable())
    with pytest.raises(ValueError, match="unknown scope 'owner'"):
        require("owner")


# ---------------------------------------------------------------------- 401 and 403 details


@pytest.mark.parametrize(
    ("header", "detail", "challenge"),
    [
        (None, "needs a bearer token", 'Bearer realm="adamscope"'),
        ("Basic dXNlcjpwYXNz", "must be 'Bearer <token>'", 'error="invalid_request"'),
        ("Bearer", "must be 'Bearer <token>'", 'error="invalid_request"'),
        ("Bearer   ", "must be 'Bearer <token>'", 'error="invalid_request"'),
        (f"Bearer {TOKENS['admin']}x", "not valid", 'error="invalid_token"'),
        (f"Bearer {TOKENS['admin'][:-1]}", "not valid", 'error="invalid_token"'),
    ],
)
def test_unauthenticated_requests_get_401_before_anything_else(
    served: TestClient, header: str | None, detail: str, challenge: str
) -> None:
    """401 comes before 404 (existence does not leak) and before the body is parsed."""
    headers = {"authorization": header} if header is not None else {}
    for r in (
        served.get(f"{V1}/{NAME}", headers=headers),
        served.get(f"{V1}/no-such-stepper", headers=headers),
        served.get("/v1/no-such-route", headers=headers),
        served.patch(
            f"{V1}/{NAME}/hyperparameters",
            content=b"{not json",
            headers={**headers, "content-type": "application/json"},
        ),
    ):
        assert_problem(r, "unauthorized", detail)
        assert challenge in r.headers["www-authenticate"]


def test_public_routes_stay_public_behind_a_root_path(settings: Settings) -> None:
    with TestClient(create_app(settings), root_path="/adamscope") as c:
        assert c.get("/adamscope/healthz").status_code == 200
        assert_problem(c.get(f"/adamscope{V1}"), "unauthorized")
        with calling_as(c, "read"):
            assert c.get(f"/adamscope{V1}").status_code == 200


def test_scheme_is_case_insensitive(served: TestClient) -> None:
    r = served.get(f"{V1}/{NAME}", headers={"authorization": f"bearer {TOKENS['read']}"})
    assert r.status_code == 200, r.text


def test_insufficient_scope_is_403_naming_both_scopes(served: TestClient) -> None:
    with calling_as(served, "read"):
        r = step(served, NAME, {"b": torch.ones(3)})
    body = assert_problem(
        r, "forbidden", "token 'dashboard' has scope read", f"POST {V1}/{NAME}/step needs write"
    )
    assert body["required_scope"] == "write" and body["scope"] == "read"
    assert r.headers["www-authenticate"] == (
        'Bearer realm="adamscope", error="insufficient_scope", scope="write"'
    )


def test_prefix_restricts_every_stepper_route_existing_or_not(served: TestClient) -> None:
    with calling_as(served, "prefix_ok"):
        for name in (OTHER, "no-such-stepper"):  # outside the prefix: 403 either way
            body = assert_problem(
                served.get(f"{V1}/{name}"),
                "forbidden",
                "token 'team-a' only reaches steppers whose name starts "
                f"with 'team-a-'; '{name}' does not",
            )
            assert body["prefix"] == "team-a-"
        assert_problem(served.get(f"{V1}/team-a-missing"), "stepper_not_found")
        assert served.get(f"{V1}/{NAME}").status_code == 200
        r = served.post(V1, json={**SPEC, "name": "team-b-new"})
        assert_problem(r, "forbidden", "'team-b-new' does not")
    with calling_as(served, "admin"):
        assert "team-b-new" not in registered(served)


@pytest.mark.parametrize(
    ("prefix", "name", "reached"),
    [
        ("team-a", "team-a", True),
        ("team-a", "team-a-run1", True),
        ("team-a", "team-a.run1", True),
        ("team-a", "team-a_run1", True),
        ("team-a", "team-abc", False),
        ("team-a", "team-ab-x", False),
        ("team-a", "team-", False),
        ("team-a", "team", False),
        ("team-a-", "team-a-run1", True),
        ("team-a-", "team-a", False),
        ("team-a-", "team-abc", False),
        ("team.", "team.x", True),
        ("team.", "team-x", False),
        (None, "anything", True),
    ],
)
def test_a_prefix_ends_at_a_separator(prefix: str | None, name: str, reached: bool) -> None:
    """A prefix is a namespace: 'team-a' must never reach another team's 'team-abc'."""
    assert auth.Principal("t", "read", prefix).reaches(name) is reached


def test_team_boundaries_hold_over_http_and_whoami_says_what_a_token_reaches(
    tmp_path: Path,
) -> None:
    team = "team-a-unseparated-0123456789"
    settings = Settings(
        data_dir=tmp_path / "data",
        device="cpu",
        tokens=[*CONFIG, {"token": team, "scope": "admin", "prefix": "team-a", "name": "a-team"}],
    )
    with TestClient(create_app(settings)) as client:
        with calling_as(client, "admin"):
            for n in ("team-a", "team-a-run1", "team-abc"):
                create(client, {**SPEC, "name": n}, initial_values())
        client.headers["authorization"] = f"Bearer {team}"
        assert registered(client) == ["team-a", "team-a-run1"]
        assert client.get(f"{V1}/team-a-run1").status_code == 200
        body = assert_problem(
            client.get(f"{V1}/team-abc"),
            "forbidden",
            "token 'a-team' only reaches the stepper 'team-a' and steppers "
            "whose name starts with 'team-a-', 'team-a.' or 'team-a_'; "
            "'team-abc' does not",
        )
        assert body["prefix"] == "team-a"
        assert_problem(client.post(V1, json={**SPEC, "name": "team-abd"}), "forbidden")
        who = client.get("/v1/whoami").json()
        assert who["prefix"] == "team-a" and who["reaches"] == (
            "the stepper 'team-a' and steppers whose name starts with 'team-a-', 'team-a.' "
            "or 'team-a_'"
        )


@pytest.mark.parametrize(
    ("kind", "visible"),
    [
        ("read", [NAME, OTHER]),
        ("admin", [NAME, OTHER]),
        ("prefix_ok", [NAME]),
        ("wrong_prefix", [OTHER]),
    ],
)
def test_list_shows_only_the_steppers_a_token_reaches(
    served: TestClient, kind: str, visible: list[str]
) -> None:
    with calling_as(served, kind):
        assert registered(served) == visible


def test_openapi_documents_scopes_and_auth_problems(served: TestClient) -> None:
    doc = served.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "a token from the service's configuration",
    }
    for (method, path), scope in SCOPES.items():
        op = doc["paths"].get(path, {}).get(method.lower())
        if op is None:  # FastAPI's own documentation routes are not in the document
            assert scope == "public"
            continue
        assert op["x-adamscope-scope"] == scope
        if scope == "public":
            assert op["security"] == [] and "401" not in op["responses"]
        else:
            assert op["security"] == [{"HTTPBearer": [scope]}]
            assert "`unauthorized`" in op["responses"]["401"]["description"]
            assert "`forbidden`" in op["responses"]["403"]["description"]


# ---------------------------------------------------------------------- tokens and secrecy


def test_lookup_compares_every_token_in_constant_time(
    served: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each lookup runs hmac.compare_digest on 32-byte digests once per configured token,
    whichever token (if any) matches: no early exit, no length leak."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    table = served.app.state.access  # type: ignore[attr-defined]
    for presented in (TOKENS["read"], TOKENS["prefix_ok"], "x" * 300, ""):
        calls.clear()
        found = table.lookup(presented)
        assert calls == [(32, 32)] * len(CONFIG)
        assert (found is not None) == (presented in TOKENS.values())
    calls.clear()
    with calling_as(served, "write"):
        assert served.get(f"{V1}/{NAME}").status_code == 200
    assert calls == [(32, 32)] * len(CONFIG)  # one lookup per request


def test_tokens_never_appear_in_logs_reprs_or_problems(
    served: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies = []
    for kind in KINDS:
        with calling_as(served, kind):
            bodies += [
                served.get(f"{V1}/{NAME}").text,
                step(served, OTHER, {}).text,
                served.post(V1, json={**SPEC, "name": "team-b-x"}).text,
            ]
    assert "401 GET /v1/steppers/team-a-net" in caplog.text  # denials are logged...
    settings = served.app.state.settings  # type: ignore[attr-defined]
    text = "\n".join(
        [
            caplog.text,
            *bodies,
            repr(settings),
            str(settings),
            repr(served.app.state.access.principals()),
        ]
    )  # type: ignore[attr-defined]
    for token in TOKENS.values():
        assert token not in text  # ...without the token


def test_server_logs_at_trace_level_never_show_tokens(tmp_path: Path) -> None:
    """A real `adamscope serve` with uvicorn's most verbose logging (access lines and ASGI
    messages): the tokens sent, valid or not, are nowhere in its output."""
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps(CONFIG))
    out = spawn_cli(
        tmp_path / "data",
        "--tokens-file",
        str(tokens_file),
        "--log-level",
        "trace",
        requests=[
            ("GET", V1, TOKENS["read"]),
            ("GET", V1, "wrong-token-0123456789abcdef"),
            ("POST", f"{V1}/x/step", TOKENS["read"]),
        ],
    )
    assert (
        "access control: 5 bearer token(s) configured (3 admin, 1 write, 1 read; "
        "2 restricted to a name prefix)" in out
    )
    assert '"GET /v1/steppers HTTP/1.1" 200' in out and " 401" in out and " 403" in out
    assert "ASGI [" in out  # trace logging really was on
    for token in [*TOKENS.values(), "wrong-token-0123456789abcdef"]:
        assert token not in out


# ---------------------------------------------------------------------- loopback rule


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAMSCOPE_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adamscope.service.cli", "serve", *args],
        cwd=ROOT,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def spawn_cli(
    data_dir: Path,
    *args: str,
    requests: Sequence[tuple[str, str, str]] = (),
    statuses: list[int] | None = None,
) -> str:
    """Run ``adamscope serve`` on 127.0.0.1, make ``requests`` (method, path, token; their
    statuses go to ``statuses``), stop it, and return everything it printed."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "adamscope.service.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        *args,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "server exited early"
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        for method, path, token in requests:
            r = httpx.request(
                method,
                url + path,
                timeout=10,
                headers={"authorization": f"Bearer {token}"} if token else {},
            )
            if statuses is not None:
                statuses.append(r.status_code)
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    return out


def test_without_tokens_a_non_loopback_host_refuses_to_start(tmp_path: Path) -> None:
    """The console command, as a process: exit status 2 and why, before anything starts."""
    data = tmp_path / "data"
    result = run_cli("--host", "0.0.0.0", "--port", "8470", "--data-dir", str(data))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(
        "adamscope: error: refusing to serve on 0.0.0.0 without "
        "access tokens: every client that can reach it would have "
        "admin rights"
    )
    assert "--insecure-no-auth" in result.stderr and "ADAMSCOPE_TOKENS_FILE" in result.stderr
    assert result.stdout == ""
    assert not data.exists()  # refused before touching anything


@pytest.fixture
def no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("ADAMSCOPE_"):
            monkeypatch.delenv(key)


@pytest.mark.parametrize(
    "args", [["--host", "::"], ["--host", "example.com"], ["--host", "0.0.0.0", "--per-gpu"]]
)
def test_cli_refuses_other_exposed_hosts_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_token_env: None, args: list[str]
) -> None:
    """The same check in process (no bind is attempted: it fails before uvicorn starts)."""
    assert cli.main(["serve", *args, "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"adamscope: error: refusing to serve on {args[1]} without")
    assert not (tmp_path / "d").exists()


def test_per_gpu_workers_get_the_tokens(tmp_path: Path) -> None:
    """--per-gpu hands --tokens-file on to its workers (here: one CPU worker)."""
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps(CONFIG))
    statuses: list[int] = []
    out = spawn_cli(
        tmp_path / "data",
        "--per-gpu",
        "--tokens-file",
        str(tokens_file),
        "--log-level",
        "warning",
        statuses=statuses,
        requests=[("GET", V1, ""), ("GET", V1, TOKENS["read"])],
    )
    assert statuses == [401, 200], out
    assert "access control: 5 bearer token(s) configured" in out


def test_without_tokens_loopback_serves_and_says_everyone_is_admin(tmp_path: Path) -> None:
    out = spawn_cli(tmp_path / "data")
    assert "no tokens configured: serving on loopback only, every client has admin rights" in out


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert auth.is_loopback(host) is loopback


def test_binding_rule_and_banners() -> None:
    def check(**kw: Any) -> tuple[str | None, str]:
        s = Settings(device="cpu", **kw)
        table = load_access(s)
        return auth.binding_problem(s, table), auth.banner(s, table)

    problem, _ = check(host="0.0.0.0")
    assert problem is not None and "refusing to serve on 0.0.0.0" in problem
    problem, line = check(host="0.0.0.0", insecure_no_auth=True)
    assert problem is None
    assert line.startswith("WARNING: no tokens configured") and "0.0.0.0" in line
    problem, line = check(host="0.0.0.0", tokens=CONFIG[:2])
    assert problem is None
    assert line == "access control: 2 bearer token(s) configured (1 write, 1 read)"


def test_the_docker_image_needs_tokens(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_token_env: None,
) -> None:
    """The image serves 0.0.0.0: its CMD refuses to start without tokens, and passes the
    check with ADAMSCOPE_TOKENS_FILE, as the Dockerfile documents (binding 0.0.0.0 for real
    is not something a test does)."""
    cmd = json.loads(next(a for kw, a in reversed(instructions()) if kw == "CMD"))
    assert cmd[:2] == ["adamscope", "serve"] and "0.0.0.0" in cmd
    assert cli.main(cmd[1:]) == 2
    assert "refusing to serve on 0.0.0.0" in capsys.readouterr().err

    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(f'[[tokens]]\ntoken = "{TOKENS["admin"]}"\nscope = "admin"\n')
    monkeypatch.setenv("ADAMSCOPE_TOKENS_FILE", str(tokens_file))
    args = build_parser().parse_args(cmd[1:])
    s = Settings(host=args.host, data_dir=args.data_dir)
    assert auth.binding_problem(s, load_access(s)) is None
    assert "-e ADAMSCOPE_TOKENS_FILE=" in (ROOT / "Dockerfile").read_text()


# ---------------------------------------------------------------------- configuration


def test_tokens_from_environment_json_and_toml_files_combine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    json_file = tmp_path / "tokens.json"
    json_file.write_text(json.dumps({"tokens": CONFIG[1:3]}))
    toml_file = tmp_path / "tokens.toml"
    toml_file.write_text(
        f'# team tokens\n[[tokens]]\ntoken = "{TOKENS["wrong_prefix"]}"\n'
        'scope = "admin"\nprefix = "team-b-"\n'
    )
    assert [t.scope for t in load_tokens_file(json_file)] == ["write", "admin"]
    (spec,) = load_tokens_file(toml_file)
    assert spec.prefix == "team-b-" and spec.token.get_secret_value() == TOKENS["wrong_prefix"]

    monkeypatch.setenv("ADAMSCOPE_TOKENS", json.dumps(CONFIG[:1]))
    monkeypatch.setenv("ADAMSCOPE_TOKENS_FILE", str(toml_file))
    table = load_access(Settings(device="cpu"))
    assert [(p.label, p.scope, p.prefix) for p in table.principals()] == [
        ("dashboard", "read", None),
        ("tokens.toml[0]", "admin", "team-b-"),
    ]
    assert table.lookup(TOKENS["read"]) is not None
    assert table.lookup(TOKENS["wrong_prefix"]) is not None
    assert table.lookup(TOKENS["write"]) is None


TOKEN = "a-valid-token-0123456789"


def entries(*items: dict[str, Any]) -> str:
    return json.dumps(list(items))


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("missing.json", None, "no such file"),
        (
            "bad.json",
            entries({"token": TOKEN, "scope": "read"})[:-1],
            "invalid JSON: Expecting ',' delimiter (line 1, column",
        ),
        ("bad.toml", f'[[tokens]]\ntoken = "{TOKEN}\n', "invalid TOML"),
        (
            "shape.json",
            json.dumps({"token": TOKEN, "scope": "read"}),
            "expected a 'tokens' list and nothing else; unexpected key(s): scope, token",
        ),
        ("shape.toml", f'token = "{TOKEN}"\n', "unexpected key(s): token"),
        ("notlist.json", json.dumps({"tokens": TOKEN}), "tokens must be a list of token objects"),
        ("empty.json", "[]", "lists no tokens"),
        ("noscope.json", entries({"token": TOKEN}), "tokens[0].scope: Field required"),
        (
            "scope.json",
            entries({"token": TOKEN, "scope": "owner"}),
            "tokens[0].scope: Input should be 'read', 'write' or 'admin'",
        ),
        (
            "short.json",
            entries({"token": "abc", "scope": "read"}),
            "tokens[0].token: Value error, a token needs at least 16 characters",
        ),
        (
            "space.json",
            entries({"token": "has a space in it!!", "scope": "read"}),
            "may only contain A-Z a-z 0-9",
        ),
        (
            "typo.json",
            entries({"token": TOKEN, "scopes": "read"}),
            "tokens[0].scopes: Extra inputs are not permitted",
        ),
        (
            "prefix.json",
            entries({"token": TOKEN, "scope": "read", "prefix": "team/a"}),
            "tokens[0].prefix: String should match pattern",
        ),
        (
            "twice.json",
            entries({"token": TOKEN, "scope": "read"}, {"token": TOKEN, "scope": "admin"}),
            "twice.json[1] repeats the token of twice.json[0]",
        ),
    ],
)
def test_token_file_errors_are_clear_and_never_echo_tokens(
    tmp_path: Path, name: str, content: str | None, fragment: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenConfigError) as caught:
        load_access(Settings(device="cpu", tokens_file=path))
    message = str(caught.value)
    assert fragment in message
    assert str(path.name) in message
    assert TOKEN not in message and "has a space" not in message


def test_cli_reports_token_errors_and_exits_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_token_env: None,
) -> None:
    bad = tmp_path / "tokens.json"
    bad.write_text(entries({"token": TOKEN, "scope": "owner"}))
    result = run_cli("--tokens-file", str(bad), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"adamscope: error: tokens file {bad}: tokens[0].scope")

    def serve() -> str:
        assert cli.main(["serve", "--data-dir", str(tmp_path / "d")]) == 2
        return capsys.readouterr().err

    monkeypatch.setenv("ADAMSCOPE_TOKENS", entries({"token": "tooshort", "scope": "read"}))
    err = serve()
    assert "settings.tokens[0].token: Value error, a token needs at least 16" in err
    assert "tooshort" not in err
    monkeypatch.setenv("ADAMSCOPE_TOKENS", entries({"token": TOKEN})[:-2])
    err = serve()
    assert "ADAMSCOPE_TOKENS takes a JSON list" in err and "line 1 column" in err
    assert TOKEN not in err
    assert not (tmp_path / "d").exists()


def test_an_empty_token_list_in_the_environment_stops_the_service(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_token_env: None,
) -> None:
    """ADAMSCOPE_TOKENS='[]' is a mistake (a template that rendered nothing), not a wish to
    run without tokens: it stops the service, as an empty tokens file does."""
    monkeypatch.setenv("ADAMSCOPE_TOKENS", " [ ] ")
    with pytest.raises(TokenConfigError, match="ADAMSCOPE_TOKENS lists no tokens"):
        create_app(Settings(device="cpu", data_dir=tmp_path / "d"))
    assert cli.main(["serve", "--data-dir", str(tmp_path / "d")]) == 2
    assert "ADAMSCOPE_TOKENS lists no tokens" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    monkeypatch.delenv("ADAMSCOPE_TOKENS")  # left out: loopback only, as documented
    assert not load_access(Settings(device="cpu")).enabled


def test_create_app_fails_fast_on_a_bad_tokens_file(tmp_path: Path) -> None:
    with pytest.raises(TokenConfigError, match="no such file"):
        create_app(Settings(device="cpu", tokens_file=tmp_path / "nope.json"))


# ---------------------------------------------------------------------- clients


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real uvicorn on 127.0.0.1 with CONFIG's tokens and stepper NAME."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("guarded"), device="cpu", tokens=CONFIG)
    with run_uvicorn(settings) as server:
        with Client(server.url, token=TOKENS["admin"]) as admin:
            admin.create(NAME, initial_values(), lr=0.01)
        yield server.url


def test_client_sends_its_token(guarded: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAMSCOPE_TOKEN", raising=False)
    with Client(guarded) as anonymous, pytest.raises(UnauthorizedError) as e:
        anonymous.get(NAME)
    assert e.value.status == 401 and "bearer token" in e.value.detail
    with Client(guarded, token=TOKENS["read"]) as reader:
        assert reader.get(NAME).name == NAME
        with pytest.raises(ForbiddenError, match="needs write"):
            reader.step(NAME, {"b": torch.ones(3)})
        assert "[secure]" in repr(reader._http.headers)  # httpx masks it
    monkeypatch.setenv("ADAMSCOPE_TOKEN", TOKENS["write"])
    with Client(guarded) as from_env:
        assert from_env.step(NAME, {"b": torch.ones(3)}).stepped == ["b"]
    with Client(guarded, token=TOKENS["read"]) as explicit, pytest.raises(ForbiddenError):
        explicit.reset_state(NAME)  # the argument beats the environment
    own = httpx.Client(base_url=guarded, headers={"authorization": f"Bearer {TOKENS['read']}"})
    with own, Client(http_client=own) as keeps, pytest.raises(ForbiddenError):
        keeps.reset_state(NAME)  # the environment's token does not replace a caller's header


def test_async_client_and_remote_adam_send_tokens(
    guarded: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    monkeypatch.delenv("ADAMSCOPE_TOKEN", raising=False)

    async def main() -> None:
        async with AsyncClient(guarded, token=TOKENS["prefix_ok"]) as c:
            assert [s.name for s in await c.list()] == [NAME]
        async with AsyncClient(guarded) as c:
            with pytest.raises(UnauthorizedError):
                await c.list()

    asyncio.run(main())
    w = torch.nn.Parameter(torch.ones(4))
    opt = RemoteAdam(
        [("w", w)], lr=0.1, url=guarded, name="team-a-remote", token=TOKENS["prefix_ok"]
    )
    try:
        w.grad = torch.ones(4)
        opt.step()
        assert torch.all(w < 1)
    finally:
        opt.close()
    with pytest.raises(ForbiddenError, match="'team-b-remote' does not"):
        RemoteAdam(
            [torch.nn.Parameter(torch.ones(2))],
            url=guarded,
            name="team-b-remote",
            token=TOKENS["prefix_ok"],
        )
