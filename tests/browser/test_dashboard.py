"""The dashboard in a real browser, against a real server, while a training loop steps.

A RemoteAdam loop trains a small regression in a thread and reports its loss; the page
must show the stepper appear, its charts gain points live, a histogram, the alerts raised
by injected instabilities (a second-moment jump, then a NaN gradient), survive its event
stream dropping, and change the server's lr, take a snapshot and roll back. A second test
signs in with tokens; a third loads 200 tensors and 10,000 history points.

The page runs under its own Content-Security-Policy, which forbids evaluating strings, so
the tests poll with ``page.evaluate`` (exempt from the page's policy) rather than Playwright's
``wait_for_function``. No test asserts on timing; the large-data test prints its timings.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import LiveServer, run_uvicorn

from adamscope.client import Client, RemoteAdam
from adamscope.service.inspect.recorder import history_of
from adamscope.service.settings import Settings

from .browser_support import Watched

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

READ = "browser-read-token-0123456789"
ADMIN = "browser-admin-token-0123456789"


def wait(page: Any, js: str, arg: Any = None, timeout: float = 15.0) -> Any:
    """Poll ``js`` (a function of ``arg``) in the page until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(js, arg)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {js}")
        time.sleep(0.05)


def text(page: Any, selector: str) -> str:
    return str(page.evaluate("(s) => document.querySelector(s).textContent", selector))


def canvas(page: Any, chart: str) -> dict[str, int]:
    """What a chart's canvas says it drew (see charts.js)."""
    found = page.evaluate(
        """(c) => {
        const el = document.querySelector(`canvas[data-chart="${c}"]`)
            || document.getElementById(c);
        return el ? {...el.dataset} : null; }""",
        chart,
    )
    assert found is not None, chart
    return {k: int(float(v)) for k, v in found.items() if v.replace(".", "").isdigit()}


VIEW = "() => window.adamscope.state.view"


# ---------------------------------------------------------------------- the training loop


class Trainer:
    """RemoteAdam on a small regression, in a thread, reporting its loss every step.

    :meth:`inject` makes one step unstable: ``"shock"`` multiplies its gradients by 1e4
    (the second moment jumps: the effective LR collapses and the shock soars), ``"nan"``
    puts a NaN in one gradient (which then spreads through the model).
    """

    def __init__(self, url: str, name: str, max_steps: int = 2000, pause: float = 0.03):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )
        self.opt = RemoteAdam(self.model.named_parameters(), lr=0.01, url=url, name=name)
        self.client = Client(url)
        self.name = name
        self.max_steps = max_steps
        self.pause = pause
        self.steps = 0
        self.pending: str | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Trainer:
        self._thread.start()
        return self

    def inject(self, kind: str) -> None:
        self.pending = kind

    def _run(self) -> None:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(128, 8, generator=g)
        y = torch.sin(x.sum(1, keepdim=True))
        deadline = time.monotonic() + 90
        try:
            while (
                not self._stop.is_set()
                and self.steps < self.max_steps
                and time.monotonic() < deadline
            ):
                self.opt.zero_grad()
                loss = torch.nn.functional.mse_loss(self.model(x), y)
                loss.backward()
                kind, self.pending = self.pending, None
                if kind == "shock":
                    for p in self.model.parameters():
                        p.grad.mul_(1e4)  # type: ignore[union-attr]
                elif kind == "nan":
                    next(self.model.parameters()).grad[0, 0] = float("nan")  # type: ignore[index]
                self.opt.step()
                self.client.report_loss(self.name, None, float(loss.detach()))
                self.steps += 1
                self._stop.wait(self.pause)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def wait_steps(self, n: int, timeout: float = 30) -> None:
        target = self.steps + n
        deadline = time.monotonic() + timeout
        while self.steps < target:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"the loop made {self.steps} of {target} steps"
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.client.close()
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with run_uvicorn(Settings(data_dir=tmp_path_factory.mktemp("browser"), device="cpu")) as s:
        yield s


def record_status(page: Any) -> None:
    """Keep every state the stream indicator shows in window.__statuses."""
    page.evaluate("""() => {
        const el = document.getElementById('stream-status');
        window.__statuses = [el.dataset.state];
        new MutationObserver(() => window.__statuses.push(el.dataset.state))
            .observe(el, {attributes: true}); }""")


# ---------------------------------------------------------------------- the training run


