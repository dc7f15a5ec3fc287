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


def test_the_event_loop_runs_torch_on_one_thread_and_workers_keep_every_core(
        app_client: TestClient) -> None:
    """Tiny steppers step inline on the event loop: no parallel regions there; steppers
    stepped in worker threads (and every thread started later) keep the default count."""
    n = torch.get_num_threads()
    if n == 1:
        pytest.skip("one intra-op thread here: nothing to tell apart")
    assert app_client.portal.call(torch.get_num_threads) == 1
    assert app_client.portal.call(run_in_threadpool, torch.get_num_threads) == n
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [n] and torch.get_num_threads() == n
