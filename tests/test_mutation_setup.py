"""The mutation-testing configuration reaches the code the tests import (no mutmut run
here: benchmarks/mutation.py runs it). mutmut mutates ``src/adamscope/``, the package laid
out as it installs; these check that the layout is importable as ``adamscope``, that
every path the configuration names is a file of the repository, and that the tier plugin
refuses to run a mutant's tests against anything but mutmut's copy."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import mutation_tiers
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> dict[str, Any]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    found: dict[str, Any] = data["tool"]
    for key in name.split("."):
        found = found[key]
    return found


def _mutmut() -> dict[str, Any]:
    return _tool("mutmut")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mutation_tiers.link_source_tree(ROOT, tmp_path_factory.mktemp("mutation") / "src")


def _mutated(tree: Path) -> list[str]:
    """The files only_mutate selects, named as mutmut names them (src/adamscope/...)."""
    files = sorted(
        "src/" + p.relative_to(tree).as_posix() for p in tree.rglob("*.py") if p.is_file()
    )
    return [f for f in files if any(fnmatch.fnmatch(f, g) for g in _mutmut()["only_mutate"])]


def test_the_tree_links_every_file_of_the_package(tree: Path) -> None:
    assert (tree / "adamscope" / "__init__.py").resolve() == (
        ROOT / "client" / "_adamscope" / "__init__.py"
    )
    assert (tree / "adamscope" / "service" / "auth.py").resolve() == ROOT / "service" / "auth.py"
    assert (tree / "adamscope" / "client" / "codec.py").resolve() == ROOT / "client" / "codec.py"
    # client/_adamscope is the root package, not a subpackage of adamscope.client
    assert not (tree / "adamscope" / "client" / "_adamscope").exists()
    # the dashboard's static files are package data the service reads from its folder
    assert any((tree / "adamscope" / "service" / "dashboard" / "static").iterdir())


def test_the_configuration_names_only_files_of_the_repository(tree: Path) -> None:
    mutmut = _mutmut()
    assert mutmut["source_paths"] == [f"{mutation_tiers.SOURCE_TREE}/adamscope"]
    mutated = _mutated(tree)
    for glob in mutmut["only_mutate"]:
        assert fnmatch.filter(mutated, glob), f"only_mutate {glob!r} matches no file"
    for path in mutated:
        assert mutation_tiers.repository_path(ROOT, path) is not None
    assert mutation_tiers.repository_path(ROOT, "src/adamscope/service/auth.py") == (
        "service/auth.py"
    )
    assert mutation_tiers.repository_path(ROOT, "src/adamscope/service/nothing.py") is None
    tiers = mutation_tiers.tiers(ROOT)
    for path in mutated:
        assert any(mutation_tiers.covers(globs, path) for globs in tiers), f"{path}: no tier"
    for globs in tiers:
        for glob in globs.split():
            assert fnmatch.filter(mutated, glob), f"tier glob {glob!r} matches no mutated file"
        for prefix in tiers[globs]:
            test_file = ROOT / prefix.lstrip("!").partition("::")[0]
            assert test_file.is_file(), f"tier names {prefix!r}: no such test file"


def test_mutant_names_are_the_imported_modules(tree: Path) -> None:
    """A mutant's name starts with the module its file is imported as, and leads back to
    that file (mutmut's trampoline compares the two; the plugin finds its meta file)."""
    mutated = _mutated(tree)
    for glob in _tool("adamscope.mutation")["out_of_scope"]:
        module = glob.rpartition(".")[0]
        assert mutation_tiers.module_path(module + ".x_f__mutmut_1") in mutated, glob
    name = "adamscope.service.engine.stepper.xǁStepperǁstep__mutmut_3"
    assert mutation_tiers.module_path(name) == "src/adamscope/service/engine/stepper.py"


def test_the_tree_imports_as_adamscope_ahead_of_the_editable_install(tree: Path) -> None:
    """With the tree first on sys.path (as mutmut puts mutants/src), ``adamscope`` and its
    subpackages come from the tree, and the plugin's guard accepts it."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])\n"
        "from pathlib import Path\n"
        "import adamscope, adamscope.service.auth as auth, adamscope.client.codec as codec\n"
        "import mutation_tiers\n"
        "mutation_tiers.check_mutants_imported(Path(sys.argv[1]).parent)\n"
        "print(adamscope.__file__, auth.__file__, codec.__file__, auth.__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tree), str(ROOT / "tests")],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    init, auth, codec, name = out.stdout.split()
    assert Path(init) == tree / "adamscope" / "__init__.py"
    assert Path(auth) == tree / "adamscope" / "service" / "auth.py"
    assert Path(codec) == tree / "adamscope" / "client" / "codec.py"
    assert name == "adamscope.service.auth"


def test_mutant_runs_refuse_the_repository_code(tmp_path: Path) -> None:
    """Here adamscope is the editable install's (the repository's folders): under mutmut
    every mutant would survive unseen, so the plugin stops instead."""
    with pytest.raises(pytest.UsageError, match="mutants would never run"):
        mutation_tiers.check_mutants_imported(tmp_path)


def test_the_files_mutmut_copies_find_their_folder(tmp_path: Path) -> None:
    """mutmut copies each ``also_copy`` file as ``shutil.copy2(path, "mutants" / path)``:
    the survivors list sits in benchmarks/, a folder mutmut does not make."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import mutation
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    also_copy = _mutmut()["also_copy"]
    assert "benchmarks/mutation-survivors.md" in also_copy
    mutants = tmp_path / "mutants"
    mutation.make_copy_folders(mutants, also_copy)
    for path in also_copy:
        shutil.copy2(ROOT / path, mutants / path)  # what mutmut does, for files
        assert (mutants / path).read_bytes() == (ROOT / path).read_bytes()