def test_a_training_run_live(server: LiveServer, watched: Watched) -> None:
    page = watched.page
    drop = {"armed": False}

    def events_route(route: Any) -> None:
        """Passes the event stream through; when armed, makes the server end the next one
        after a second (a real drop, from the server's side)."""
        if drop["armed"]:
            drop["armed"] = False
            url = route.request.url
            route.continue_(url=url + ("&" if "?" in url else "?") + "duration=1")
        else:
            route.continue_()

    page.route("**/v1/events*", events_route)
    page.goto(f"{server.url}/dashboard")
    wait(page, "() => document.getElementById('stream-status').dataset.state === 'live'")
    assert text(page, "#identity") == "no tokens configured · admin"

    name = "browser-run"
    trainer = Trainer(server.url, name).start()
    try:
        # the stepper appears (from its first step event), and opens on a click
        row = page.locator(f'#steppers tr[data-id="{name}"]')
        row.wait_for()
        row.click()
        wait(
            page,
            "(n) => { const v = window.adamscope.state.view; "
            "return v && v.name === n && v.summary; }",
            name,
        )
        assert page.url.endswith(f"/dashboard#/{name}") and "token" not in page.url

        # the charts gain points as it steps
        trainer.wait_steps(5)
        first = wait(page, "() => window.adamscope.state.view.aggregate.steps.length")
        trainer.wait_steps(10)
        wait(page, "(n) => window.adamscope.state.view.aggregate.steps.length > n + 5", first)
        wait(page, "() => window.adamscope.state.view.loss.steps.length > 5")
        for chart in ("lr_eff", "update_ratio", "grad_norm", "loss"):
            drawn = canvas(page, chart)
            assert 0 < drawn["points"] <= drawn["width"], (chart, drawn)

        # any other signal, chosen in the custom chart
        page.check('#chart-choices input[data-chart="custom"]')
        page.select_option('figure[data-chart="custom"] select', "eps_dominance")
        wait(
            page,
            """() => { const d = document.querySelector(
                'canvas[data-chart="custom"]').dataset;
                return Number(d.points) > 5 && d.series === "1"; }""",
        )
        assert "eps_dominance" in text(page, 'figure[data-chart="custom"] .legend')

        # a histogram of the selected tensor's exp_avg
        wait(page, "() => Number(document.getElementById('hist-canvas').dataset.total) > 0")
        drawn = canvas(page, "hist-canvas")
        assert drawn["bins"] > 0 and drawn["total"] == 256  # 0.weight is 32 x 8
        assert "0.weight exp_avg" in text(page, "#hist-facts")
        page.select_option("#hist-key", "lr_eff")
        wait(page, "() => document.getElementById('hist-canvas').dataset.key === 'lr_eff'")
        # the bias-correction curves, with the current step marked
        wait(page, "() => Number(document.getElementById('bias-canvas').dataset.step) >= 1")
        assert "1-β1^t" in text(page, "#bias-facts")

        # the stream drops (the server ends it): the page says so, reconnects, and resumes
        # where it left off (Last-Event-ID), so no step is missing from the charts
        record_status(page)
        drop["armed"] = True
        page.select_option("#chart-tensor", "0.weight")  # a new stream, which will drop
        wait(page, "() => window.__statuses.includes('reconnecting')")
        assert text(page, "#stream-status") in {"reconnecting…", "connecting…", "live"}
        wait(
            page,
            "() => window.__statuses.lastIndexOf('live') > "
            "window.__statuses.indexOf('reconnecting')",
        )
        trainer.wait_steps(10)
        time.sleep(0.5)
        for series in ("aggregate", "tensorSeries"):
            steps = page.evaluate(f"() => window.adamscope.state.view.{series}.steps")
            assert len(steps) > 20 and steps == list(range(steps[0], steps[-1] + 1)), series
        watched.shot("dashboard-live")

        # a second-moment jump: the effective LR swings and the shock soars
        trainer.inject("shock")
        trainer.wait_steps(3)
        wait(
            page,
            "() => document.getElementById('alerts-events').textContent"
            ".includes('lr_eff_p99 swing')",
        )
        assert "shock_p99 > 100" in text(page, "#alerts-events")

        # change the lr while it trains: the server has it, and the loop does not undo it
        page.fill("#lr-input", "0.0025")
        page.click("#lr-form button[type=submit]")
        wait(
            page,
            "() => document.getElementById('controls-result').textContent"
            ".includes('lr set to 0.0025')",
        )
        with Client(server.url) as c:
            assert [g.lr for g in c.get(name).groups] == [0.0025]
            trainer.wait_steps(3)
            assert [g.lr for g in c.get(name).groups] == [0.0025]
        assert text(page, "#lr-current") == "now 0.0025"

        # a NaN gradient: a nonfinite alert, flagged in the list and the table
        trainer.inject("nan")
        trainer.wait_steps(3)
        wait(
            page, "() => document.getElementById('alerts-active').textContent.includes('nonfinite')"
        )
        page.locator(f'#steppers tr[data-id="{name}"] .badge.bad').wait_for()
        wait(page, "() => document.querySelector('#params .flag')")
        watched.shot("dashboard-alerts")
    finally:
        trainer.stop()

    # snapshot, step on, roll back
    page.fill("#snapshot-name", "before")
    page.click("#snapshot-form button[type=submit]")
    wait(
        page,
        "() => document.getElementById('controls-result').textContent"
        ".includes('snapshot before taken')",
    )
    with Client(server.url) as c:
        at = c.get(name).step
        for _ in range(2):
            c.step(name, {"2.bias": torch.ones(1)})
        assert c.get(name).step == at + 2
        wait(page, "(n) => window.adamscope.state.view.aggregate.last === n", at + 2)
        page.select_option("#rollback-select", "before")
        page.click("#rollback-button")
        assert "Confirm" in text(page, "#rollback-button")  # a second click rolls back
        page.click("#rollback-button")
        wait(
            page,
            "() => document.getElementById('controls-result').textContent"
            ".includes('rolled back to before')",
        )
        assert c.get(name).step == at
    assert page.evaluate("() => window.adamscope.state.view.aggregate.last") <= at
    watched.shot("dashboard-rolled-back")
    assert watched.unexpected() == []


