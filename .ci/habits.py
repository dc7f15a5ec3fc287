#!/usr/bin/env python3
"""House rules no linter knows: sizes and layers. Run by .ci/run and pre-commit.

Sizes: a module over MODULE_LINES lines, or a function over FUNCTION_LINES lines, is two
ideas, unless it says why it is one: a ``# Long: <reason>`` comment near the top of the
module (before its first import), or between the function's ``def`` and its first
statement. Lines are counted as the author writes them, not as the formatter lays them
out: an expression wrapped over several lines inside brackets (a call, a signature, a
literal: ``ruff format`` puts one argument a line once it does not fit) counts as the one
line it starts on. Comments, docstrings, blank lines and statements count as they stand.

Layers (docs/architecture.md draws them): what each part of the package may import,
followed through the package's own modules (a module's imports, then theirs). Only
explicit imports count: that a package's ``__init__`` runs when one of its modules is
imported is Python's doing, not a dependency of the importing code. Nothing anywhere
imports the repository's folders by their own names (``client``, ``service``): the
installed names are ``adamscope.client`` and ``adamscope.service``.

    python .ci/habits.py          # prints offenders, exits 1 if there are any
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE_LINES = 400
FUNCTION_LINES = 60
REASON = re.compile(r"#\s*Long:\s*\S")
#: Folders of the package, and the import name each installs as.
PACKAGES = {
    "client/_adamscope": "adamscope",
    "client": "adamscope.client",
    "service": "adamscope.service",
}
#: Where the repository's own folders could be imported by their bare names.
CHECKED_TREES = ("service", "client", "tests", "benchmarks", "examples")
WEB = ("fastapi", "starlette", "uvicorn")
SERVICE = "adamscope.service"


@dataclass(frozen=True)
class Rule:
    """Modules under ``source`` (and what they import from the package, transitively)
    import nothing under ``forbidden``."""

    source: str
    forbidden: tuple[str, ...]
    why: str
    #: Exceptions to ``forbidden`` (a package may import its own modules).
    allowed: tuple[str, ...] = ()

    def breaks(self, target: str) -> str | None:
        if any(under(target, a) for a in self.allowed):
            return None
        return next((f for f in self.forbidden if under(target, f)), None)


RULES = (
    Rule(
        "adamscope.service.engine",
        (
            *WEB,
            "pydantic",
            "pydantic_settings",
            "httpx",
            "numpy",
            "adamscope.service.inspect",
            "adamscope.service.api",
            "adamscope.service.persistence",
            "adamscope.service.distributed",
            "adamscope.service.cli",
            "adamscope.service.app",
            "adamscope.service.errors",
            "adamscope.service.settings",
            "adamscope.service.auth",
            "adamscope.service.dashboard",
        ),
        "stepping is torch only: no web, no pydantic, no inspection",
    ),
    Rule(
        "adamscope.service.inspect",
        (
            *WEB,
            "httpx",
            "adamscope.service.api",
            "adamscope.service.persistence",
            "adamscope.service.distributed",
            "adamscope.service.cli",
            "adamscope.service.app",
            "adamscope.service.errors",
        ),
        "inspection works on any optimizer's state: no web, no serving",
    ),
    Rule(
        "adamscope.service.inspect.kernels",
        (*WEB, "pydantic", "httpx", "adamscope.service"),
        "the signal kernels run where the state lives (a user's training job too): "
        "torch and adamscope.client only",
        allowed=("adamscope.service.inspect.kernels",),
    ),
    Rule("adamscope.client", (*WEB, "adamscope.service"), "the client never imports the service"),
    Rule(
        "adamscope.service.persistence",
        (
            *WEB,
            "adamscope.service.api",
            "adamscope.service.inspect",
            "adamscope.service.distributed",
            "adamscope.service.cli",
        ),
        "persistence writes and reads steppers, nothing about HTTP",
    ),
    Rule(
        "adamscope.service.api",
        ("adamscope.service.distributed", "adamscope.service.cli"),
        "the single-process API knows nothing of the distributed mode or the CLI",
    ),
)


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_files() -> dict[str, Path]:
    """Every module of the package by its installed name."""
    out: dict[str, Path] = {}
    for folder, package in sorted(PACKAGES.items(), key=lambda kv: -len(kv[0])):
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if any(
                str(path).startswith(str(ROOT / f) + "/")
                for f in PACKAGES
                if len(f) > len(folder) and f.startswith(folder + "/")
            ):
                continue  # a nested folder mapped to another name (client/_adamscope)
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def imports(path: Path, module: str, known: set[str]) -> Iterator[tuple[int, str]]:
    """(line, imported module) of every import in ``path`` (``module``'s file), relative
    imports resolved; ``from p import x`` is ``p.x`` when that is a module."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                yield node.lineno, sub if sub in known else target


def wrapped_lines(text: str) -> set[int]:
    """The line numbers that continue a bracketed expression begun on an earlier line
    (what the formatter decides, see the module docstring)."""
    depth = start = 0
    found: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type != tokenize.OP:
            continue
        if tok.string in "([{":
            if depth == 0:
                start = tok.start[0]
            depth += 1
        elif tok.string in ")]}":
            depth -= 1
            if depth == 0:
                found.update(range(start + 1, tok.end[0] + 1))
    return found


def size_offenders(files: Iterable[Path]) -> list[str]:
    out = []
    for path in files:
        text = path.read_text()
        lines = text.splitlines()
        wrapped = wrapped_lines(text)
        rel = path.relative_to(ROOT)
        tree = ast.parse(text, str(path))

        def counted(first: int, last: int, wrapped: set[int] = wrapped) -> int:
            return sum(1 for n in range(first, last + 1) if n not in wrapped)

        size = counted(1, len(lines))
        if size > MODULE_LINES:
            first = min(
                (n.lineno for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)),
                default=len(lines),
            )
            if not any(REASON.search(line) for line in lines[:first]):
                out.append(
                    f"{rel}: {size} lines (over {MODULE_LINES}; say why with "
                    "'# Long: ...' before the imports, or split it)"
                )
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = counted(node.lineno, node.end_lineno or node.lineno)
            if length <= FUNCTION_LINES:
                continue
            body = node.body
            start = (
                body[1]
                if (
                    len(body) > 1
                    and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)
                )
                else body[0]
            )
            head = lines[node.lineno - 1 : start.lineno - 1]
            if not any(REASON.search(line) for line in head):
                out.append(
                    f"{rel}:{node.lineno}: {node.name}() is {length} lines (over "
                    f"{FUNCTION_LINES}; say why with '# Long: ...' above its first "
                    "statement, or split it)"
                )
    return out


