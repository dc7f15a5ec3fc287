"""Mutation testing of the code that guards exactness and access: one command.

    python benchmarks/mutation.py                    # run (resumes), then the report
    python benchmarks/mutation.py --fresh            # from scratch (removes mutants/)
    python benchmarks/mutation.py --report-only      # the report of the last run
    python benchmarks/mutation.py 'adamscope.service.auth.*'   # run, report only these

The tests import the package as it installs (``adamscope.service``, ``adamscope.client``),
so this first lays it out as ``src/adamscope/``, links to the repository's files
(``mutation_tiers.link_source_tree``; ignored by git). mutmut (3.x) copies that tree into
``mutants/``, where the tests import it (``mutants/src`` comes first on ``sys.path``, before
the editable install's hook) and where each mutant is named after the module the tests run
(``adamscope.service.auth.x_...``). It mutates the files ``[tool.mutmut] only_mutate`` in
pyproject.toml names (``src/adamscope/service/auth.py`` is ``service/auth.py``), times the
test tiers once, then runs each mutant against the tests that call the mutated function,
limited to its module's tier (``[tool.adamscope.mutation.tiers]``, applied by
tests/mutation_tiers.py). A mutant is *killed* when a test fails; one that survives is a
bug the tests would let through, or an equivalent mutant (same behaviour), reviewed and
listed with its reason in benchmarks/mutation-survivors.md.

Mutants that mypy rejects (``type_check_command``) are caught before any test runs. The
report gives, per module: the mutants, those mypy caught, those the tests killed (a timeout
counts: the mutant hung), survived, listed as equivalent, had no test calling them; the
tests' score ``killed / (mutants mypy accepts - listed equivalents)`` and the overall one
``(killed + mypy) / (mutants - listed equivalents)``; then every survivor that is not
listed. The exit status is 1 when the tests' score is below ``--fail-under`` (default 90) or
mutants are left unchecked. Given mutant names, it reports those only.

To point it at other modules (after a move, say), edit only_mutate and the tiers table;
this script checks that every only_mutate glob matches a file and every mutated module has
a tier.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import mutation_tiers  # noqa: E402 - the tier plugin: one reader of the survivors file

SURVIVORS = ROOT / mutation_tiers.SURVIVORS
#: mutmut's exit codes -> what happened to the mutant (mutmut.stats.status_by_exit_code).
KILLED = {1, 3, -24, 24, 152, 255, 36}  # a failing test, or a timeout (the mutant hangs)
TYPE_CAUGHT = {37}  # rejected by type_check_command before any test ran
SURVIVED = {0}
NO_TESTS = {5, 33}


def config() -> tuple[dict[str, Any], dict[str, list[str]]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return data["tool"]["mutmut"], data["tool"]["adamscope"]["mutation"]["tiers"]


def mutated_files(mutmut: dict[str, Any]) -> list[str]:
    """The source files mutmut mutates, as it names them (``src/adamscope/service/auth.py``;
    the tree must be laid out)."""
    out = []
    for source in mutmut["source_paths"]:
        for path in sorted((ROOT / source).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if any(fnmatch.fnmatch(rel, g) for g in mutmut.get("only_mutate", ["*"])):
                out.append(rel)
    return out


def check(mutmut: dict[str, Any], tiers: dict[str, list[str]]) -> list[str]:
    files = mutated_files(mutmut)
    unmatched = [g for g in mutmut.get("only_mutate", []) if not fnmatch.filter(files, g)]
    if not files or unmatched:
        raise SystemExit(f"[tool.mutmut] only_mutate: no file matches {unmatched or 'any'}")
    untiered = [
        f for f in files if not any(fnmatch.fnmatch(f, g) for globs in tiers for g in globs.split())
    ]
    if untiered:
        raise SystemExit(
            f"no test tier for {untiered}: add them to "
            "[tool.adamscope.mutation.tiers] in pyproject.toml"
        )
    return files


def make_copy_folders(mutants: Path, also_copy: list[str]) -> None:
    """The folder of each ``also_copy`` file under ``mutants``: mutmut 3 copies those files
    (``shutil.copy2(path, mutants / path)``) without making their folders, so
    benchmarks/mutation-survivors.md stopped every run before its first mutant."""
    for path in also_copy:
        (mutants / path).parent.mkdir(parents=True, exist_ok=True)


def run(max_children: int, names: list[str], also_copy: list[str]) -> float:
    """``mutmut run`` (with this interpreter: the venv's, whatever a script's shebang says)."""
    make_copy_folders(ROOT / "mutants", also_copy)
    cli = "import sys; from mutmut.__main__ import cli; sys.argv[0] = 'mutmut'; sys.exit(cli())"
    started = time.monotonic()
    # type_check_command runs "mypy" from PATH: this interpreter's, venv activated or not.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    rc = subprocess.run(
        [sys.executable, "-c", cli, "run", "--max-children", str(max_children), *names],
        cwd=ROOT,
        env={**os.environ, "PATH": path},
    ).returncode
    elapsed = time.monotonic() - started
    if rc != 0:
        print(f"mutmut run exited with {rc}", file=sys.stderr)
    return elapsed


def results(files: list[str]) -> dict[str, dict[str, int | None]]:
    """Exit code per mutant name, per mutated file (mutmut's ``mutants/<file>.meta``)."""
    out = {}
    for f in files:
        meta = ROOT / "mutants" / (f + ".meta")
        if meta.exists():
            out[f] = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
    return out


def reviewed(files: list[str]) -> tuple[dict[str, str], list[str]]:
    """The listed equivalents whose function is unchanged since review (name -> hash),
    and the listed names that no longer fit (another function hash, or no such mutant)."""
    listed = mutation_tiers.reviewed(ROOT)
    current, stale = {}, []
    for name, digest in listed.items():
        if mutation_tiers.function_hash(ROOT / "mutants", name) == digest:
            current[name] = digest
        else:
            stale.append(name)
    return current, sorted(stale)


def diff(name: str, path: str) -> str:
    os.chdir(ROOT)
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    lines = get_diff_for_mutant(name, path=path).splitlines()
    return "\n".join(x for x in lines if x[:1] in "+-" and x[:3] not in ("+++", "---"))


def classify(name: str, code: int | None, listed: dict[str, str]) -> str:
    if mutation_tiers.out_of_scope(ROOT, name):
        return "out_of_scope"
    if code is None:
        return "unchecked"
    if code in TYPE_CAUGHT:
        return "mypy"
    if code in KILLED:
        return "killed"
    if name in listed:
        return "equivalent"
    if code in SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no_tests"
    return "other"


def scores(c: Counter[str]) -> tuple[float | None, float | None]:
    """(tests, overall): killed by the tests of the mutants mypy lets through, and caught
    by tests or mypy of all mutants; listed equivalents, out-of-scope and unchecked ones
    left out."""
    tested = c["mutants"] - c["unchecked"] - c["equivalent"] - c["mypy"] - c["out_of_scope"]
    caught = tested + c["mypy"]
    return (
        100.0 * c["killed"] / tested if tested else None,
        100.0 * (c["killed"] + c["mypy"]) / caught if caught else None,
    )


def _row(name: str, c: Counter[str]) -> str:
    tests, overall = scores(c)
    cells = [f"{x:.1f}" if x is not None else "-" for x in (tests, overall)]
    return (
        f"{name:46} {c['mutants']:7} {c['out_of_scope']:5} {c['mypy']:5} {c['killed']:6} "
        f"{c['survived']:8} {c['equivalent']:6} {c['no_tests']:7} "
        f"{c['other'] + c['unchecked']:5} {cells[0]:>6} {cells[1]:>7}"
    )


def report(files: list[str], fail_under: float, show_diffs: bool, names: list[str]) -> int:
    """The table, the unreviewed survivors and the score: of every mutant, or of those
    ``names`` (mutant names or globs) selects."""
    by_file = results(files)
    if names:
        by_file = {
            f: {k: v for k, v in codes.items() if any(fnmatch.fnmatchcase(k, n) for n in names)}
            for f, codes in by_file.items()
        }
        files = [f for f in files if by_file.get(f)]
    listed, stale = reviewed(files)
    total = Counter[str]()
    unreviewed: list[tuple[str, str]] = []
    print(
        f"{'module':46} {'mutants':>7} {'skip':>5} {'mypy':>5} {'killed':>6} {'survived':>8} "
        f"{'equiv.':>6} {'no test':>7} {'other':>5} {'tests%':>6} {'overall%':>7}"
    )
    for f in files:
        codes = by_file.get(f, {})
        c = Counter(classify(name, code, listed) for name, code in codes.items())
        unreviewed += [
            (name, f)
            for name, code in codes.items()
            if classify(name, code, listed) in ("survived", "no_tests", "other")
        ]
        c["mutants"] = len(codes)
        total.update(c)
        print(_row(f, c))
    print(_row("total", total))
    if stale:
        print(
            f"\n{len(stale)} entries of {SURVIVORS.name} name no mutant of an unchanged "
            f"function (the code moved or changed: review them again): "
            + ", ".join(stale[:10])
            + (" ..." if len(stale) > 10 else "")
        )
    if unreviewed:
        print(
            f"\n{len(unreviewed)} survivors not reviewed in {SURVIVORS.relative_to(ROOT)}: "
            "kill each with a test, or list it there with the reason it is equivalent"
        )
        for name, path in unreviewed:
            print(f"  - `{name}` `{mutation_tiers.function_hash(ROOT / 'mutants', name)}`")
            if show_diffs:
                print("    " + diff(name, path).replace("\n", "\n    "))
    tests, overall = scores(total)
    print(
        f"\nscore: tests {tests or 0:.1f}% (killed {total['killed']} of the mutants mypy "
        f"accepts, listed equivalents aside), overall {overall or 0:.1f}% (with the "
        f"{total['mypy']} mypy rejects); {total['equivalent']} equivalent listed, "
        f"{total['out_of_scope']} out of scope ('skip'), {total['unchecked']} unchecked"
    )
    return 0 if (tests or 0) >= fail_under and not total["unchecked"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutant names or globs (default: all)")
    parser.add_argument(
        "--max-children",
        type=int,
        default=2,
        help="mutants tested in parallel (default 2: leave the CPU to others)",
    )
    parser.add_argument("--fresh", action="store_true", help="remove mutants/ first")
    parser.add_argument("--report-only", action="store_true", help="do not run, only report")
    parser.add_argument("--diffs", action="store_true", help="show each unreviewed diff")
    parser.add_argument("--fail-under", type=float, default=90.0)
    args = parser.parse_args()
    mutmut, tiers = config()
    mutation_tiers.link_source_tree(ROOT)
    files = check(mutmut, tiers)
    if not args.report_only:
        if args.fresh:
            shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        elapsed = run(args.max_children, args.names, mutmut.get("also_copy", []))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"\nmutmut run: {elapsed / 60:.1f} min wall, {cpu / 60:.1f} min CPU, "
            f"{args.max_children} in parallel, {os.cpu_count()} CPUs, load average "
            f"now {load}\n"
        )
    return report(files, args.fail_under, args.diffs, args.names)


if __name__ == "__main__":
    sys.exit(main())