# ---------------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("guarded"),
        device="cpu",
        tokens=[
            {"token": READ, "scope": "read", "name": "viewer"},
            {"token": ADMIN, "scope": "admin", "name": "operator"},
        ],
    )
    with run_uvicorn(settings) as s, Client(s.url, token=ADMIN) as c:
        c.create("guarded-net", [("w", torch.ones(3, 3)), ("b", torch.zeros(3))], lr=0.01)
        for _ in range(3):
            c.step("guarded-net", {"w": torch.randn(3, 3), "b": torch.randn(3)})
        yield s


def test_a_read_only_token_sees_everything_and_no_controls(
    guarded: LiveServer, watched: Watched
) -> None:
    page = watched.page
    # Without a token the page's first question (whoami) is refused, which the browser
    # logs; that one error is expected.
    watched.allow(r"status of 401 .*\(http://127\.0\.0\.1:\d+/v1/whoami\)")
    page.goto(f"{guarded.url}/dashboard#/guarded-net")
    page.locator("#auth-needed").wait_for()
    assert text(page, "#stream-status") == "not authorized"

    page.fill("#token-input", READ)
    page.press("#token-input", "Enter")
    wait(page, "() => document.getElementById('identity').textContent === 'viewer · read'")
    page.locator('#steppers tr[data-id="guarded-net"]').wait_for()
    wait(page, "() => { const v = window.adamscope.state.view; return v && v.summary; }")
    wait(page, "() => document.getElementById('stream-status').dataset.state === 'live'")
    assert page.is_hidden("#auth-needed")
    for form in ("#lr-form", "#snapshot-form", "#rollback-form"):
        assert page.is_hidden(form), form
    assert page.is_visible("#controls-readonly")
    # the token is in this tab's session storage and the field was cleared; never in a URL
    assert page.evaluate("() => sessionStorage.getItem('adamscope.token')") == READ
    assert page.input_value("#token-input") == ""
    assert READ not in page.url
    page.reload()  # stays signed in, without a 401 this time
    wait(page, "() => document.getElementById('identity').textContent === 'viewer · read'")
    wait(page, "() => Number(document.getElementById('hist-canvas').dataset.total) > 0")

    page.fill("#token-input", ADMIN)
    page.press("#token-input", "Enter")
    wait(page, "() => document.getElementById('identity').textContent === 'operator · admin'")
    wait(page, "() => { const v = window.adamscope.state.view; return v && v.summary; }")
    for form in ("#lr-form", "#snapshot-form", "#rollback-form"):
        page.locator(form).wait_for(state="visible")
    assert page.is_hidden("#controls-readonly")
    errors = [e for e in watched.errors if "401" in e]
    assert len(errors) == 1, watched.errors
    assert watched.unexpected() == []


# ---------------------------------------------------------------------- a large stepper


TENSORS = 200
HISTORY = 10_000


