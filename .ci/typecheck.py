#!/usr/bin/env python3
"""``mypy --strict`` on the package as it installs (adamscope, adamscope.client,
adamscope.service), run by .ci/run and pre-commit.

An editable install maps the package's names to its folders with an import hook
(pyproject.toml's package-dir: client/_adamscope is adamscope, client/ is
adamscope.client, service/ is adamscope.service) that mypy cannot follow. So this builds
the tree mypy needs, ``build/typecheck/adamscope/``, out of links to the real files (mypy
reports their real paths), and checks it. Extra arguments go to mypy.

    python .ci/typecheck.py           # or: .venv/bin/python .ci/typecheck.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"
#: Folder -> where it sits in the package (nested mapped folders are left out of their parent).
MAPPING = {
    "client/_adamscope": "adamscope",
    "client": "adamscope/client",
    "service": "adamscope/service",
}


def link_tree() -> Path:
    if TREE.exists():
        shutil.rmtree(TREE)
    for folder, target in MAPPING.items():
        source = ROOT / folder
        nested = [ROOT / f for f in MAPPING if f != folder and f.startswith(folder + "/")]
        for path in sorted(source.rglob("*.py")):
            if any(path.is_relative_to(n) for n in nested) or "__pycache__" in path.parts:
                continue
            dest = TREE / target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path, dest)
    return TREE


def main(argv: list[str]) -> int:
    tree = link_tree()
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "-p",
        "adamscope",
        *argv,
    ]
    return subprocess.run(
        command, cwd=tree, env={**os.environ, "MYPYPATH": str(tree)}, check=False
    ).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
