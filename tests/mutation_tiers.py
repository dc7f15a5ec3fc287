"""Under mutation testing, run each mutant against its own module's test tier only.

``python benchmarks/mutation.py`` runs mutmut, which runs pytest once to learn which tests
call which function, then once per mutant with the tests that call the mutated function.
A function like ``codec.decode`` is called by hundreds of API tests; a surviving mutant of it
would run them all. ``[tool.adamscope.mutation.tiers]`` in pyproject.toml maps mutated
modules (globs of their paths, space-separated) to the test node-id prefixes of their
tier (``!prefix`` excludes; the longest matching prefix decides), and :func:`select`,
called from ``conftest.pytest_collection_modifyitems``, keeps:

- for a mutant (``MUTANT_UNDER_TEST`` names one): the tests of its module's tier, the ones
  that ran fastest when mutmut timed them first (so a killing test comes early);
- for mutmut's other runs (timing, clean and forced-fail runs): every tier's tests;
- for a mutant of a function ``[tool.adamscope.mutation] out_of_scope`` names: nothing;
- for a mutant listed as equivalent in benchmarks/mutation-survivors.md, with the hash its
  function had when it was reviewed: nothing (its tests cannot fail; a changed function,
  whose mutants may be numbered differently, runs again);
- outside mutmut (no ``MUTANT_UNDER_TEST``): everything, untouched.

The tests import the package as it installs (``adamscope.service``, ``adamscope.client``),
while the repository's folders are ``service/``, ``client/`` and ``client/_adamscope/``
(pyproject.toml's ``package-dir``, resolved by the editable install's import hook). mutmut
copies its ``source_paths`` into ``mutants/``, puts ``mutants/src`` first on ``sys.path`` and
names each mutant after its file with a leading ``src.`` dropped. So
:func:`link_source_tree` lays the package out as ``src/adamscope/`` (links to the real
files, rebuilt before each run; ignored by git) and mutmut mutates that: its copy
``mutants/src/adamscope`` is what ``import adamscope`` finds (the editable hook comes after
the path finder on ``sys.meta_path``), and a mutant of ``service/auth.py`` is
``adamscope.service.auth.x_...``, the name of the module the tests run. :func:`select`
refuses to run a mutant's tests when ``adamscope`` comes from anywhere else.

mutmut forks each mutant's run from a server that has collected the tests but run none, so
what the first test imports lazily, every mutant would import again: the first optimizer
built imports ``torch._dynamo`` (about 6 s of CPU). :func:`warm_up` does that once in the
server, without starting any thread (a forked child would inherit the thread's state but
not the thread).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

__all__ = [
    "SOURCE_TREE",
    "SURVIVORS",
    "check_mutants_imported",
    "covers",
    "function_hash",
    "in_tier",
    "link_source_tree",
    "module_path",
    "out_of_scope",
    "package_dirs",
    "repository_path",
    "reviewed",
    "select",
    "tiers",
    "warm_up",
]

MUTANT_MARK = "__mutmut_"
#: The reviewed survivors: ``- `<mutant>` `<function hash>`: why it is equivalent``.
SURVIVORS = "benchmarks/mutation-survivors.md"
#: Where :func:`link_source_tree` lays out the package (mutmut's ``source_paths``).
SOURCE_TREE = "src"
_ENTRY = re.compile(r"^\s*[-*]\s+`([^`]+__mutmut_\d+)`\s+`([0-9a-f]+)`")


def _settings(root: Path) -> dict[str, Any]:
    data = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    found: dict[str, Any] = data["tool"]["adamscope"]["mutation"]
    return found


def tiers(root: Path) -> dict[str, list[str]]:
    """Module globs -> test node-id prefixes, from ``root``'s pyproject.toml."""
    table: dict[str, list[str]] = _settings(root)["tiers"]
    return table


def out_of_scope(root: Path, mutant: str) -> bool:
    """Whether ``mutant`` belongs to a function the configuration leaves out."""
    return any(fnmatch.fnmatchcase(mutant, g) for g in _settings(root).get("out_of_scope", []))


def covers(globs: str, path: str) -> bool:
    """Whether one of the space-separated ``globs`` matches the file ``path``."""
    return any(fnmatch.fnmatch(path, g) for g in globs.split())


def module_path(mutant: str) -> str:
    """``adamscope.service.engine.stepper.xǁStepperǁstep__mutmut_3`` ->
    ``src/adamscope/service/engine/stepper.py`` (the file mutmut mutated)."""
    return f"{SOURCE_TREE}/" + mutant.rpartition(".")[0].replace(".", "/") + ".py"


def package_dirs(root: Path) -> dict[str, str]:
    """Package name -> its folder in the repository (``[tool.setuptools] package-dir``)."""
    data = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    found: dict[str, str] = data["tool"]["setuptools"]["package-dir"]
    return found