def fill_history(server: LiveServer, name: str, steps: int) -> None:
    """Give ``name`` a history of ``steps`` steps: the first ``steps - 1`` recorded through
    the service's own History (stepping them for real takes over ten seconds here), the
    stepper's count moved there, and the last one a real step of every tensor."""
    assert server.app is not None
    stepper = server.app.state.registry.get(name)
    observer = history_of(stepper)
    assert observer is not None
    history = observer.history
    tensor_rows = history._tensor_capacity(16)
    t0 = time.time() - steps
    for s in range(1, steps):
        x = s / steps
        aggregate = {
            "lr_eff_p1": 1e-4 * (1 + x),
            "lr_eff_p50": 1e-3 * (1 + x),
            "lr_eff_p99": 1e-2 * (1 + x) * (1.5 if s % 997 == 0 else 1.0),
            "update_ratio": 1e-3 / (1 + 10 * x),
            "shock_p99": 1 + (s % 50) / 10,
            "grad_norm": 1 / (1 + x) + 0.1 * ((s * 7919) % 101) / 101,
            "nan_count": 0.0,
            "inf_count": 0.0,
        }
        per_tensor = {n: aggregate for n in stepper.names} if s > steps - tensor_rows else {}
        history.record(s, s, t0 + s, aggregate, per_tensor)
        history.record_loss(s, 2.0 / (1 + 5 * x), t0 + s)
    with stepper.lock:
        stepper.step_count = steps - 1
    with Client(server.url) as c:
        c.step(name, {n: torch.randn(4, 4) for n in stepper.names})


def test_two_hundred_tensors_and_ten_thousand_steps(server: LiveServer, watched: Watched) -> None:
    page = watched.page
    name = "browser-wide"
    names = [f"layer{i:03d}.weight" for i in range(TENSORS)]
    with Client(server.url) as c:
        c.create(name, [(n, torch.randn(4, 4)) for n in names], lr=1e-3)
    fill_history(server, name, HISTORY)

    start = time.perf_counter()
    page.goto(f"{server.url}/dashboard#/{name}")
    wait(
        page,
        "(n) => { const v = window.adamscope.state.view; "
        "return v && v.aggregate.steps.length === n; }",
        HISTORY,
        timeout=30,
    )
    wait(
        page,
        "() => document.querySelector('#params .pager span').textContent.startsWith('1–50 of 200')",
    )
    loaded = time.perf_counter() - start

    # every chart drew the 10,000 points as at most one point per pixel
    for chart in ("lr_eff", "update_ratio", "shock", "grad_norm", "loss"):
        drawn = wait(
            page,
            """(c) => { const d = document.querySelector(
                `canvas[data-chart="${c}"]`).dataset;
                return Number(d.points) > 0 && {points: +d.points, width: +d.width}; }""",
            chart,
        )
        assert drawn["points"] <= drawn["width"], (chart, drawn)
    assert page.evaluate(f"() => ({VIEW})().loss.steps.length") == HISTORY - 1

    # every row is reachable, page by page, in the order sorted
    def rows() -> list[str]:
        return list(
            page.evaluate(
                "() => [...document.querySelectorAll('#params tbody tr')].map(r => r.dataset.id)"
            )
        )

    t = time.perf_counter()
    page.click('#params th button[data-sort="name"]')  # name, descending
    wait(page, "(n) => document.querySelector('#params tbody tr').dataset.id === n", names[-1])
    sort_ms = (time.perf_counter() - t) * 1e3
    seen: list[str] = rows()
    while page.is_enabled('#params button[data-role="next"]'):
        page.click('#params button[data-role="next"]')
        seen += rows()
    assert seen == names[::-1]
    values = page.evaluate(
        "() => [...document.querySelectorAll('#params tbody tr')].map(r => r.cells[5].textContent)"
    )
    assert all(v for v in values), "every tensor shows its gradient norm"

    t = time.perf_counter()
    page.fill("#param-filter", "layer19")
    wait(page, "() => document.querySelectorAll('#params tbody tr').length === 10")
    filter_ms = (time.perf_counter() - t) * 1e3
    assert rows() == sorted((n for n in names if "layer19" in n), reverse=True)

    t = time.perf_counter()
    page.click('#params tr[data-id="layer195.weight"]')  # charts and histogram follow
    wait(
        page,
        "() => { const v = window.adamscope.state.view; return "
        "v.chartTensor === 'layer195.weight' && v.tensorSeries.steps.length > 0; }",
    )
    switch_ms = (time.perf_counter() - t) * 1e3
    wait(page, "() => document.getElementById('hist-canvas').dataset.tensor === 'layer195.weight'")
    watched.shot("dashboard-large")
    timings = {
        "load_s": round(loaded, 2),
        "sort_ms": round(sort_ms),
        "filter_ms": round(filter_ms),
        "switch_tensor_ms": round(switch_ms),
    }
    print(f"\ndashboard with {TENSORS} tensors and {HISTORY} steps: {json.dumps(timings)}")
    assert watched.unexpected() == []
