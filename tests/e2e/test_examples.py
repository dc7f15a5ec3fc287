"""The shipped example, run as a user runs it: a subprocess against `adamscope serve`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, spawn_server

from adamscope.client import Client

pytestmark = pytest.mark.e2e

EXAMPLE = ROOT / "examples" / "remote_training.py"


def run_example(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "--url", url, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_remote_training_example(tmp_path: Path) -> None:
    with spawn_server(tmp_path / "data") as url, Client(url) as client:
        done = run_example(url, "--steps", "12", "--name", "ex-default")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "VERIFIED: bit-identical to local torch.optim.Adam after 12 steps" in done.stdout
        assert "exp_avg_sq of '2.weight'" in done.stdout and "Bias correction" in done.stdout
        assert "ex-default" not in [s.name for s in client.list()], "stepper not deleted"

        kept = run_example(url, "--steps", "5", "--name", "ex-kept", "--keep")
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert "VERIFIED: bit-identical" in kept.stdout
        assert client.get("ex-kept").step == 5

        # The name is taken now: the example refuses rather than attaching to it.
        again = run_example(url, "--steps", "5", "--name", "ex-kept")
        assert again.returncode == 2
        assert "already exists" in again.stderr
        assert client.get("ex-kept").step == 5


def test_the_quick_start_run_raises_no_alert(tmp_path: Path) -> None:
    """The README's quick start is a benign run (an MLP under a cosine schedule): the default
    alert rules must stay quiet on it, past every rule's warm-up. The localized rule once
    fired on it at steps 11 to 15, when v_hat still averaged a dozen squared gradients."""
    with spawn_server(tmp_path / "data") as url, Client(url) as client:
        done = run_example(url, "--steps", "150", "--name", "ex-quiet", "--keep")
        assert done.returncode == 0, done.stdout + done.stderr
        report = client.alerts("ex-quiet")
        assert report.defaults and len(report.rules) == 4
        assert client.get("ex-quiet").step == 150
        assert report.count == 0, [(e.step, e.tensor, e.rule) for e in report.events]


def test_checkpoint_roundtrip_example(tmp_path: Path) -> None:
    """examples/checkpoint_roundtrip.py, the README's checkpoint walk-through, as a user runs
    it against `adamscope serve`."""
    example = ROOT / "examples" / "checkpoint_roundtrip.py"
    with spawn_server(tmp_path / "data") as url, Client(url) as client:
        done = subprocess.run(
            [sys.executable, str(example), "--url", url],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "ckpt-demo-step5 is frozen: the step was refused" in done.stdout
        assert "state equal to the step-5 checkpoint: True" in done.stdout
        assert "VERIFIED: import -> 2 remote steps -> export -> 3 local steps" in done.stdout
        assert "changed from step 3 to 5: " in done.stdout
        assert client.list() == [], "the example left steppers behind"


def test_watch_training_example(tmp_path: Path) -> None:
    """examples/watch_training.py: a local fused AdamW watched, its state read through the
    service bit for bit, its lr changed by a command applied between two steps."""
    with spawn_server(tmp_path / "data") as url, Client(url) as client:
        done = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "watch_training.py"), "--url", url],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "VERIFIED: state read bit-exact, lr change applied once" in done.stdout
        summary = client.get("example-watched")
        assert summary.kind == "watched" and summary.step == 100
