"""The house rules .ci/habits.py enforces (sizes with stated reasons, layers and their
imports, no bare folder names), checked on the tree and on planted offenders."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def habits() -> ModuleType:
    spec = importlib.util.spec_from_file_location("habits", ROOT / ".ci" / "habits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["habits"] = module
    spec.loader.exec_module(module)
    return module


def test_the_tree_keeps_the_rules(habits: ModuleType) -> None:
    assert habits.offenders() == []


def test_a_long_function_needs_a_reason(
    habits: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(habits, "ROOT", tmp_path)
    body = "".join(f"    x{i} = {i}\n" for i in range(70))
    plain = tmp_path / "plain.py"
    plain.write_text(f'def f() -> None:\n    """Doc."""\n{body}')
    reasoned = tmp_path / "reasoned.py"
    reasoned.write_text(f'def g() -> None:\n    """Doc."""\n    # Long: a table.\n{body}')
    big = tmp_path / "big.py"
    big.write_text('"""Doc."""\n' + "x = 1\n" * 450)
    found = habits.size_offenders([plain, reasoned, big])
    assert [f.split(":")[0] for f in found] == ["plain.py", "big.py"]
    assert "f() is 72 lines" in found[0]
    big.write_text('"""Doc."""\n# Long: data.\nimport os\n' + "x = 1\n" * 450)
    assert habits.size_offenders([big]) == []


def test_a_wrapped_expression_counts_as_one_line(
    habits: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The formatter's layout (one argument a line) does not make a function long; its
    statements, comments and docstring lines do."""
    monkeypatch.setattr(habits, "ROOT", tmp_path)
    call = "    total = sum(\n" + "".join(f"        {i},\n" for i in range(80)) + "    )\n"
    wrapped = tmp_path / "wrapped.py"
    wrapped.write_text(f'def f() -> int:\n    """Doc."""\n{call}    return total\n')
    assert habits.size_offenders([wrapped]) == []
    comments = "".join(f"    # {i}\n" for i in range(60))
    wrapped.write_text(f'def f() -> int:\n    """Doc."""\n{comments}{call}    return total\n')
    assert [f.split(": ", 1)[1][:20] for f in habits.size_offenders([wrapped])] == [
        "f() is 64 lines (ove"
    ]


def test_layers_are_followed_through_imports(
    habits: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine module that imports nothing forbidden itself, but a module that imports
    FastAPI, breaks the engine's rule; a bare ``import client`` anywhere is named."""
    monkeypatch.setattr(habits, "ROOT", tmp_path)
    engine = tmp_path / "service" / "engine"
    engine.mkdir(parents=True)
    (tmp_path / "service" / "__init__.py").write_text("")
    (engine / "__init__.py").write_text("")
    (engine / "a.py").write_text("from .b import thing\n")
    (engine / "b.py").write_text("import fastapi\n\nthing = fastapi\n")
    (engine / "c.py").write_text("from adamscope.client import codec\n")
    found = habits.layer_offenders(habits.module_files())
    assert any(
        "adamscope.service.engine.a -> adamscope.service.engine.b -> fastapi" in f for f in found
    ), found
    assert not any("engine/c.py" in f for f in found)
    (engine / "d.py").write_text("import client\n")
    assert any("imports client" in f for f in habits.bare_name_offenders())
