"""The generated parts of the reference pages, built from the code so they cannot drift.

A page asks for a part with a marker line, ``<!-- generated: NAME -->``; this MkDocs hook
(mkdocs.yml ``hooks:``) replaces the marker with the Markdown that ``PARTS[NAME]`` renders
at build time:

- ``rest``: every path and method of the service's OpenAPI document (``create_app(...)
  .openapi()``), with its scope, parameters, body, answers and problem codes;
- ``scopes``: the scope each operation needs (the document's ``x-adamscope-scope``);
- ``settings``: every setting of ``adamscope serve`` (pydantic-settings fields) with its
  environment variable and command-line flag;
- ``cli``: every subcommand's ``--help``, from the real argparse parser.

tests/docs/test_snippets.py imports this file to check that the pages list every route.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["PARTS", "expand", "on_page_markdown", "openapi", "subcommands"]

MARKER = re.compile(r"^<!-- generated: (\w+) -->$", re.MULTILINE)
METHODS = ("get", "post", "put", "patch", "delete")
PROBLEM_CODE = re.compile(r"`([a-z_]+)`")
DUNDER = re.compile(r"(?<![`\w])(__\w+__)(?![`\w])")  # __metadata__ would render bold


def openapi() -> dict[str, Any]:
    """The service's OpenAPI document, from an app that is built but never started."""
    from adamscope.service.app import create_app
    from adamscope.service.settings import Settings

    with tempfile.TemporaryDirectory() as data:
        document: dict[str, Any] = create_app(Settings(data_dir=Path(data))).openapi()
    return document


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def cell(text: object) -> str:
    """One Markdown line or table cell: no line breaks, no column separators, dunders as code."""
    return DUNDER.sub(r"`\1`", " ".join(str(text).split()).replace("|", "\\|"))


def problem_codes(op: dict[str, Any]) -> list[str]:
    codes: list[str] = []
    for answer in op.get("responses", {}).values():
        description = answer.get("description", "")
        if description.startswith("Problem:"):
            codes += PROBLEM_CODE.findall(description)
    return sorted(set(codes))


def schema_type(schema: dict[str, Any]) -> str:
    options = schema.get("anyOf", [schema])
    names = []
    for option in options:
        if option.get("type") == "null":
            continue
        if "enum" in option:
            names.append(" / ".join(f"`{v}`" for v in option["enum"]))
        elif option.get("type") == "array":
            names.append(f"list of {schema_type(option.get('items', {}))}")
        else:
            names.append(option.get("type", "any"))
    return " or ".join(names) or "any"


def render_operation(path: str, method: str, op: dict[str, Any]) -> list[str]:
    scope = op.get("x-adamscope-scope", "public")
    lines = [f"### `{method.upper()} {path}`", "", f"{op.get('summary', '')}. Scope: **{scope}**."]
    if op.get("description"):
        lines += ["", cell(op["description"])]
    params = op.get("parameters", [])
    if params:
        lines += ["", "| parameter | in | type | required | description |", "|---" * 5 + "|"]
        for p in params:
            schema = p.get("schema", {})
            kind = schema_type(schema)
            if "default" in schema:
                kind += f" (default `{schema['default']}`)"
            text = p.get("description") or schema.get("description", "")
            lines.append(
                f"| `{p['name']}` | {p['in']} | {cell(kind)} | "
                f"{'yes' if p.get('required') else 'no'} | {cell(text)} |"
            )
    body = op.get("requestBody")
    if body:
        media = ", ".join(f"`{m}`" for m in body.get("content", {}))
        lines += ["", f"Body: {media}. {cell(body.get('description', ''))}".rstrip()]
    answers = [
        f"{status} ({cell(a.get('description', ''))})"
        for status, a in op.get("responses", {}).items()
        if not a.get("description", "").startswith("Problem:")
    ]
    if answers:
        lines += ["", "Answers: " + "; ".join(answers) + "."]
    codes = problem_codes(op)
    if codes:
        lines += ["", "Problems: " + ", ".join(f"[`{c}`](errors.md#{c})" for c in codes) + "."]
    return [*lines, ""]


def render_rest() -> str:
    document = openapi()
    by_tag: dict[str, list[str]] = {}
    for path, method, op in operations(document):
        tag = (op.get("tags") or ["other"])[0]
        by_tag.setdefault(tag, []).extend(render_operation(path, method, op))
    out: list[str] = []
    for tag, lines in by_tag.items():
        out += [f"## {tag.capitalize()}", "", *lines]
    return "\n".join(out)


def render_scopes() -> str:
    rows = ["| operation | scope |", "| --- | --- |"]
    for path, method, op in operations(openapi()):
        rows.append(f"| `{method.upper()} {path}` | {op.get('x-adamscope-scope', 'public')} |")
    return "\n".join(rows)


@contextlib.contextmanager
def columns(width: int) -> Iterator[None]:
    """argparse wraps help to the terminal's width: fix it so the page is the same anywhere."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def subcommands() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from adamscope.service import cli

    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return parser, dict(action.choices)
    return parser, {}


def render_cli() -> str:
    with columns(88):
        parser, commands = subcommands()
        out = ["## `adamscope`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in commands.items():
            out += [f"## `adamscope {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def render_settings() -> str:
    from adamscope.service.settings import Settings

    _, commands = subcommands()
    flags = {o for a in commands["serve"]._actions for o in a.option_strings}
    rows = [
        "| setting | environment variable | `serve` flag | default | what |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = "" if field.is_required() else field.get_default(call_default_factory=True)
        rows.append(
            f"| `{name}` | `ADAMSCOPE_{name.upper()}` | "
            f"{f'`{flag}`' if flag in flags else ''} | {cell(f'`{default!s}`')} | "
            f"{cell(field.description or '')} |"
        )
    return "\n".join(rows)


PARTS: dict[str, Callable[[], str]] = {
    "rest": render_rest,
    "scopes": render_scopes,
    "settings": render_settings,
    "cli": render_cli,
}


def expand(markdown: str) -> str:
    return MARKER.sub(lambda m: PARTS[m.group(1)](), markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """MkDocs calls this for every page: replace its markers with the generated parts."""
    return expand(markdown)
