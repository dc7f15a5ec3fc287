"""Shared fixtures: the in-process app, and real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mutation_tiers
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from adamscope.service.app import create_app
from adamscope.service.settings import Settings
from adamscope.service.testing import spawned

ROOT = Path(__file__).resolve().parent.parent

# The CPU tiers run on the CPU wherever they run. Without a device, the service puts its
# steppers on a GPU where one is available (its default device is then cuda), and every
# test that compares a server without --device (spawned, or Settings() without one) with
# CPU references would test something else on a GPU host. Tests of the GPU name "cuda".
os.environ["ADAMSCOPE_DEVICE"] = "cpu"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mutation_tiers.select(config, items)  # a no-op unless mutmut runs the tests
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is false here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", device="cpu")


@pytest.fixture
def app_client(settings: Settings) -> Iterator[TestClient]:
    """The real app in process (lifespan run by TestClient)."""
    with TestClient(create_app(settings)) as c:
        yield c


@dataclass
class LiveServer:
    url: str
    settings: Settings
    app: FastAPI | None = None  # the served app, for tests that look inside the service


@contextlib.contextmanager
def run_uvicorn(settings: Settings) -> Iterator[LiveServer]:
    """A real uvicorn serving the app on 127.0.0.1 and an ephemeral port, in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(settings)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", settings, app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One real uvicorn for the session (tests use unique stepper names)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("live"), device="cpu")
    with run_uvicorn(settings) as server:
        yield server


@contextlib.contextmanager
def spawn_server(
    data_dir: Path, *extra: str, timeout: float = 60, stop_timeout: float = 15
) -> Iterator[str]:
    """``adamscope serve`` as a separate process (the console script's code path)."""
    with spawned(data_dir, *extra, timeout=timeout, stop_timeout=stop_timeout, cwd=ROOT) as server:
        yield server.url


# ---------------------------------------------------------------------- checkpoints (issue 16)


@pytest.fixture(scope="session")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank FSDP2 AdamW job: 3 steps, DCP saved (nested and flattened), 2 more steps."""
    from checkpoint_support import run_fsdp_job

    out = tmp_path_factory.mktemp("fsdp")
    seconds = run_fsdp_job(out, "train", "3", "2")
    print(f"\nFSDP2 train job: {seconds:.1f} s wall")
    return out


@pytest.fixture(scope="session")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A Hugging Face Trainer run of a tiny random Llama (checkpoints at steps 2 and 4)."""
    pytest.importorskip("transformers")
    from checkpoint_support import HFRun, train_hf

    out = tmp_path_factory.mktemp("hf")
    start = time.perf_counter()
    _, saved = train_hf(out, seed=0)
    run = HFRun(out, saved, time.perf_counter() - start)
    print(f"\nHF Trainer run (4 steps, 2 checkpoints): {run.seconds:.1f} s")
    return run
