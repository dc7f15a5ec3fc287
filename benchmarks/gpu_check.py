"""One prepared check of every CUDA path, for a GPU machine's first (and short) visit.

    python benchmarks/gpu_check.py                   # writes ./gpu-report.md (and $OUT/)
    python benchmarks/gpu_check.py --report /tmp/r.md --budget 420

Runs from the repository root with whatever Python runs it, and writes one Markdown report
with a section per part, each part time-boxed (the whole stays under ``--budget`` seconds,
450 by default: under eight minutes with the machine's start-up to spare):

1. the device and driver (``nvidia-smi``, torch and its CUDA);
2. every ``gpu``-marked test but the Ray tier's (CUDA parity of every implementation and
   dtype with ``capturable``, statistics, the footprint's workspace against the allocator,
   the step mirror, out-of-memory refusals, checkpoints and cache release);
3. the CPU tiers that would behave differently on a CUDA host (default device, the
   capturable warning, per-GPU workers, out-of-memory handling);
4. ``bench_step.py --device cuda`` at 1M, 10M and 50M parameters without per-step signals:
   the ``identical`` column, the local and the server step against the 28-byte-per-parameter
   memory-bandwidth limit, and the pinned H2D/D2H copy rates;
5. ``serve --per-gpu`` without and with ``CUDA_VISIBLE_DEVICES`` (the GPU's UUID): each
   worker serves on its port and puts its steppers on the GPU it was given;
6. the Ray tier with one GPU (``--slots 2`` sharing it; parity on a slot and sharded).

Where no CUDA device is available it says so in the report and exits 0; so it does when a
package a part needs is missing (the part is reported as skipped, naming the packages).

Nothing is installed from the network: the device machine reaches none. The repository is
imported from its root (``PYTHONPATH``), so nothing needs installing but its dependencies:
torch with CUDA, fastapi, uvicorn, pydantic, pydantic-settings, httpx, numpy and safetensors
for the service; pytest and pytest-timeout for the tests; ray[serve] for the Ray tier. With
``--wheels DIR`` (or ``GPU_CHECK_WHEELS``) missing ones are installed from wheels in DIR
(``pip install --no-index --find-links DIR``). The exit status is 0 whatever the parts found:
the report says it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ["torch", "fastapi", "uvicorn", "pydantic", "pydantic_settings", "httpx", "numpy"]
TESTS = [*SERVICE, "safetensors", "pytest", "pytest_timeout"]
RAY = [*TESTS, "ray"]
#: Import name -> pip name, for what the report asks to install.
PIP = {
    "pydantic_settings": "pydantic-settings",
    "pytest_timeout": "pytest-timeout",
    "ray": "ray[serve]",
}

GPU_TESTS = [
    "tests/client/test_gpu_parity.py",
    "tests/unit/test_stats.py",
    "tests/unit/test_footprint.py",
    "tests/unit/test_steps.py",
    "tests/unit/test_device_memory.py",
]
HOST_TIERS = [
    "tests/unit/test_engine.py",
    "tests/api/test_steppers_api.py",
    "tests/unit/test_device_memory.py",
    "tests/unit/test_per_gpu.py",
    "tests/unit/test_steps.py",
    "tests/api/test_device_memory_api.py",
    "tests/api/test_quota_api.py",
    "tests/client/test_exactly_once.py",
]
RAY_TESTS = ["tests/distributed/test_ray_gpu.py", "tests/distributed/test_slot_resources.py"]


@dataclass
class Part:
    title: str
    box: float  # seconds it may take at most
    status: str = "not run"
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)


def missing(modules: list[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def install(wheels: str | None, modules: list[str], report: list[str]) -> None:
    """Install what is missing from a local wheel directory (the machine has no network)."""
    absent = missing(modules)
    if not absent or not wheels or not Path(wheels).is_dir():
        return
    names = [PIP.get(m, m) for m in absent]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, *names],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report.append(
        f"pip install --no-index --find-links {wheels} {' '.join(names)}: exit {result.returncode}"
    )
    importlib.invalidate_caches()


def run(
    cmd: list[str], box: float, env: dict[str, str] | None = None
) -> tuple[int | None, str, float]:
    """``cmd`` in its own process group, killed with the group after ``box`` seconds:
    (exit status or None on timeout, output, seconds)."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            code: int | None = proc.wait(timeout=max(1.0, box))
        except subprocess.TimeoutExpired:
            code = None
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        return code, out.read(), time.monotonic() - started