def _tree_files(root: Path) -> dict[str, Path]:
    """Path under the source tree (``adamscope/service/auth.py``) -> the repository's file."""
    dirs = package_dirs(root)
    out: dict[str, Path] = {}
    for package, folder in dirs.items():
        source = root / folder
        # a package whose folder sits inside another's (client/_adamscope in client/)
        nested = [root / f for f in dirs.values() if f != folder and f.startswith(folder + "/")]
        for path in sorted(source.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if any(path.is_relative_to(n) for n in nested):
                continue
            rel = path.relative_to(source).as_posix()
            out[package.replace(".", "/") + "/" + rel] = path
    return out


def repository_path(root: Path, path: str) -> str | None:
    """``src/adamscope/service/auth.py`` -> ``service/auth.py`` (None: no such file)."""
    found = _tree_files(root).get(path.removeprefix(f"{SOURCE_TREE}/"))
    return found.relative_to(root).as_posix() if found else None


def link_source_tree(root: Path, dest: Path | None = None) -> Path:
    """Lay out the installed package under ``dest`` (default ``root/src``) as links to the
    repository's files (every file: the dashboard's static files too), replacing what was
    there; returns ``dest``."""
    dest = root / SOURCE_TREE if dest is None else dest
    top = {name.partition(".")[0] for name in package_dirs(root)}
    for name in top:
        shutil.rmtree(dest / name, ignore_errors=True)
    for rel, path in _tree_files(root).items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path, target)
    return dest


def in_tier(nodeid: str, prefixes: list[str]) -> bool:
    """Whether the longest of ``prefixes`` that ``nodeid`` starts with includes it (a
    prefix written ``!prefix`` excludes)."""
    matches = [
        (len(p.lstrip("!")), not p.startswith("!"))
        for p in prefixes
        if nodeid.startswith(p.lstrip("!"))
    ]
    return bool(matches) and max(matches)[1]


def reviewed(root: Path) -> dict[str, str]:
    """Mutant name -> the hash of its function when it was reviewed as equivalent."""
    path = root / SURVIVORS
    if not path.exists():
        return {}
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _ENTRY.match(line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def function_hash(mutants: Path, mutant: str) -> str | None:
    """The hash mutmut recorded for the mutated function's source (``<file>.meta`` under
    ``mutants``): the same hash, the same source, the same mutants in the same order."""
    meta = mutants / (module_path(mutant) + ".meta")
    try:
        hashes = json.loads(meta.read_text(encoding="utf-8"))["hash_by_function_name"]
    except (OSError, ValueError, KeyError):
        return None
    function = mutant.rpartition(".")[2].rpartition(MUTANT_MARK)[0]
    found = hashes.get(function)
    return found if isinstance(found, str) else None


def _durations(root: Path) -> dict[str, float]:
    try:
        data = json.loads((root / "mutmut-stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    found = data.get("duration_by_test", {})
    return found if isinstance(found, dict) else {}


def warm_up() -> None:
    """Import what the first test would import (one step of a one-element Adam: too small
    for a parallel region, so no OpenMP pool starts)."""
    p = torch.zeros(1, requires_grad=True)
    p.grad = torch.ones(1)
    torch.optim.Adam([p], foreach=False).step()


def check_mutants_imported(rootpath: Path) -> None:
    """Stop when the tests would import the repository's code instead of mutmut's copy
    (every mutant would survive): ``adamscope`` must come from ``mutants/src``."""
    # imported here, once sys.path is mutmut's: benchmarks/mutation.py loads this module
    # without the package
    import adamscope

    expected = rootpath / SOURCE_TREE / "adamscope"
    # the folder, not the file: src/adamscope's files are links to the repository's
    if Path(adamscope.__file__ or "").parent.resolve() != expected.resolve():
        raise pytest.UsageError(
            f"under mutation testing, adamscope is imported from {adamscope.__file__}, "
            f"not from mutmut's copy {expected}: the mutants would never run "
            "(run benchmarks/mutation.py, which lays out src/adamscope for mutmut)"
        )


def select(config: pytest.Config, items: list[pytest.Item]) -> None:
    mutant = os.environ.get("MUTANT_UNDER_TEST")
    if mutant is None:
        return
    check_mutants_imported(config.rootpath)
    if mutant == "":  # the fork server's warm-up (and mutmut's clean run)
        warm_up()
    table = tiers(config.rootpath)
    if MUTANT_MARK in mutant and (
        out_of_scope(config.rootpath, mutant)
        or reviewed(config.rootpath).get(mutant, "?") == function_hash(config.rootpath, mutant)
    ):
        config.hook.pytest_deselected(items=list(items))
        items[:] = []
        return
    if MUTANT_MARK in mutant:
        path = module_path(mutant)
        prefixes = [p for globs, ps in table.items() if covers(globs, path) for p in ps]
    else:
        prefixes = [p for ps in table.values() for p in ps]
    keep = [item for item in items if in_tier(item.nodeid, prefixes)]
    dropped = [item for item in items if not in_tier(item.nodeid, prefixes)]
    if MUTANT_MARK in mutant:
        durations = _durations(config.rootpath)
        keep.sort(key=lambda item: durations.get(item.nodeid, 0.0))
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
