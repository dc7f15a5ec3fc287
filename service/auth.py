"""Access control configuration: bearer tokens, their scopes and name prefixes, and the
loopback rule for a service without tokens.

Tokens come from ``Settings.tokens`` (``ADAMSCOPE_TOKENS``, JSON) and from the file
``Settings.tokens_file`` (``ADAMSCOPE_TOKENS_FILE`` or ``adamscope serve --tokens-file``, JSON
or TOML). Each has a scope, ``read`` < ``write`` < ``admin`` (a scope includes the ones below
it), and optionally a stepper-name ``prefix`` it is restricted to.

A prefix is a namespace with a hard boundary: ``team-a`` reaches ``team-a`` and the names
that continue it after a separator (``team-a-run1``, ``team-a.run1``, ``team-a_run1``),
never ``team-abc`` (another team whose name merely starts the same). A prefix that ends
with a separator (``team-a-``) reaches the names that continue it. :meth:`Principal.reach`
says it in words, for ``/v1/whoami`` and every 403.

``ADAMSCOPE_TOKENS`` set to an empty list stops the service at start, as a tokens file
listing none does: an empty list is a configuration mistake, not a wish to run without
tokens (for that, leave the setting out).

Presented tokens are compared in constant time against every configured token (SHA-256
digests through :func:`hmac.compare_digest`, no early exit), and no token value is ever put
in a log line, an error message or a ``repr``: entries are identified by their label.

HTTP enforcement lives in :mod:`adamscope.service.api.access`; this module knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "ANONYMOUS_ADMIN",
    "MIN_TOKEN_LENGTH",
    "RANK",
    "Principal",
    "Scope",
    "TokenConfigError",
    "TokenSpec",
    "TokenTable",
    "banner",
    "binding_problem",
    "describe_validation_error",
    "is_loopback",
    "load_access",
    "load_tokens_file",
]

Scope = Literal["read", "write", "admin"]

#: Scope levels; "public" routes need no token at all.
RANK: dict[str, int] = {"public": 0, "read": 1, "write": 2, "admin": 3}

MIN_TOKEN_LENGTH = 16
#: RFC 6750 ``b64token``: what may follow ``Bearer `` in an Authorization header.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: A prefix is the beginning of a stepper name (see STEPPER_NAME_PATTERN).
_PREFIX_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
#: Where a name prefix may end: a prefix without one at its end reaches the names that
#: continue it after one of these (see Principal.reaches).
SEPARATORS = "-._"


class TokenConfigError(ValueError):
    """The token configuration (environment or file) cannot be used; the message says why
    and where, and never contains a token."""


class TokenSpec(BaseModel):
    """One configured token: ``{"token", "scope", "prefix"?, "name"?}``."""

    # hide_input_in_errors: a validation error must not echo a (possibly real) token.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    token: SecretStr = Field(
        description=f"at least {MIN_TOKEN_LENGTH} characters of "
        "A-Z a-z 0-9 - . _ ~ + / (RFC 6750 b64token)"
    )
    scope: Scope = Field(description="read < write < admin")
    prefix: str | None = Field(
        None,
        pattern=_PREFIX_PATTERN,
        description="only steppers in this namespace are reachable: the name itself and "
        "names continuing it after a separator (- . _)",
    )
    name: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[^\x00-\x1f]+$",
        description="label for logs and error messages",
    )

    @field_validator("token")
    @classmethod
    def _token_shape(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if len(raw) < MIN_TOKEN_LENGTH:
            raise ValueError(f"a token needs at least {MIN_TOKEN_LENGTH} characters")
        if not _B64TOKEN.fullmatch(raw):
            raise ValueError(
                "a token may only contain A-Z a-z 0-9 - . _ ~ + / "
                "(then '=' padding), as RFC 6750 allows after 'Bearer '"
            )
        return value


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a token's label, scope and prefix (never the token)."""

    label: str
    scope: str
    prefix: str | None = None

    def allows(self, required: str) -> bool:
        return RANK[self.scope] >= RANK[required]

    def reaches(self, stepper: str) -> bool:
        """Whether ``stepper`` is in the token's namespace: the prefix ends at a separator,
        so ``team-a`` reaches ``team-a`` and ``team-a-x`` but never ``team-abc``."""
        prefix = self.prefix
        if prefix is None:
            return True
        if prefix[-1] in SEPARATORS:
            return stepper.startswith(prefix)
        return stepper == prefix or (
            stepper.startswith(prefix) and stepper[len(prefix)] in SEPARATORS
        )

    def reach(self) -> str:
        """What :meth:`reaches` allows, in words."""
        prefix = self.prefix
        if prefix is None:
            return "every stepper"
        if prefix[-1] in SEPARATORS:
            return f"steppers whose name starts with {prefix!r}"
        return (
            f"the stepper {prefix!r} and steppers whose name starts with "
            + ", ".join(repr(prefix + s) for s in SEPARATORS[:-1])
            + f" or {prefix + SEPARATORS[-1]!r}"
        )


