"""End to end: a stepper's history survives SIGTERM and SIGKILL of a real server.

Real server processes (forked by ``crash_support.ForkServer``, complete services that
restore the data directory at start as ``adamscope serve`` does), with a small raw window
and small tiers so that old steps live in buckets. After SIGTERM the whole history comes
back as it was; after SIGKILL it comes back up to the stepper's durability point and never
past the step the stepper was restored at.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from crash_support import ForkServer
from nan_equal import same

from adamscope.client import Client
from adamscope.client.protocol import HistoryReport

pytestmark = pytest.mark.e2e

NAME = "durable"
HISTORY: dict[str, Any] = {
    "history_steps": 12,
    "history_tier_widths": [4, 16],
    "history_tier_buckets": 3,
}


@pytest.fixture(scope="module")
def forkserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path_factory.mktemp("forkserver") / "log.txt")
    try:
        yield server
    finally:
        server.close()


def grads(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + k)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def run(c: Client, first: int, last: int) -> None:
    """Steps ``first..last``, each with its loss."""
    for k in range(first, last + 1):
        c.step(NAME, grads(k))
        c.report_loss(NAME, k, 1.0 / k)


def whole(c: Client, max_points: int | None = None) -> HistoryReport:
    report = c.history(NAME, tensor="*", first=1, max_points=max_points)
    assert isinstance(report, HistoryReport)
    return report


def assert_covers(report: HistoryReport, last: int) -> None:
    """Every series runs from step 1 to ``last`` without a gap."""
    for series in (report.aggregate, report.tensors["w"]):
        assert series.first_steps is not None and series.counts is not None
        assert series.first_steps[0] == 1 and series.steps[-1] == last
        assert series.first_steps[1:] == [s + 1 for s in series.steps[:-1]]
        assert sum(series.counts) == last
    assert report.first_step == 1


def mean_of(report: HistoryReport, signal: str) -> float:
    """The run's mean of ``signal`` (a one-point query)."""
    (value,) = report.aggregate.values[signal]
    return value


def test_history_survives_sigterm_and_sigkill(forkserver: ForkServer, tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = forkserver.spawn(data, **HISTORY)
    with Client(server.url, retries=0) as c:
        g = torch.Generator().manual_seed(1)
        c.create(NAME, {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)})
        run(c, 1, 40)
        before = whole(c).model_dump()
        recent = c.history(NAME, tensor="*")
        assert_covers(whole(c), 40)
        assert any(n > 1 for n in whole(c).aggregate.counts or [])  # old steps in buckets
        grad_norm = mean_of(whole(c, max_points=1), "grad_norm")
    server.terminate()

    # SIGTERM: everything is back, raw window and tiers alike
    server = forkserver.spawn(data, **HISTORY)
    with Client(server.url, retries=0) as c:
        assert same(whole(c).model_dump(), before)
        assert same(c.history(NAME, tensor="*").model_dump(), recent.model_dump())
        # manual: on disk at step 40 from here on; the next steps are only in the history
        c.set_durability(NAME, "manual")
        run(c, 41, 55)
        assert_covers(whole(c), 55)  # the history read waits for the last step's signals
    server.kill()

    # SIGKILL: the stepper is back at its checkpoint (step 40), and so is its history
    server = forkserver.spawn(data, **HISTORY)
    with Client(server.url, retries=0) as c:
        assert c.get(NAME).step == 40
        assert_covers(whole(c), 40)
        # steps 41..55 had pushed 29..40 out of the raw window into buckets: they are
        # found there (the raw window holds only steps recorded since)
        assert all(s <= 40 for s in c.history(NAME).aggregate.steps)
        assert mean_of(whole(c, max_points=1), "grad_norm") == pytest.approx(grad_norm, 1e-12)
        losses = whole(c).loss
        assert max(losses.steps) == 40
        c.set_durability(NAME, "every_step")
        run(c, 41, 46)  # every step on disk before its reply
        assert_covers(whole(c), 46)
    server.kill()

    server = forkserver.spawn(data, **HISTORY)
    with Client(server.url, retries=0) as c:
        assert c.get(NAME).step == 46
        assert_covers(whole(c), 46)
        assert c.history(NAME).aggregate.steps[-1] == 46
    server.kill()
