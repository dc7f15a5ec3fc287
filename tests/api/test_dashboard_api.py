"""The dashboard's files as the service serves them, and ``GET /v1/whoami``.

The dashboard must load nothing from another origin (it works offline, and its
Content-Security-Policy forbids it), every file it references must be served, and the files
must ship in the distribution. ``whoami`` tells a page what its token may do, without ever
echoing the token.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_support import assert_problem
from fastapi.testclient import TestClient

from adamscope.service.api.routes.dashboard import ASSETS, PAGE
from adamscope.service.app import create_app
from adamscope.service.dashboard import static
from adamscope.service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "service" / "dashboard" / "static"

READ = "dashboard-read-0123456789abcdef"
ADMIN = "dashboard-admin-0123456789abcdef"
TEAM = "dashboard-team-0123456789abcdef"
TOKENS = [
    {"token": READ, "scope": "read", "name": "viewer"},
    {"token": ADMIN, "scope": "admin", "name": "operator"},
    {"token": TEAM, "scope": "write", "prefix": "team-a-"},
]


def url(file: str) -> str:
    return PAGE if file == "index.html" else f"{PAGE}/{file}"


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(
        create_app(Settings(data_dir=tmp_path / "d", device="cpu", tokens=TOKENS))
    ) as c:
        yield c


def test_every_file_of_the_dashboard_is_served_and_nothing_else() -> None:
    on_disk = {p.name for p in STATIC.iterdir() if p.is_file()}
    assert on_disk == set(ASSETS)
    assert {p.name for p in static().iterdir()} == on_disk  # the package's own copy


@pytest.mark.parametrize("file", sorted(ASSETS))
def test_files_are_public_with_their_type_and_a_strict_policy(
    guarded: TestClient, file: str
) -> None:
    r = guarded.get(url(file))  # no token: the files hold no data
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == ASSETS[file]
    assert r.content == (STATIC / file).read_bytes()
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    again = guarded.get(url(file), headers={"if-none-match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_the_dashboard_references_only_its_own_files() -> None:
    """No CDN, no other origin; every script, stylesheet and module import is served."""
    texts = {f: (STATIC / f).read_text(encoding="utf-8") for f in ASSETS}
    for file, text in texts.items():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), file
    html = texts["index.html"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "dashboard/app.js" in refs and "dashboard/style.css" in refs
    for ref in refs:
        if ref.startswith("data:"):
            continue
        assert ref.startswith("dashboard/"), f"{ref}: relative to the page, so a --root-path works"
        assert ref.removeprefix("dashboard/") in ASSETS, ref
    imports = {
        m
        for f, t in texts.items()
        if f.endswith(".js")
        for m in re.findall(r'from "\./([^"]+)"', t)
    }
    assert imports and imports <= set(ASSETS), imports - set(ASSETS)


def test_the_token_is_never_put_in_a_url() -> None:
    """The page keeps the token in sessionStorage and sends it as a header only."""
    js = "\n".join((STATIC / f).read_text() for f in ASSETS if f.endswith(".js"))
    assert "sessionStorage" in js and "Authorization" in js
    assert "localStorage" not in js
    assert not re.search(r"searchParams\.[a-z]+\([^)]*token", js, re.I)
    assert not re.search(r"[?&]token=", js)


def test_the_files_ship_in_the_distribution() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = data["package-data"]["adamscope.service.dashboard"]
    for f in ASSETS:
        assert any(fnmatch.fnmatch(f"static/{f}", p) for p in patterns), f


# ---------------------------------------------------------------------- whoami


def test_whoami_without_tokens_is_the_local_admin(app_client: TestClient) -> None:
    r = app_client.get("/v1/whoami")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "name": "anonymous (no tokens configured)",
        "scope": "admin",
        "prefix": None,
        "reaches": "every stepper",
        "tokens": False,
    }


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (READ, {"name": "viewer", "scope": "read", "prefix": None, "reaches": "every stepper"}),
        (ADMIN, {"name": "operator", "scope": "admin", "prefix": None, "reaches": "every stepper"}),
        (
            TEAM,
            {
                "name": "ADAMSCOPE_TOKENS[2]",
                "scope": "write",
                "prefix": "team-a-",
                "reaches": "steppers whose name starts with 'team-a-'",
            },
        ),
    ],
)
def test_whoami_names_the_tokens_scope_and_prefix(
    guarded: TestClient, token: str, expected: dict[str, object]
) -> None:
    r = guarded.get("/v1/whoami", headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.json() == {**expected, "tokens": True}
    assert token not in r.text


def test_whoami_needs_a_valid_token_when_tokens_are_configured(guarded: TestClient) -> None:
    assert_problem(guarded.get("/v1/whoami"), "unauthorized")
    r = guarded.get("/v1/whoami", headers={"authorization": "Bearer not-a-token-0123456789"})
    assert_problem(r, "unauthorized", "not valid")