#: Every client of a service without tokens (which then serves loopback only).
ANONYMOUS_ADMIN = Principal("anonymous (no tokens configured)", "admin")


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class TokenTable:
    """The configured tokens, looked up in constant time.

    Only SHA-256 digests are kept, so every comparison is between two 32-byte strings (no
    length leak), and :meth:`lookup` compares the presented token with *every* entry.
    """

    def __init__(self, entries: Iterable[tuple[TokenSpec, str]] = ()) -> None:
        self._entries: list[tuple[bytes, Principal]] = []
        seen: dict[bytes, str] = {}
        for spec, label in entries:
            digest = _digest(spec.token.get_secret_value().encode("ascii"))
            if digest in seen:
                raise TokenConfigError(
                    f"{label} repeats the token of {seen[digest]}: each token must be unique"
                )
            seen[digest] = label
            self._entries.append(
                (digest, Principal(spec.name or label, spec.scope, spec.prefix or None))
            )

    @property
    def enabled(self) -> bool:
        """Whether tokens are configured (else every client is an unrestricted admin)."""
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def principals(self) -> list[Principal]:
        return [p for _, p in self._entries]

    def lookup(self, presented: str) -> Principal | None:
        """The principal whose token equals ``presented``, or None; constant-time in which
        entry (if any) matches."""
        digest = _digest(presented.encode("latin-1", "replace"))
        found: Principal | None = None
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest):  # no break: every entry is compared
                found = principal
        return found


def describe_validation_error(error: ValidationError, where: str) -> str:
    """``where[.loc]: message`` for each error, without the offending input values."""
    parts = []
    for e in error.errors(include_url=False, include_input=False):
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"])
        parts.append(f"{where}{loc}: {e['msg']}")
    return "; ".join(parts)


def _validated(entries: Any, where: str) -> list[TokenSpec]:
    if not isinstance(entries, list):
        raise TokenConfigError(
            f"{where} must be a list of token objects "
            '({"token", "scope", "prefix"?, "name"?}), '
            f"not {type(entries).__name__}"
        )
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(TokenSpec.model_validate(entry))
        except ValidationError as e:
            raise TokenConfigError(describe_validation_error(e, f"{where}[{i}]")) from None
    return out


def load_tokens_file(path: Path) -> list[TokenSpec]:
    """Tokens from a JSON file (a list, or ``{"tokens": [...]}``) or a TOML file (``.toml``:
    ``[[tokens]]`` tables)."""
    where = f"tokens file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenConfigError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise TokenConfigError(f"{where}: is a directory") from None
    except PermissionError:
        raise TokenConfigError(f"{where}: permission denied") from None
    except UnicodeDecodeError:
        raise TokenConfigError(f"{where}: not UTF-8 text") from None
    data: Any
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise TokenConfigError(f"{where}: invalid TOML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TokenConfigError(
                f"{where}: invalid JSON: {e.msg} (line {e.lineno}, column {e.colno}); "
                "use a .toml suffix for TOML"
            ) from None
    if isinstance(data, dict):
        extra = sorted(set(data) - {"tokens"})
        if extra or "tokens" not in data:
            raise TokenConfigError(
                f"{where}: expected a 'tokens' list and nothing else"
                + (f"; unexpected key(s): {', '.join(extra)}" if extra else "")
            )
        data = data["tokens"]
    tokens = _validated(data, f"{where}: tokens")
    if not tokens:
        raise TokenConfigError(
            f"{where}: lists no tokens (remove the setting to serve "
            "without tokens, on loopback only)"
        )
    return tokens


def _empty_environment_list() -> bool:
    """Whether ``ADAMSCOPE_TOKENS`` is set to a JSON list with nothing in it."""
    raw = os.environ.get("ADAMSCOPE_TOKENS")
    if raw is None:
        return False
    try:
        return bool(json.loads(raw) == [])
    except ValueError:
        return False


def load_access(settings: Settings) -> TokenTable:
    """The token table of ``settings``: ``tokens`` then ``tokens_file``'s entries."""
    if not settings.tokens and _empty_environment_list():
        raise TokenConfigError(
            "ADAMSCOPE_TOKENS lists no tokens: give at least one, or leave the variable out "
            "to serve without tokens (loopback only)"
        )
    entries: list[tuple[TokenSpec, str]] = [
        (spec, f"ADAMSCOPE_TOKENS[{i}]") for i, spec in enumerate(settings.tokens)
    ]
    if settings.tokens_file is not None:
        path = settings.tokens_file
        entries += [(spec, f"{path.name}[{i}]") for i, spec in enumerate(load_tokens_file(path))]
    return TokenTable(entries)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or an unspecified address: may be reachable from outside


def binding_problem(settings: Settings, table: TokenTable) -> str | None:
    """Why the service must not start on ``settings.host``, or None.

    Without tokens every client is an admin, so the service binds to loopback only unless
    ``insecure_no_auth`` says otherwise.
    """
    if table.enabled or settings.insecure_no_auth or is_loopback(settings.host):
        return None
    return (
        f"refusing to serve on {settings.host} without access tokens: every client that "
        "can reach it would have admin rights. Configure tokens (--tokens-file PATH, "
        "ADAMSCOPE_TOKENS_FILE or ADAMSCOPE_TOKENS), bind to 127.0.0.1, or pass "
        "--insecure-no-auth (ADAMSCOPE_INSECURE_NO_AUTH=1) to serve without authentication"
    )


def banner(settings: Settings, table: TokenTable) -> str:
    """The startup line that says who may do what."""
    if table.enabled:
        counts = {
            s: sum(p.scope == s for p in table.principals()) for s in ("admin", "write", "read")
        }
        restricted = sum(p.prefix is not None for p in table.principals())
        return (
            f"access control: {len(table)} bearer token(s) configured ("
            + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
            + (f"; {restricted} restricted to a name prefix" if restricted else "")
            + ")"
        )
    if is_loopback(settings.host):
        return "no tokens configured: serving on loopback only, every client has admin rights"
    return (
        f"WARNING: no tokens configured and authentication disabled (insecure_no_auth): "
        f"serving on {settings.host}, every client has admin rights"
    )
