"""Issue 14's dashboard views in a real browser against a real server: an alert's link to
the tensor, step and elements it is about.

Like test_dashboard.py, the page runs under its own Content-Security-Policy, so the tests
poll with ``page.evaluate`` rather than Playwright's ``wait_for_function``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import LiveServer, run_uvicorn

from adamscope.client import Client
from adamscope.service.inspect.kernels.histogram import HISTOGRAM_EVERY
from adamscope.service.settings import Settings

from .browser_support import Watched
from .test_dashboard import wait

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with run_uvicorn(Settings(data_dir=tmp_path_factory.mktemp("views"), device="cpu")) as s:
        yield s


def focus_rows(page: Any) -> list[list[str]]:
    return list(
        page.evaluate(
            """() => [...document.querySelectorAll('#focus-top tbody tr')].map(
                (tr) => [tr.dataset.kind, ...[...tr.cells].slice(1).map((c) => c.textContent)])"""
        )
    )


def test_an_alert_links_to_its_tensor_step_and_elements(
    server: LiveServer, watched: Watched
) -> None:
    page = watched.page
    name = "views-alert"
    with Client(server.url) as c:
        c.create(name, [("w", torch.zeros(5, 3)), ("b", torch.zeros(3))], lr=1e-3)
        c.set_alerts(
            name, [{"kind": "above", "signal": "lr_fell_count", "tensor": "w", "threshold": 0}]
        )
        ones = {"w": torch.ones(5, 3), "b": torch.ones(3)}
        for k in range(1, 13):
            g = {n: t.clone() for n, t in ones.items()}
            if k == 6:
                g["w"][2, 1] = 1000.0  # its v jumps: its effective LR falls ~1000-fold
            c.step(name, g)
    page.goto(f"{server.url}/dashboard#/{name}")
    link = page.locator("#alerts-events a.alert-link")
    link.first.wait_for()
    assert link.count() == 1
    assert "step=6" in str(link.first.get_attribute("href"))
    link.first.click()
    wait(page, "() => !document.getElementById('focus').hidden")
    wait(page, "() => document.querySelectorAll('#focus-top tbody tr').length > 0")
    assert "step=6" in page.evaluate("() => location.hash")
    rows = focus_rows(page)
    # The largest fall first: flat index 7 is row 2, column 1 of the 5x3 tensor.
    assert rows[0][:4] == ["lr_change", "7", "2", "1"]
    assert float(rows[0][4]) < 0.01
    assert [r[:4] for r in rows if r[0] == "shock"][0] == ["shock", "7", "2", "1"]
    # The signal around the step (steps 1..12 here), with the step marked; the view
    # switched its charts to the tensor.
    wait(page, "() => Number(document.getElementById('focus-canvas').dataset.values) === 12")
    assert page.evaluate("() => window.adamscope.state.view.chartTensor") == "w"
    # The link is shareable: a fresh page opened at it shows the same.
    url = page.url
    page.goto("about:blank")
    page.goto(url)
    wait(page, "() => document.querySelectorAll('#focus-top tbody tr').length > 0")
    assert focus_rows(page) == rows
    assert watched.unexpected() == []


def test_one_signal_of_several_steppers_on_one_chart(server: LiveServer, watched: Watched) -> None:
    page = watched.page
    runs = {"views-run-a": 5, "views-run-b": 8}
    with Client(server.url) as c:
        for name, steps in runs.items():
            c.create(name, [("w", torch.zeros(4, 4))], lr=1e-2)
            for k in range(steps):
                c.step(name, {"w": torch.full((4, 4), float(k + 1))})
    # Shared by URL: the fragment names the signal and the steppers.
    page.goto(
        f"{server.url}/dashboard#compare?signal=grad_norm&stepper=views-run-a&stepper=views-run-b"
    )
    lengths = "() => document.getElementById('compare-canvas').dataset.lengths"
    wait(page, f"() => ({lengths})() === '5,8'")
    assert page.evaluate("() => document.getElementById('compare-canvas').dataset.series") == "2"
    assert page.evaluate("() => document.getElementById('compare').open")
    assert page.evaluate("() => document.getElementById('detail').hidden")
    # Picked in the form: one tensor's signal, and the URL follows.
    page.fill("#compare-signal", "exp_avg_norm")
    page.fill("#compare-tensor", "w")
    page.select_option("#compare-steppers", ["views-run-b"])
    page.click("#compare-form button[type=submit]")
    wait(page, f"() => ({lengths})() === '8'")
    assert page.evaluate("() => location.hash") == (
        "#compare?signal=exp_avg_norm&tensor=w&stepper=views-run-b"
    )
    # A stepper without that tensor is named, not drawn.
    page.goto(
        f"{server.url}/dashboard#compare?signal=grad_norm&tensor=b&stepper=views-run-a"
        "&stepper=views-alert"
    )
    wait(page, f"() => ({lengths})() === '0,12'")
    assert "views-run-a: " in page.evaluate(
        "() => document.getElementById('compare-facts').textContent"
    )
    watched.allow(r"status of 422 .*views-run-a/history")
    assert watched.unexpected() == []


def painted(page: Any, canvas: str) -> int:
    """Pixels of the canvas with the heat map's blue in them."""
    return int(
        page.evaluate(
            """(id) => { const c = document.getElementById(id);
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < px.length; i += 4) {
                if (px[i + 2] > 150 && px[i] < 120 && px[i + 3] > 0) n++;
            }
            return n; }""",
            canvas,
        )
    )


def test_histograms_over_time_draw_as_a_heat_map(server: LiveServer, watched: Watched) -> None:
    page = watched.page
    name = "views-heat"
    with Client(server.url) as c:
        c.create(name, [("w", torch.zeros(8, 8)), ("b", torch.zeros(8))], lr=1e-2)
        for k in range(2 * HISTOGRAM_EVERY):
            c.step(name, {"w": torch.full((8, 8), 10.0 ** (k % 4 - 2)), "b": torch.ones(8)})
    page.goto(f"{server.url}/dashboard#/{name}")
    heat = "() => ({...document.getElementById('heat-canvas').dataset})"
    found = wait(page, f"() => {{ const d = ({heat})(); return d.key && d.columns === '2' && d; }}")
    assert found["tensor"] == "w" and found["key"] == "exp_avg"
    assert int(found["cells"]) >= 2 and painted(page, "heat-canvas") > 100
    # Another quantity: w's gradient, 10**-1 and 10**1 at the two recorded steps (k % 4 is
    # 1 then 3): two bins, one cell per column.
    page.select_option("#heat-tensor", "w")
    page.select_option("#heat-key", "grad")
    found = wait(
        page, f"() => {{ const d = ({heat})(); return d.key === 'grad' && d.tensor === 'w' && d; }}"
    )
    assert (found["columns"], found["cells"]) == ("2", "2")
    assert found["bins"] == "2"
    assert "exact counts" in page.evaluate(
        "() => document.getElementById('heat-facts').textContent"
    )
    assert watched.unexpected() == []