def verdict(code: int | None) -> str:
    return "TIMED OUT" if code is None else ("passed" if code == 0 else f"FAILED (exit {code})")


def pytest_part(part: Part, files: list[str], marker: str | None, needs: list[str]) -> None:
    absent = missing(needs)
    if absent:
        part.status = "skipped: missing " + ", ".join(PIP.get(m, m) for m in absent)
        return
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-v",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        "--timeout",
        "120",
        *(["-m", marker] if marker else []),
        *files,
    ]
    code, out, part.seconds = run(cmd, part.box)
    part.status = verdict(code)
    lines = out.splitlines()
    # One line per test as it finishes (-v): counted even when the box ran out.
    counts = {
        w: sum(1 for ln in lines if ln.startswith("tests/") and f" {w}" in ln)
        for w in ("PASSED", "FAILED", "ERROR", "SKIPPED")
    }
    finished = ", ".join(f"{n} {w.lower()}" for w, n in counts.items() if n)
    part.status += f" - {finished}" if finished else " - no test finished"
    keep = [ln for ln in lines if ln.startswith(("FAILED", "ERROR", "SKIPPED"))][:60]
    summary = [ln for ln in lines if " passed" in ln or " failed" in ln or " error" in ln]
    part.lines = ["$ " + " ".join(cmd[2:]), *keep, *(summary[-1:] or lines[-15:])]


def device_part(part: Part) -> bool:
    """The device and driver; False when there is no CUDA device to check."""
    smi = shutil.which("nvidia-smi")
    if smi:
        code, out, _ = run([smi], 20)
        part.lines += ["$ nvidia-smi", *out.rstrip().splitlines()]
        code, out, _ = run(
            [
                smi,
                "--query-gpu=index,uuid,name,memory.total,driver_version",
                "--format=csv,noheader",
            ],
            20,
        )
        part.lines += [
            "$ nvidia-smi --query-gpu=index,uuid,name,memory.total,driver_version",
            *out.rstrip().splitlines(),
        ]
    else:
        part.lines.append("nvidia-smi: not found")
    if missing(["torch"]):
        part.status = "no CUDA: torch is not installed"
        return False
    probe = (
        "import json, torch; ok = torch.cuda.is_available(); print(json.dumps({"
        "'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': ok, "
        "'count': torch.cuda.device_count() if ok else 0, 'devices': ["
        "{'name': p.name, 'capability': f'{p.major}.{p.minor}', "
        "'memory_gib': round(p.total_memory / 2**30, 1)} for p in "
        "(torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count() "
        "if ok else 0))]}))"
    )
    code, out, part.seconds = run([sys.executable, "-c", probe], 60)
    try:
        facts = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        part.status = f"no CUDA: torch did not answer ({verdict(code)})"
        part.lines += out.splitlines()[-10:]
        return False
    part.lines.append("torch: " + json.dumps(facts))
    if not facts["available"]:
        part.status = "no CUDA: torch.cuda.is_available() is false"
        return False
    part.status = f"{facts['count']} CUDA device(s)"
    return True


def per_gpu_part(part: Part) -> None:
    """serve --per-gpu without and with CUDA_VISIBLE_DEVICES: a stepper on every worker,
    on the GPU the worker was given (nvidia-smi's compute apps name the process's GPU)."""
    absent = missing(SERVICE)
    if absent:
        part.status = "skipped: missing " + ", ".join(PIP.get(m, m) for m in absent)
        return
    code, out, part.seconds = run(
        [sys.executable, str(Path(__file__).with_name("gpu_check_per_gpu.py"))], part.box
    )
    part.status = verdict(code)
    part.lines = out.rstrip().splitlines()[-40:]


