"""Every Python and shell snippet of README.md and docs/ runs as written, against a live
server; the reference pages list every route and every problem code.

Each page gets its own real uvicorn on 127.0.0.1 and an ephemeral port (the pages create
steppers with the same names, as a reader following one page would) and its own temporary
working directory, where ``examples/`` and ``.venv`` link to the repository's. A page's
snippets run in the order they appear, as a reader runs them, so a later one may use a
stepper an earlier one kept. Each snippet is one test (its id: ``page:line``): Python with
this interpreter, shell with bash (``-e -o pipefail``), ``console`` blocks as their ``$``
lines; ``ADAMSCOPE_URL`` and ``URL`` name the page's server and the interpreter's ``bin/``
comes first on ``PATH`` (the docs' convention: the virtualenv is active).

Markers, on the line before a fence:

- ``<!-- snippet: skip (reason) -->``: not run (the reason is the skip's); kept few.
- ``<!-- snippet: output -->`` before a ``text`` block: that block is the output of the
  snippet just before it, and must equal what the snippet prints.

A block made only of ``--8<-- "examples/..."`` includes is the example file itself: it must
exist under examples/ (the page's own snippets, or tests/e2e, run it).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from conftest import ROOT, run_uvicorn

from adamscope.client.errors import CODES
from adamscope.service.api.access import endpoints
from adamscope.service.app import create_app
from adamscope.service.settings import Settings

pytestmark = pytest.mark.e2e

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash"}
LANGUAGES |= {"shell": "bash", "console": "console"}
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)")
SKIP = re.compile(r"^<!-- snippet: skip \((?P<reason>[^)]+)\) -->$")
OUTPUT = "<!-- snippet: output -->"
INCLUDE = re.compile(r'^-{2,}8<-{2,}\s+"(?P<path>[^"]+)"$')
TIMEOUT = 120
#: Exemptions are for what cannot run here (a server that never stops, the whole suite, a
#: GPU, Docker, Ray, a torchrun job of several processes): more than this many means
#: snippets are being skipped to pass.
MAX_SKIPS = 13

Run = subprocess.CompletedProcess[str]


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip: str | None = None
    output: str | None = None  # the marked text block after it

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def includes(self) -> list[str]:
        lines = [ln.strip() for ln in self.code.splitlines() if ln.strip()]
        found = [m["path"] for ln in lines if (m := INCLUDE.match(ln))]
        return found if found and len(found) == len(lines) else []


def blocks(page: Path) -> Iterator[tuple[int, str, str, str]]:
    """(line, language, code, the non-empty line before the fence) of every fenced block."""
    lines = page.read_text().splitlines()
    before, i = "", 0
    while i < len(lines):
        opening = FENCE.match(lines[i].strip())
        if not opening:
            if lines[i].strip():
                before = lines[i].strip()
            i += 1
            continue
        ticks, language, start = opening[1], opening[2].lower(), i
        i += 1
        while i < len(lines) and lines[i].strip() != ticks:
            i += 1
        assert i < len(lines), f"{page}:{start + 1}: a fence that never closes"
        yield start + 1, language, "\n".join(lines[start + 1 : i]) + "\n", before
        before, i = lines[i].strip(), i + 1


def snippets(page: Path) -> list[Snippet]:
    found: list[Snippet] = []
    for line, language, code, before in blocks(page):
        if before == OUTPUT:
            assert found and language == "text", f"{page}:{line}: output of what?"
            last = found[-1]
            found[-1] = Snippet(last.page, last.line, last.language, last.code, last.skip, code)
        elif language in LANGUAGES:
            skip = SKIP.match(before)
            found.append(Snippet(page, line, LANGUAGES[language], code, skip and skip["reason"]))
    return found


ALL = [s for page in PAGES for s in snippets(page)]


def command(snippet: Snippet) -> list[str]:
    if snippet.language == "python":
        return [sys.executable, "-c", snippet.code]
    code = snippet.code
    if snippet.language == "console":
        code = "\n".join(ln[2:] for ln in code.splitlines() if ln.startswith("$ "))
    return ["bash", "-e", "-o", "pipefail", "-c", code]


def run_page(page: Path, runnable: list[Snippet], base: Path) -> dict[str, Run]:
    """A page's snippets in order, against the page's own server, in its own directory."""
    cwd = base / "-".join(page.relative_to(ROOT).with_suffix("").parts)
    cwd.mkdir()
    (cwd / "examples").symlink_to(ROOT / "examples")
    (cwd / ".venv").symlink_to(Path(sys.prefix))
    out: dict[str, Run] = {}
    with run_uvicorn(Settings(data_dir=cwd / "data", device="cpu")) as server:
        env = {k: v for k, v in os.environ.items() if k != "ADAMSCOPE_TOKEN"}
        env |= {"ADAMSCOPE_URL": server.url, "URL": server.url, "PYTHONUNBUFFERED": "1"}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        for snippet in runnable:
            try:
                out[snippet.id] = subprocess.run(
                    command(snippet),
                    cwd=cwd,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=TIMEOUT,
                )
            except subprocess.TimeoutExpired as e:
                out[snippet.id] = subprocess.CompletedProcess(e.cmd, -1, str(e.stdout), "timeout")
    return out


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest) -> Iterator[dict[Path, dict[str, Run]]]:
    """Each page's runs, by snippet id: a page runs whole (its selected snippets, in order)
    when its first snippet's test asks, and its server stops before the next page's starts
    (the servers run in this process, and pydantic's lazy schemas are not built safely by
    two apps' threads at once)."""
    selected = {
        item.callspec.params["snippet"].id
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and hasattr(item, "callspec")
        and "snippet" in item.callspec.params
    }
    with tempfile.TemporaryDirectory() as base:

        class Lazy(dict[Path, dict[str, Run]]):
            def __missing__(self, page: Path) -> dict[str, Run]:
                runnable = [
                    s
                    for s in ALL
                    if s.page == page and s.id in selected and not s.skip and not s.includes
                ]
                self[page] = run_page(page, runnable, Path(base))
                return self[page]

        yield Lazy()


def lines_of(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.strip("\n").splitlines()]


@pytest.mark.parametrize("snippet", ALL, ids=[s.id for s in ALL])
def test_snippet_runs(snippet: Snippet, runs: dict[Path, dict[str, Run]]) -> None:
    if snippet.skip:
        pytest.skip(snippet.skip)
    if snippet.includes:
        for path in snippet.includes:
            assert path.startswith("examples/") and (ROOT / path).is_file(), path
        return
    done = runs[snippet.page][snippet.id]
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    if snippet.output is not None:
        assert lines_of(done.stdout) == lines_of(snippet.output), done.stdout


def test_snippets_are_found_and_exemptions_are_few() -> None:
    assert len(ALL) >= 20, [s.id for s in ALL]
    skipped = [s.id for s in ALL if s.skip]
    assert len(skipped) <= MAX_SKIPS, skipped
    for page in PAGES:  # a misspelt marker would silently run nothing, or skip nothing
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if line.startswith("<!-- snippet"):
                assert SKIP.match(line.strip()) or line.strip() == OUTPUT, f"{page}:{n}"


# ---------------------------------------------------------------------- reference pages


def reference_hook() -> ModuleType:
    path = ROOT / "docs" / "hooks" / "reference.py"
    spec = importlib.util.spec_from_file_location("adamscope_docs_reference", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_errors_page_lists_every_problem_code() -> None:
    page = (ROOT / "docs" / "reference" / "errors.md").read_text()
    missing = [code for code in CODES if f'<span id="{code}"></span>`{code}`' not in page]
    assert missing == []


def test_rest_reference_lists_every_route(tmp_path: Path) -> None:
    """Every operation the app serves is a section of the page; the routes outside the
    OpenAPI document (its own, the dashboard's files) are named in its introduction."""
    hook = reference_hook()
    page = hook.expand((ROOT / "docs" / "reference" / "rest.md").read_text())
    documented = set(hook.openapi()["paths"])
    served = list(endpoints(create_app(Settings(data_dir=tmp_path))))
    for e in served:
        if e.path in documented:
            assert f"### `{e.method} {e.path}`" in page, f"{e.method} {e.path}"
        else:
            assert f"`/{e.path.split('/')[1]}`" in page, f"{e.method} {e.path}"
    assert len(served) >= 40


def test_every_generated_part_renders() -> None:
    hook = reference_hook()
    markers = {
        m[1] for page in PAGES for m in hook.MARKER.finditer(page.read_text())
    }  # every marker names a part, and every part is used
    assert markers == set(hook.PARTS)
    settings = hook.PARTS["settings"]()
    for field in Settings.model_fields:
        assert f"`ADAMSCOPE_{field.upper()}`" in settings
    cli = hook.PARTS["cli"]()
    for name in hook.subcommands()[1]:
        assert f"## `adamscope {name}`" in cli
