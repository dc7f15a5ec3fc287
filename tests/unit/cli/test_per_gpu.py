"""``serve --per-gpu`` on a host with several GPUs (simulated: the worker plan is a pure
function of the visible GPU count and the parent's CUDA_VISIBLE_DEVICES), and the default
device where CUDA is available."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from adamscope.service import cli
from adamscope.service.cli import serve as cli_serve
from adamscope.service.cli.history_options import history_overrides
from adamscope.service.settings import Settings

UUIDS = "GPU-8d3a6c4e-0b1f-4a43-9c3e-2f6f0c1d9e01,GPU-1b2c3d4e-5f60-4172-8394-a5b6c7d8e9f0"


@pytest.mark.parametrize(
    ("parent", "count", "expected"),
    [
        (None, 2, ["0", "1"]),
        ("3,5", 2, ["3", "5"]),  # a scheduler gave this job GPUs 3 and 5
        (" 6 , 2 ", 2, ["6", "2"]),
        (UUIDS, 2, UUIDS.split(",")),
        (
            "MIG-0d7e2c5a-1b3f-4c6d-8e9f-a0b1c2d3e4f5",
            1,
            ["MIG-0d7e2c5a-1b3f-4c6d-8e9f-a0b1c2d3e4f5"],
        ),
        ("4,5,6", 2, ["4", "5"]),  # CUDA counts only the valid leading entries
        (None, 0, []),
    ],
)
def test_each_worker_gets_the_parents_ith_visible_gpu(
    parent: str | None, count: int, expected: list[str]
) -> None:
    assert cli_serve.visible_devices(parent, count) == expected


def test_a_visible_list_shorter_than_the_count_is_refused() -> None:
    with pytest.raises(ValueError, match="names 1 device"):
        cli_serve.visible_devices("7", 2)


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        (None, None),
        ("cpu", "cpu"),
        ("cuda", "cuda"),
        ("cuda:0", "cuda"),
        ("cuda:3", "cuda"),
    ],
)
def test_a_worker_sees_its_gpu_as_cuda_0(device: str | None, expected: str | None) -> None:
    assert cli_serve.worker_device(device) == expected


def _args(*flags: str) -> object:
    return cli.build_parser().parse_args(["serve", "--per-gpu", *flags])


def test_the_worker_commands_on_two_gpus_of_a_scheduler(tmp_path: Path) -> None:
    args = _args("--device", "cuda:1", "--log-level", "warning", "--max-steppers", "4")
    plan = cli_serve.worker_commands(args, 9000, tmp_path, 2, "3,5")  # type: ignore[arg-type]
    assert [env for _, env in plan] == [
        {"CUDA_VISIBLE_DEVICES": "3"},
        {"CUDA_VISIBLE_DEVICES": "5"},
    ]
    for i, (cmd, _) in enumerate(plan):
        assert cmd[:4] == [sys.executable, "-m", "adamscope.service.cli", "serve"]
        flags = dict(zip(cmd[4::2], cmd[5::2], strict=False))
        assert flags["--port"] == str(9000 + i)
        assert flags["--data-dir"] == str(tmp_path / f"worker{i}")
        assert flags["--device"] == "cuda"  # not cuda:1, which the worker cannot see
        assert flags["--max-steppers"] == "4" and flags["--log-level"] == "warning"


def test_without_a_gpu_one_cpu_worker_keeps_its_device(tmp_path: Path) -> None:
    plan = cli_serve.worker_commands(
        _args("--device", "cpu"),
        9000,
        tmp_path,
        0,  # type: ignore[arg-type]
        "0,1",
    )
    assert len(plan) == 1 and plan[0][1] == {}
    assert plan[0][0][plan[0][0].index("--device") + 1] == "cpu"


def test_the_default_device_is_cuda_where_cuda_is_available(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ADAMSCOPE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Settings().default_device() == "cuda"
    assert Settings(device="cpu").default_device() == "cpu"
    monkeypatch.setenv("ADAMSCOPE_DEVICE", "cpu")  # what the test tiers set (conftest)
    assert Settings().default_device() == "cpu"


def test_the_history_options_become_settings_and_reach_the_workers(tmp_path: Path) -> None:
    flags = ("--history-steps", "500", "--history-tier-widths", "10,100", "--history-in-memory")
    args = _args(*flags)
    assert history_overrides(args) == {  # type: ignore[arg-type]
        "history_steps": 500,
        "history_tier_widths": [10, 100],
        "history_durable": False,
    }
    settings = Settings(**history_overrides(args))  # type: ignore[arg-type]
    assert settings.history_tier_widths == [10, 100] and not settings.history_durable
    cmd, _ = cli_serve.worker_commands(args, 9000, tmp_path, 1, None)[0]  # type: ignore[arg-type]
    assert cmd[-5:] == [*flags]
    with pytest.raises(SystemExit):
        _args("--history-tier-widths", "10,15")  # 15 is not a multiple of 10