def layer_offenders(files: dict[str, Path]) -> list[str]:
    known = set(files)
    graph = {m: list(imports(p, m, known)) for m, p in files.items()}
    out = []
    for rule in RULES:
        for start in sorted(m for m in files if under(m, rule.source)):
            seen = {start: [start]}
            todo = [start]
            while todo:
                current = todo.pop()
                for line, target in graph[current]:
                    chain = seen[current]
                    if rule.breaks(target) is not None:
                        path = " -> ".join([*chain, target])
                        out.append(
                            f"{files[current].relative_to(ROOT)}:{line}: imports "
                            f"{target} ({path}): {rule.why}"
                        )
                        continue
                    if target in files and target not in seen:
                        seen[target] = [*chain, target]
                        todo.append(target)
    return sorted(set(out))


def bare_name_offenders() -> list[str]:
    out = []
    for tree_name in CHECKED_TREES:
        for path in sorted((ROOT / tree_name).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                for name in names:
                    if name.split(".")[0] in ("client", "service"):
                        out.append(
                            f"{path.relative_to(ROOT)}:{node.lineno}: imports "
                            f"{name}: use adamscope.{name} (or a relative import)"
                        )
    return out


def offenders() -> list[str]:
    files = module_files()
    return (
        size_offenders(sorted(set(files.values()))) + layer_offenders(files) + bare_name_offenders()
    )


def main() -> int:
    found = offenders()
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} offender(s): see .ci/habits.py for the rules", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
