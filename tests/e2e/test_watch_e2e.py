"""A watched training run against a real server that is SIGKILLed and restarted mid-run:
training neither raises nor stalls, the handle counts what it dropped, and reporting
resumes with the restarted service (on the same port and data directory)."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import torch

import adamscope
from adamscope.service.testing import free_port, serve_command, wait_healthy

#: Longest one training step may take (a liveness bound, far above a step here: a step
#: that waited for the network would wait for the client's 10 s timeout or the backoff).
STALL = 2.0


def _serve(port: int, data: Path, log: object) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        serve_command(port, data), stdout=log, stderr=subprocess.STDOUT, text=True
    )
    wait_healthy(f"http://127.0.0.1:{port}", lambda: proc.poll() is None, 60, lambda: "")
    return proc


def _train(
    run: adamscope.Watch, model: torch.nn.Module, opt: torch.optim.Optimizer, n: int
) -> float:
    slowest = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        model(torch.randn(16, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        run.log(loss=1.0)
        slowest = max(slowest, time.perf_counter() - t0)
    return slowest


def test_training_survives_a_killed_and_restarted_service(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    with tempfile.TemporaryFile("w+") as log:
        proc = _serve(port, tmp_path / "data", log)
        try:
            run = adamscope.watch(opt, model=model, url=url, name="killed", timeout=2.0)
            slowest = _train(run, model, opt, 10)
            assert run.flush(10)
            assert httpx.get(f"{url}/v1/steppers/killed").json()["step"] == 10
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            slowest = max(slowest, _train(run, model, opt, 30))  # the service is gone
            run.flush(3)
            assert run.counters.failures > 0 and run.dropped > 0
            proc = _serve(port, tmp_path / "data", log)
            slowest = max(slowest, _train(run, model, opt, 10))
            deadline = time.monotonic() + 20
            summary: dict[str, object] = {}
            while time.monotonic() < deadline:
                run.flush(5)
                r = httpx.get(f"{url}/v1/steppers/killed")
                summary = r.json() if r.status_code == 200 else {}
                if summary.get("step") == 50:
                    break
                time.sleep(0.2)
            # Reporting resumed: the restarted service follows the run's own step count.
            assert summary.get("kind") == "watched" and summary.get("step") == 50, summary
            assert slowest < STALL
            assert run.counters.errors == 0
            run.close()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(15)
