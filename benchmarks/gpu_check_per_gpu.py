"""Part of gpu_check.py: ``adamscope serve --per-gpu`` on this machine's GPUs.

Twice: without ``CUDA_VISIBLE_DEVICES``, and with it set to the GPUs' UUIDs in reverse
order (as a scheduler may hand them out). Each time, every worker must serve on its port,
have been given the parent's i-th visible GPU (read from the worker's own environment, and
from ``nvidia-smi``'s list of compute processes where it shows them), see exactly one GPU,
and host a stepper on ``cuda:0`` that steps. Prints one line per check; exits 1 if any
failed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adamscope.client import codec  # noqa: E402
from adamscope.service.testing import serve_command, wait_healthy  # noqa: E402


def gpu_uuids() -> list[str]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def compute_apps() -> dict[int, str]:
    """pid -> GPU UUID of the processes nvidia-smi lists (none in some containers)."""
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout
    apps = {}
    for line in out.splitlines():
        pid, _, uuid = line.partition(",")
        if pid.strip().isdigit():
            apps[int(pid)] = uuid.strip()
    return apps


def children(parent: int) -> dict[int, list[str]]:
    """pid -> command line of ``parent``'s child processes."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                pid = int(stat.parent.name)
                found[pid] = (stat.parent / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError, IndexError):
            continue
    return found


def visible_of(pid: int) -> str | None:
    env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    for item in env:
        if item.startswith(b"CUDA_VISIBLE_DEVICES="):
            return item.split(b"=", 1)[1].decode()
    return None


def free_port_block(n: int) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n < 65535:
            return base
    raise RuntimeError("no free port")


def scenario(title: str, visible: str | None, expected: list[str], uuids: list[str]) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    port = free_port_block(len(expected))
    ok = True
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen(
            serve_command(port, data, "--per-gpu", "--device", "cuda"),
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        try:
            for i in range(len(expected)):
                try:
                    wait_healthy(
                        f"http://127.0.0.1:{port + i}",
                        lambda: proc.poll() is None,
                        timeout=60,
                        poll=0.2,
                    )
                except RuntimeError:
                    print(f"{title}: worker {i} did not serve on port {port + i}")
                    return False
            workers = {
                int(cmd[cmd.index("--port") + 1]) - port: pid
                for pid, cmd in children(proc.pid).items()
                if "--port" in cmd
            }
            for i, entry in enumerate(expected):
                url = f"http://127.0.0.1:{port + i}"
                health = httpx.get(f"{url}/healthz", timeout=10).json()
                spec = {"name": f"w{i}", "params": [{"name": "x", "shape": [1024]}]}
                created = httpx.post(f"{url}/v1/steppers", json=spec, timeout=60)
                device = created.json().get("device") if created.status_code == 201 else None
                grads = httpx.post(
                    f"{url}/v1/steppers/w{i}/step",
                    content=codec.encode({"x": torch.ones(1024)}),
                    headers={"content-type": "application/octet-stream"},
                    timeout=60,
                )
                given = visible_of(workers[i]) if i in workers else None
                apps = compute_apps()
                seen = apps.get(workers.get(i, -1))
                want_uuid = (
                    entry
                    if entry.startswith(("GPU-", "MIG-"))
                    else (
                        uuids[int(entry)] if entry.isdigit() and int(entry) < len(uuids) else None
                    )
                )
                good = (
                    given == entry
                    and device == "cuda:0"
                    and grads.status_code == 200
                    and health.get("cuda_devices") == 1
                    and (seen is None or want_uuid is None or seen == want_uuid)
                )
                ok &= good
                print(
                    f"{title}: worker {i} (port {port + i}, pid {workers.get(i)}): "
                    f"CUDA_VISIBLE_DEVICES={given!r} (expected {entry!r}), sees "
                    f"{health.get('cuda_devices')} GPU, stepper on {device}, step "
                    f"{grads.status_code}, nvidia-smi: {seen or 'not listed'}"
                    f"{'' if want_uuid is None else f' (expected {want_uuid})'}: "
                    f"{'ok' if good else 'WRONG'}"
                )
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return ok


def main() -> int:
    uuids = gpu_uuids()
    if not uuids:
        print("nvidia-smi lists no GPU")
        return 1
    print(f"GPUs: {', '.join(uuids)}")
    ok = scenario("without CUDA_VISIBLE_DEVICES", None, [str(i) for i in range(len(uuids))], uuids)
    reverse = list(reversed(uuids))
    ok &= scenario("CUDA_VISIBLE_DEVICES=<UUIDs, reversed>", ",".join(reverse), reverse, uuids)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
