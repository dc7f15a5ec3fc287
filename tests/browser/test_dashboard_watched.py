"""A watched training run in the dashboard, in a real browser against a real server: a
local optimizer stepped in a thread of this process and reported by ``adamscope.watch``.

The list says the run is ``watched``; its page shows the signals and loss the trainer
reports, growing as it steps; where a hosted stepper would show statistics of its tensors
(which a watched run keeps in its training job) the page says so and asks for none; and the
controls reach the trainer as commands: a new lr, a snapshot and a roll back, each applied
by the trainer between two steps. Polling as in test_dashboard.py (the page's
Content-Security-Policy forbids evaluated strings).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
from conftest import LiveServer, run_uvicorn

import adamscope
from adamscope.service.settings import Settings

from .browser_support import Watched
from .test_dashboard import VIEW, canvas, text, wait

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

NAME = "watched-run"


class LocalTraining:
    """A small model trained with a local fused-free AdamW in a thread, watched."""

    def __init__(self, url: str, pause: float = 0.03) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.01, foreach=True)
        self.run = adamscope.watch(self.opt, model=self.model, url=url, name=NAME)
        self.pause = pause
        self.steps = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._train, daemon=True)
        self._thread.start()

    def _train(self) -> None:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 8, generator=g)
        y = torch.sin(x.sum(1, keepdim=True))
        deadline = time.monotonic() + 100
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                self.opt.zero_grad()
                loss = torch.nn.functional.mse_loss(self.model(x), y)
                loss.backward()
                self.opt.step()
                self.run.log(loss=loss)
                self.steps += 1
                self._stop.wait(self.pause)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.run.close()
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with run_uvicorn(Settings(data_dir=tmp_path_factory.mktemp("watched"), device="cpu")) as s:
        yield s


def result(page: object, fragment: str) -> None:
    wait(
        page,
        "(f) => document.getElementById('controls-result').textContent.includes(f)",
        fragment,
        timeout=30,
    )


def test_a_watched_run_in_the_dashboard(server: LiveServer, watched: Watched) -> None:
    page = watched.page
    training = LocalTraining(server.url)
    try:
        page.goto(f"{server.url}/dashboard")
        row = page.locator(f'#steppers tr[data-id="{NAME}"]')
        row.wait_for()
        cells = row.locator("td").all_text_contents()
        assert "watched" in cells and "training job" in cells, cells
        row.click()
        wait(
            page, f"(n) => {{ const v = ({VIEW})(); return v && v.name === n && v.summary; }}", NAME
        )
        assert text(page, "#detail-facts").startswith("adamw · watched: its tensors are in")

        # the signals and the loss the trainer reports, growing as it steps
        first = wait(
            page,
            "() => window.adamscope.state.view.aggregate.steps.length > 3 && "
            "window.adamscope.state.view.aggregate.steps.length",
        )
        wait(page, "(n) => window.adamscope.state.view.aggregate.steps.length > n + 5", first)
        wait(page, "() => window.adamscope.state.view.loss.steps.length > 5")
        for chart in ("grad_norm", "update_ratio", "loss"):
            drawn = canvas(page, chart)
            assert 0 < drawn["points"] <= drawn["width"], (chart, drawn)

        # no statistics of tensors it does not hold: it says where they are, asks for none
        wait(page, "() => document.getElementById('hist-facts').textContent.includes('GET')")
        assert f"GET /v1/watch/{NAME}/state" in text(page, "#hist-facts")
        assert "training job" in text(page, "#hist-facts")
        assert "watched run" in text(page, "#heat-facts")
        watched.shot("dashboard-watched")

        # the controls are commands the trainer applies between two steps
        page.fill("#lr-input", "0.0025")
        page.click("#lr-form button[type=submit]")
        result(page, "lr set to 0.0025 by the trainer at its step")
        assert [g["lr"] for g in training.opt.param_groups] == [0.0025]
        wait(page, "() => document.getElementById('lr-current').textContent === 'now 0.0025'")

        page.fill("#snapshot-name", "before")
        page.click("#snapshot-form button[type=submit]")
        result(page, "snapshot before taken by the trainer at its step")
        wait(
            page,
            "() => [...document.getElementById('rollback-select').options]"
            ".some((o) => o.value === 'before')",
        )
        page.select_option("#rollback-select", "before")
        page.click("#rollback-button")
        assert "Confirm" in text(page, "#rollback-button")
        page.click("#rollback-button")
        result(page, "rolled back to before by the trainer at its step")
    finally:
        training.stop()
    assert training.run.counters.errors == 0
    assert watched.unexpected() == []