def bench_part(part: Part) -> None:
    absent = missing(SERVICE)
    if absent:
        part.status = "skipped: missing " + ", ".join(PIP.get(m, m) for m in absent)
        return
    cmd = [
        sys.executable,
        "benchmarks/bench_step.py",
        "--device",
        "cuda",
        "--sizes",
        "1M",
        "10M",
        "50M",
        "--steps",
        "10",
        "--warmup",
        "3",
        "--no-signals",
    ]
    code, out, part.seconds = run(cmd, part.box)
    identical = code == 1 and "Traceback" not in out  # bench_step's own verdict
    part.status = "FAILED: a size was not bit-identical" if identical else verdict(code)
    part.lines = ["$ " + " ".join(cmd[1:]), *out.rstrip().splitlines()[-30:]]


def render(parts: list[Part], notes: list[str], started: float) -> str:
    head = [
        f"# adamscope GPU check, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "",
        f"- host {platform.node()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, repository {ROOT}",
        f"- took {time.monotonic() - started:.0f} s",
        *[f"- {n}" for n in notes],
        "",
        "| part | status | seconds (box) |",
        "| --- | --- | --- |",
        *[f"| {p.title} | {p.status} | {p.seconds:.0f} ({p.box:.0f}) |" for p in parts],
        "",
    ]
    body = []
    for p in parts:
        body += [f"## {p.title}", "", f"**{p.status}** in {p.seconds:.0f} s", ""]
        if p.lines:
            body += ["```", *p.lines, "```", ""]
    return "\n".join(head + body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--report",
        default=os.environ.get("GPU_REPORT", "gpu-report.md"),
        help="where to write the report (default ./gpu-report.md; also "
        "copied into $OUT when that is set)",
    )
    parser.add_argument(
        "--budget", type=float, default=450.0, help="seconds for all parts together (default 450)"
    )
    parser.add_argument(
        "--wheels",
        default=os.environ.get("GPU_CHECK_WHEELS"),
        help="a directory of wheels to install missing packages from",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    sys.path.insert(0, str(ROOT))
    notes: list[str] = []
    install(args.wheels, RAY, notes)
    absent = missing(RAY)
    notes.append("packages missing: " + (", ".join(PIP.get(m, m) for m in absent) or "none"))
    parts = [
        Part("device and driver", 60),
        Part("gpu-marked tests", 140),
        Part("CPU tiers that differ on a CUDA host", 50),
        Part("bench_step.py --device cuda (1M, 10M, 50M)", 90),
        Part("serve --per-gpu, without and with CUDA_VISIBLE_DEVICES", 40),
        Part("Ray tier on one GPU", 120),
    ]
    has_cuda = device_part(parts[0])
    parts[0].box = max(parts[0].seconds, 1.0)
    if not has_cuda:
        notes.append(f"no CUDA device: nothing else was run ({parts[0].status})")
        for p in parts[1:]:
            p.status = "not run: no CUDA"
    else:
        steps = [
            lambda p: pytest_part(p, GPU_TESTS, "gpu", TESTS),
            lambda p: pytest_part(p, HOST_TIERS, "not gpu", TESTS),
            bench_part,
            per_gpu_part,
            lambda p: pytest_part(p, RAY_TESTS, None, RAY),
        ]
        for part, step in zip(parts[1:], steps, strict=True):
            left = args.budget - (time.monotonic() - started) - 5
            if left < 20:
                part.status = "not run: the time budget was spent"
                continue
            part.box = min(part.box, left)
            try:
                step(part)
            except Exception as e:  # noqa: BLE001 - the report is written whatever happens
                part.status = f"ERROR in the check itself: {type(e).__name__}: {e}"
    text = render(parts, notes, started)
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    out_dir = os.environ.get("OUT")
    if out_dir and Path(out_dir).is_dir():
        shutil.copy(report, Path(out_dir) / report.name)
    print(text)
    print(
        textwrap.dedent(f"""
        report written to {report.resolve()}{f" and {out_dir}" if out_dir else ""}""")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
