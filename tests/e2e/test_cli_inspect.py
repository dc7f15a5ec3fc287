"""The ``adamscope`` inspection commands against a real uvicorn on 127.0.0.1: ls, show,
stats, history (table and CSV), alerts, and watch (one frame with --once, as a separate
process through the console script's code path too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from conftest import ROOT, LiveServer

from adamscope.client import Client
from adamscope.service import cli
from adamscope.service.cli.inspect import render_watch

pytestmark = pytest.mark.e2e


@pytest.fixture
def stepped(live_server: LiveServer) -> str:
    """A stepper with 3 steps and a reported loss; its name."""
    name = f"cli-{uuid.uuid4().hex[:8]}"
    gen = torch.Generator().manual_seed(0)
    with Client(live_server.url) as c:
        c.create(
            name,
            {"layer.w": torch.randn(4, 3, generator=gen), "layer.b": torch.zeros(3)},
            lr=0.01,
            durability="manual",
        )
        for _ in range(3):
            c.step(
                name,
                {
                    "layer.w": torch.randn(4, 3, generator=gen),
                    "layer.b": torch.randn(3, generator=gen),
                },
            )
        c.report_loss(name, 3, 0.125)
    return name


def run(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    code = cli.main([*argv, "--url", url])
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_and_show(
    live_server: LiveServer, stepped: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, live_server.url, "ls")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "OPTIMIZER", "DEVICE", "STEP", "PARAMS", "ALERTS", "UPDATED"]
    mine = next(r for r in rows if r.startswith(stepped))
    assert mine.split()[:6] == [stepped, "adam", "cpu", "3", "15", "0"]
    code, out, _ = run(capsys, live_server.url, "show", stepped)
    assert code == 0
    assert out.startswith(f"{stepped}: adam on cpu, step 3, 15 parameters")
    assert "alerts 0 (0 active)" in out
    assert any(
        line.split()[:5] == ["layer.w", "4x3", "float32", "0", "3"] for line in out.splitlines()
    )
    code, _, err = run(capsys, live_server.url, "show", "no-such-stepper")
    assert code == 1 and "404 stepper_not_found" in err


def test_stats_describes_parameters_and_state(
    live_server: LiveServer, stepped: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, live_server.url, "stats", stepped, "--key", "param", "--key", "exp_avg_sq"
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{stepped} at step 3"
    assert lines[1].split()[:7] == ["TENSOR", "KEY", "NORM", "MEAN", "STD", "MIN", "MAX"]
    assert lines[1].split()[-3:] == ["NAN", "INF", "ZEROS"]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["layer.w", "param"],
        ["layer.w", "exp_avg_sq"],
        ["layer.b", "param"],
        ["layer.b", "exp_avg_sq"],
        ["(aggregate)", "param"],
        ["(aggregate)", "exp_avg_sq"],
    ]
    with Client(live_server.url) as c:
        report = c.stats(stepped, keys=["param"])
    row = lines[2].split()
    # printed with 4 significant digits
    assert float(row[2]) == pytest.approx(report["tensors"]["layer.w"]["param"]["norm"], rel=1e-3)


def test_stats_signals_shows_the_latest_signals_per_tensor(
    live_server: LiveServer,
    stepped: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, live_server.url, "stats", stepped, "--signals")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{stepped} at step 3") and "loss 0.125 at step 3" in lines[0]
    assert lines[1].split()[:3] == ["TENSOR", "GRAD_NORM", "UPDATE_RATIO"]
    assert [line.split()[0] for line in lines[2:]] == ["(aggregate)", "layer.w", "layer.b"]
    with Client(live_server.url) as c:
        report = c.history(stepped, tensor="*", limit=1)
    row = lines[3].split()
    assert float(row[1]) == pytest.approx(
        report.tensors["layer.w"].values["grad_norm"][-1], rel=1e-3
    )


def test_stats_all_shows_every_signal_as_its_help_says(
    live_server: LiveServer,
    stepped: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--all only means something for signals: it shows them (every one), with or without
    --signals, never the statistics table."""
    with Client(live_server.url) as c:
        signals = c.history(stepped, tensor="*", limit=1).signals
    for argv in (["--all"], ["--signals", "--all"]):
        code, out, _ = run(capsys, live_server.url, "stats", stepped, *argv)
        assert code == 0
        header = out.splitlines()[1].split()
        assert header == ["TENSOR", *[s.upper() for s in signals]], argv
    with pytest.raises(SystemExit):
        cli.main(["stats", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Statistics of the parameters and Adam state" in help_text
    assert "the latest step's signals, every one (implies --signals)" in help_text


def test_history_as_a_table_and_as_csv(
    live_server: LiveServer, stepped: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, live_server.url, "history", stepped, "--signal", "grad_norm", "--tensor", "layer.b"
    )
    assert code == 0
    blocks = out.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == ["(aggregate)", "layer.b"]
    assert [line.split()[0] for line in blocks[1].splitlines()[1:]] == ["STEP", "1", "2", "3"]
    assert blocks[0].splitlines()[-1].split()[1] == "0.125"  # the loss of step 3
    code, out, _ = run(capsys, live_server.url, "history", stepped, "--csv", "--tensor", "*")
    assert code == 0
    with Client(live_server.url) as c:
        assert out == c.history(stepped, tensor="*", fmt="csv")
    assert out.splitlines()[0].startswith("step,time,tensor,loss,")


def test_alerts_set_and_show(
    live_server: LiveServer, stepped: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(
        json.dumps([{"kind": "above", "signal": "grad_norm", "threshold": 0, "tensor": "layer.b"}])
    )
    code, out, _ = run(capsys, live_server.url, "alerts", stepped, "--set", f"@{rules}")
    assert code == 0 and "1 rule(s)" in out and "grad_norm > 0  [tensor layer.b]" in out
    with Client(live_server.url) as c:
        c.step(stepped, {"layer.b": torch.ones(3)})
    code, out, _ = run(capsys, live_server.url, "alerts", stepped)
    assert code == 0
    assert "1 alert(s) raised, 1 active" in out
    assert "step 4  layer.b  grad_norm > 0: 1.732" in out
    code, out, _ = run(capsys, live_server.url, "alerts", stepped, "--set", "defaults")
    assert code == 0 and "4 rule(s) (the defaults)" in out
    code, _, err = run(capsys, live_server.url, "alerts", stepped, "--set", '[{"kind": 1}]')
    assert code == 1 and "422 request_validation_error" in err


def test_watch_once_prints_the_latest_step(
    live_server: LiveServer, stepped: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, live_server.url, "watch", stepped, "--once")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{stepped}  step 3  ") and lines[0].endswith("loss 0.125")
    assert lines[1].split()[:2] == ["TENSOR", "GRAD_NORM"]
    assert [line.split()[0] for line in lines[2:5]] == ["(aggregate)", "layer.w", "layer.b"]
    assert "\x1b[" not in out  # no terminal: no escape codes


def test_watch_once_without_any_step_gives_up_after_its_timeout(
    live_server: LiveServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = f"cli-idle-{uuid.uuid4().hex[:8]}"
    with Client(live_server.url) as c:
        c.create(name, {"w": torch.zeros(2)}, durability="manual")
    code, out, err = run(capsys, live_server.url, "watch", name, "--once", "--timeout", "0.2")
    assert code == 1 and out == "" and f"no step of {name} within 0.2s" in err


def test_watch_frames_show_alerts_and_cap_tensors() -> None:
    event = {
        "stepper": "net",
        "step": 7,
        "time": 0.0,
        "aggregate": {"grad_norm": 1.5, "lr_eff_p99": 0.002},
        "tensors": {f"t{i}": {"grad_norm": float(i)} for i in range(5)},
        "tensors_omitted": 2,
    }
    alert = {
        "step": 7,
        "tensor": "t1",
        "rule": "lr_eff_p99 swing > 0.5",
        "value": 0.001,
        "previous": 0.004,
    }
    frame = render_watch(event, [alert], 0.25, max_rows=3, color=True)
    lines = frame.splitlines()
    assert lines[0] == "\x1b[1mnet\x1b[0m  step 7  " + lines[0].split("  ")[2] + "  loss 0.25"
    assert [line.split()[0] for line in lines[2:6]] == ["(aggregate)", "t0", "t1", "t2"]
    assert "... 4 more tensor(s)" in frame
    assert "step 7  t1  lr_eff_p99 swing > 0.5: 0.001 (was 0.004)" in frame


def test_watch_through_the_console_script(live_server: LiveServer, stepped: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAMSCOPE_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "adamscope.service.cli",
            "watch",
            stepped,
            "--once",
            "--url",
            live_server.url,
        ],
        cwd=ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{stepped}  step 3  ")
