"""Who reaches what, without HTTP: a token's scope rank and its stepper-name prefix
(service.auth.Principal), and the constant-time token table.

A prefix restricts a token to the steppers whose name *begins* with it. Every other test
names its steppers so that they begin with their prefix (``team-a-net``), so a rule that
only asks whether the prefix appears *somewhere* in the name would pass them all: these
cases put the prefix in the middle of a name, glued to the front of one, and around it.
"""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from service.auth import ANONYMOUS_ADMIN, RANK, Principal, TokenSpec, TokenTable

TEAM_A = Principal("team-a", "admin", "team-a-")


@pytest.mark.parametrize("name", ["team-a-net", "team-a-x.y_z", "team-a-team-b-net"])
def test_a_prefix_reaches_the_names_that_begin_with_it(name: str) -> None:
    assert TEAM_A.reaches(name)


@pytest.mark.parametrize("name", [
    "x-team-a-anything",  # the prefix in the middle of the name
    "xteam-a-net",  # glued to the end of another word
    "team-b-team-a-net",  # after another team's prefix
    "net-team-a-",  # at the very end
    "team-a",  # the prefix without its separator
    "team-b-net", "Team-a-net", "TEAM-A-NET", "",
])
def test_a_prefix_does_not_reach_names_that_merely_contain_it(name: str) -> None:
    assert not TEAM_A.reaches(name)


def test_no_prefix_reaches_every_name() -> None:
    for p in (Principal("operator", "admin"), Principal("reader", "read"), ANONYMOUS_ADMIN):
        assert p.prefix is None
        assert all(p.reaches(n) for n in ("team-a-net", "x-team-a-anything", "net", ""))


@pytest.mark.parametrize(("scope", "allowed"), [
    ("read", {"public", "read"}),
    ("write", {"public", "read", "write"}),
    ("admin", {"public", "read", "write", "admin"}),
])
def test_a_scope_includes_exactly_the_ones_below_it(scope: str, allowed: set[str]) -> None:
    p = Principal("p", scope)
    assert {level for level in RANK if p.allows(level)} == allowed


def _spec(token: str, scope: str, prefix: str | None = None) -> TokenSpec:
    return TokenSpec(token=SecretStr(token), scope=scope, prefix=prefix)  # type: ignore[arg-type]


def test_the_table_finds_each_token_and_nothing_else() -> None:
    table = TokenTable([
        (_spec("read-token-0123456789", "read"), "r"),
        (_spec("team-a-token-0123456789", "write", "team-a-"), "a"),
        (_spec("admin-token-0123456789", "admin"), "adm"),
    ])
    assert table.enabled and len(table) == 3
    assert table.lookup("read-token-0123456789") == Principal("r", "read")
    # The last entry matches too: the lookup compares every entry and keeps the match.
    assert table.lookup("admin-token-0123456789") == Principal("adm", "admin")
    found = table.lookup("team-a-token-0123456789")
    assert found == Principal("a", "write", "team-a-")
    assert found is not None and not found.reaches("x-team-a-anything")
    for presented in ("read-token-012345678", "read-token-01234567890", "READ-TOKEN-0123456789",
                      "", "team-a-"):
        assert table.lookup(presented) is None
    assert not TokenTable().enabled and TokenTable().lookup("anything") is None
