"""Reads right after a step, on a real uvicorn: the step's signals and history are
recorded once its reply has left (for a stepper this size, on the compute thread, while
the event loop serves the next request), and every read of them waits for that."""

from __future__ import annotations

import httpx
import torch
from conftest import LiveServer

from adamscope.client import Client, RemoteAdam

NUMEL = 4 * 100_000  # above the inline limit: stepped and settled on the compute thread


def test_a_read_right_after_a_step_sees_that_step(live_server: LiveServer) -> None:
    name = "settled-reads"
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(NUMEL // 4, generator=g).requires_grad_() for _ in range(4)]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    with Client(live_server.url) as c:
        c.create(name, [(n, p.detach()) for n, p in named], fused=True, durability="manual")
        opt = RemoteAdam(named, client=c, name=name, fused=True)
        try:
            for k in range(1, 13):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
                if k % 3 == 0:  # each kind of read comes first after some step
                    assert c.signals(name)["step"] == k
                elif k % 3 == 1:
                    report = c.history(name, limit=1)
                    assert not isinstance(report, str) and report.aggregate.steps == [k]
                else:
                    metrics = httpx.get(f"{live_server.url}/metrics").text
                    assert f'adamscope_stepper_steps_total{{stepper="{name}"}} {k}' in metrics
            report = c.history(name)
            assert not isinstance(report, str)
            assert report.aggregate.steps == list(range(1, 13))
        finally:
            c.delete(name)
