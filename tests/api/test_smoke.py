"""The service answers: in process, on a real uvicorn, and with its threads set up."""

from __future__ import annotations

import threading

import pytest
import torch
from fastapi.testclient import TestClient
from starlette.concurrency import run_in_threadpool


def test_health(app_client):
    r = app_client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_live_server_health(live_server):
    import httpx

    assert httpx.get(f"{live_server.url}/healthz").json()["steppers"] >= 0


def test_only_the_compute_thread_runs_torch_on_every_core(app_client: TestClient) -> None:
    """One thread (the compute thread, where CPU steppers step) has PyTorch's intra-op
    threads; the event loop, the thread pool and every thread started later run PyTorch on
    one thread, so that no second OpenMP pool slows every parallel region down."""
    compute = app_client.app.state.serving.compute  # type: ignore[attr-defined]
    n = compute.threads  # PyTorch's default in this process
    if n == 1:
        pytest.skip("one intra-op thread here: nothing to tell apart")
    assert compute.executor is not None
    assert compute.executor.submit(torch.get_num_threads).result() == n
    assert app_client.portal.call(torch.get_num_threads) == 1
    assert app_client.portal.call(run_in_threadpool, torch.get_num_threads) == 1
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [1]
