"""Who reaches what, without HTTP: a token's scope rank and its stepper-name prefix
(service.auth.Principal), and the constant-time token table.

A prefix restricts a token to the steppers whose name *begins* with it. Every other test
names its steppers so that they begin with their prefix (``team-a-net``), so a rule that
only asks whether the prefix appears *somewhere* in the name would pass them all: these
cases put the prefix in the middle of a name, glued to the front of one, and around it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr
from starlette.requests import Request

from adamscope.service.api.access import principal
from adamscope.service.auth import (
    ANONYMOUS_ADMIN,
    RANK,
    Principal,
    TokenConfigError,
    TokenSpec,
    TokenTable,
    banner,
    binding_problem,
    load_tokens_file,
)
from adamscope.service.settings import Settings

TEAM_A = Principal("team-a", "admin", "team-a-")


@pytest.mark.parametrize("name", ["team-a-net", "team-a-x.y_z", "team-a-team-b-net"])
def test_a_prefix_reaches_the_names_that_begin_with_it(name: str) -> None:
    assert TEAM_A.reaches(name)


@pytest.mark.parametrize(
    "name",
    [
        "x-team-a-anything",  # the prefix in the middle of the name
        "xteam-a-net",  # glued to the end of another word
        "team-b-team-a-net",  # after another team's prefix
        "net-team-a-",  # at the very end
        "team-a",  # the prefix without its separator
        "team-b-net",
        "Team-a-net",
        "TEAM-A-NET",
        "",
    ],
)
def test_a_prefix_does_not_reach_names_that_merely_contain_it(name: str) -> None:
    assert not TEAM_A.reaches(name)


def test_no_prefix_reaches_every_name() -> None:
    for p in (Principal("operator", "admin"), Principal("reader", "read"), ANONYMOUS_ADMIN):
        assert p.prefix is None
        assert all(p.reaches(n) for n in ("team-a-net", "x-team-a-anything", "net", ""))


@pytest.mark.parametrize(
    ("scope", "allowed"),
    [
        ("read", {"public", "read"}),
        ("write", {"public", "read", "write"}),
        ("admin", {"public", "read", "write", "admin"}),
    ],
)
def test_a_scope_includes_exactly_the_ones_below_it(scope: str, allowed: set[str]) -> None:
    p = Principal("p", scope)
    assert {level for level in RANK if p.allows(level)} == allowed


def _spec(token: str, scope: str, prefix: str | None = None) -> TokenSpec:
    return TokenSpec(token=SecretStr(token), scope=scope, prefix=prefix)  # type: ignore[arg-type]


def test_the_table_finds_each_token_and_nothing_else() -> None:
    table = TokenTable(
        [
            (_spec("read-token-0123456789", "read"), "r"),
            (_spec("team-a-token-0123456789", "write", "team-a-"), "a"),
            (_spec("admin-token-0123456789", "admin"), "adm"),
        ]
    )
    assert table.enabled and len(table) == 3
    assert table.lookup("read-token-0123456789") == Principal("r", "read")
    # The last entry matches too: the lookup compares every entry and keeps the match.
    assert table.lookup("admin-token-0123456789") == Principal("adm", "admin")
    found = table.lookup("team-a-token-0123456789")
    assert found == Principal("a", "write", "team-a-")
    assert found is not None and not found.reaches("x-team-a-anything")
    for presented in (
        "read-token-012345678",
        "read-token-01234567890",
        "READ-TOKEN-0123456789",
        "",
        "team-a-",
        "тoken-0123456789abcdef",
    ):  # not even latin-1: None
        assert table.lookup(presented) is None
    assert not TokenTable().enabled and TokenTable().lookup("anything") is None


# ---------------------------------------------------------------------- token files

TOKEN = "file-token-0123456789"
SHAPE = '({"token", "scope", "prefix"?, "name"?})'


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "extra.json",
            {"tokens": [{"token": TOKEN, "scope": "read"}], "x": 1},
            "expected a 'tokens' list and nothing else; unexpected key(s): x",
        ),
        ("empty-object.json", {}, "expected a 'tokens' list and nothing else"),
        ("number.json", {"tokens": 5}, f"tokens must be a list of token objects {SHAPE}, not int"),
        (
            "none.json",
            [],
            "lists no tokens (remove the setting to serve without tokens, on loopback only)",
        ),
        (
            "two.json",
            [{"token": "short", "scope": "owner"}],
            "tokens[0].token: Value error, a token needs at least 16 characters; "
            "tokens file {path}: tokens[0].scope: Input should be 'read', 'write' or 'admin'",
        ),
    ],
)
def test_token_files_say_exactly_what_is_wrong(
    tmp_path: Path, name: str, content: object, message: str
) -> None:
    path = tmp_path / name
    path.write_text(json.dumps(content))
    with pytest.raises(TokenConfigError) as info:
        load_tokens_file(path)
    assert str(info.value) == f"tokens file {path}: " + message.replace("{path}", str(path))


def test_unreadable_token_files_say_why(tmp_path: Path) -> None:
    binary = tmp_path / "latin1.json"
    binary.write_bytes(b'[{"token": "caf\xe9-0123456789abcdef", "scope": "read"}]')
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    for path, message in [
        (tmp_path, "is a directory"),
        (binary, "not UTF-8 text"),
        (tmp_path / "gone.json", "no such file"),
    ]:
        with pytest.raises(TokenConfigError) as info:
            load_tokens_file(path)
        assert str(info.value) == f"tokens file {path}: {message}"
    with pytest.raises(TokenConfigError) as invalid:
        load_tokens_file(bad)
    assert str(invalid.value).endswith("(line 1, column 3); use a .toml suffix for TOML")


def test_the_binding_refusal_and_the_banners_in_full() -> None:
    open_host = Settings(device="cpu", host="0.0.0.0")
    assert binding_problem(open_host, TokenTable()) == (
        "refusing to serve on 0.0.0.0 without access tokens: every client that can reach "
        "it would have admin rights. Configure tokens (--tokens-file PATH, "
        "ADAMSCOPE_TOKENS_FILE or ADAMSCOPE_TOKENS), bind to 127.0.0.1, or pass "
        "--insecure-no-auth (ADAMSCOPE_INSECURE_NO_AUTH=1) to serve without authentication"
    )
    assert banner(open_host.model_copy(update={"insecure_no_auth": True}), TokenTable()) == (
        "WARNING: no tokens configured and authentication disabled (insecure_no_auth): "
        "serving on 0.0.0.0, every client has admin rights"
    )
    assert banner(Settings(device="cpu"), TokenTable()) == (
        "no tokens configured: serving on loopback only, every client has admin rights"
    )
    table = TokenTable(
        [
            (_spec("read-token-0123456789", "read"), "r"),
            (_spec("admin-token-0123456789", "admin", "team-a-"), "a"),
            (_spec("admin-token-9876543210", "admin"), "b"),
        ]
    )
    assert banner(open_host, table) == (
        "access control: 3 bearer token(s) configured (2 "
        "admin, 1 read; 1 restricted to a name prefix)"
    )


def test_a_request_the_middleware_did_not_authenticate_fails_closed() -> None:
    request = Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/v1/steppers",
            "headers": [],
            "query_string": b"",
        }
    )
    with pytest.raises(RuntimeError) as info:
        principal(request)
    assert str(info.value) == (
        "/v1/steppers was not authenticated: the access middleware is "
        "not installed or thinks the path is public"
    )
