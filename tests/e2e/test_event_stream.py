"""End to end: the live event stream from a real uvicorn on 127.0.0.1 to a real client.

The SSE bar: while a training loop (RemoteAdam, in another thread) trains a model, a client
receives one step event per step, in order, with the step's signals (the same values the
history then serves) and the reported losses. The alert bar over the wire: the synthetic
sequence of tests/alert_bar.py raises the effective-LR swing alert in the stream for Adam
and none for AMSGrad. Then: resuming with Last-Event-ID after a disconnect, the server
dropping a disconnected subscriber, keep-alive comments, the async client.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import alert_bar
import httpx
import pytest
import torch
from conftest import LiveServer
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from adamscope.client import AsyncClient, Client, RemoteAdam
from adamscope.service.inspect.schedule import GROUP_FIELDS
from adamscope.service.inspect.signals import SIGNALS

pytestmark = pytest.mark.e2e

#: Every wait in this module gives up after this long (nothing here should take a second).
PATIENCE = 60.0
STEPS = 25


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def in_thread(work: Any) -> Iterator[list[BaseException]]:
    """Run ``work()`` in a thread for the block; its exception (if any) is re-raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        thread.join(PATIENCE)
        assert not thread.is_alive(), "the worker thread did not finish"
    if errors:
        raise errors[0]


def subscribers(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "adamscope_event_subscribers":
                return float(s.value)
    raise AssertionError("no adamscope_event_subscribers gauge")


def test_sse_bar_a_client_receives_every_step_of_a_training_loop(
    live_server: LiveServer,
) -> None:
    name = unique("sse-train")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=gen)
    y = x.sum(dim=1, keepdim=True).sin()
    losses: dict[int, float] = {}

    def train() -> None:
        opt = RemoteAdam(model.named_parameters(), lr=1e-2, url=live_server.url, name=name)
        try:
            for k in range(STEPS):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                losses[k + 1] = loss.item()
                opt.client.report_loss(name, k + 1, loss.item())
        finally:
            opt.close()

    steps: list[dict[str, Any]] = []
    reported: dict[int, float] = {}
    with Client(live_server.url) as c:
        stream = c.events(name, max_events=STEPS, duration=PATIENCE)
        opening = next(stream)
        assert opening["event"] == "open" and opening["data"]["steppers"] == [name]
        with in_thread(train):  # subscribed first: no step can be missed
            for event in stream:
                if event["event"] == "step":
                    steps.append(event)
                elif event["event"] == "loss":
                    reported[event["data"]["step"]] = event["data"]["loss"]
        history = c.history(name, tensor="*")

    assert [e["data"]["step"] for e in steps] == list(range(1, STEPS + 1))
    epoch = opening["data"]["epoch"]
    seqs = [e["data"]["seq"] for e in steps]
    assert seqs == sorted(seqs) and [e["id"] for e in steps] == [f"{epoch}-{s}" for s in seqs]
    names = {"0.weight", "0.bias", "2.weight", "2.bias"}
    for i, event in enumerate(steps):
        data = event["data"]
        assert data["stepper"] == name and set(data["tensors"]) == names
        # every signal, and the one param group's schedule (lr, betas, bc1, bc2, step size)
        assert set(data["aggregate"]) == set(SIGNALS) | {f"group0.{k}" for k in GROUP_FIELDS}
        for s in ("grad_norm", "update_ratio", "lr_eff_p99"):  # defined from step 1 on
            assert data["aggregate"][s] == history.aggregate.values[s][i]
            for t in names:
                assert data["tensors"][t][s] == history.tensors[t].values[s][i]
    assert data["aggregate"]["grad_norm"] > 0
    # Losses arrive as loss events (those of the last steps may follow the last step event)
    # and all are in the history.
    assert reported and all(losses[k] == v for k, v in reported.items())
    assert dict(zip(history.loss.steps, history.loss.values, strict=True)) == losses


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_alert_bar_in_the_stream(live_server: LiveServer, amsgrad: bool) -> None:
    name = unique("bar-amsgrad" if amsgrad else "bar-adam")
    grads = alert_bar.gradients()
    with Client(live_server.url) as c:
        c.create(
            name,
            {"w": torch.zeros(alert_bar.NUMEL)},
            lr=alert_bar.LR,
            betas=alert_bar.BETAS,
            amsgrad=amsgrad,
            durability="manual",
        )
        c.set_alerts(name, [alert_bar.RULE])

        def train() -> None:
            with Client(live_server.url) as trainer:
                for g in grads:
                    trainer.step(name, {"w": g})

        alerts: list[dict[str, Any]] = []
        last = 0
        stream = c.events(name, max_events=len(grads), duration=PATIENCE, tensors=["w"])
        assert next(stream)["event"] == "open"
        with in_thread(train):
            for event in stream:
                if event["event"] == "step":
                    assert event["data"]["step"] == last + 1
                    last = event["data"]["step"]
                    alerts += event["data"]["alerts"]
        assert last == len(grads)
        report = c.alerts(name)
        summary = c.get(name)
    assert summary.alerts is not None
    if amsgrad:
        assert alerts == [] and report.count == 0 and summary.alerts.count == 0
    else:
        assert [(a["step"], a["tensor"], a["rule"]) for a in alerts] == [
            (alert_bar.SPIKE_STEP, "w", "lr_eff_p99 swing > 0.5")
        ]
        assert alerts[0]["value"] < 0.5 * alerts[0]["previous"]
        assert report.count == summary.alerts.count == 1
        assert summary.alerts.latest is not None
        assert summary.alerts.latest.step == alert_bar.SPIKE_STEP


def test_resume_after_a_disconnect_sends_what_was_missed_once(live_server: LiveServer) -> None:
    name = unique("resume")
    with Client(live_server.url) as c:
        c.create(name, {"w": torch.zeros(3)}, durability="manual")
        for _ in range(3):
            c.step(name, {"w": torch.ones(3)})
        seen = [
            e
            for e in c.events(name, replay=10, max_events=3, duration=PATIENCE)
            if e["event"] == "step"
        ]
        assert [e["data"]["step"] for e in seen] == [1, 2, 3]
        for _ in range(3):  # while nobody listens
            c.step(name, {"w": torch.ones(3)})
        stream = c.events(name, last_event_id=seen[-1]["id"], max_events=4, duration=PATIENCE)
        opening = next(stream)
        assert opening["data"]["resumed"] is True and opening["data"]["backlog"] == 3
        got = []
        for event in stream:
            if event["event"] == "step":
                got.append(event["data"]["step"])
                if len(got) == 3:
                    c.step(name, {"w": torch.ones(3)})  # a live one after the backlog
        assert got == [4, 5, 6, 7]


def test_the_server_drops_a_subscriber_that_went_away(live_server: LiveServer) -> None:
    before = subscribers(live_server.url)
    with Client(live_server.url) as c:
        # No keep-alive for an hour: only the server's disconnect listener can notice.
        stream = c.events(heartbeat=3600)
        assert next(stream)["event"] == "open"
        assert subscribers(live_server.url) == before + 1
        stream.close()  # the client goes away without a word
    deadline = time.monotonic() + PATIENCE
    while subscribers(live_server.url) != before:
        assert time.monotonic() < deadline, "the subscriber was never dropped"
        time.sleep(0.05)


def test_keep_alive_comments_arrive_while_nothing_steps(live_server: LiveServer) -> None:
    with Client(live_server.url) as c:
        kinds = []
        for event in c.events(unique("quiet"), heartbeat=0.05, heartbeats=True, duration=PATIENCE):
            kinds.append(event["event"])
            if len(kinds) == 3:
                break
    assert kinds == ["open", "heartbeat", "heartbeat"]


def test_the_async_client_streams_too(live_server: LiveServer) -> None:
    name = unique("async-stream")

    async def scenario() -> list[int]:
        async with AsyncClient(live_server.url) as c:
            await c.create(name, {"w": torch.zeros(2)}, durability="manual")
            await c.step(name, {"w": torch.ones(2)})
            steps = []
            stream = c.events(name, replay=1, max_events=2, duration=PATIENCE)
            async for event in stream:
                if event["event"] == "step":
                    steps.append(event["data"]["step"])
                    if len(steps) == 1:
                        await c.step(name, {"w": torch.ones(2)})
            return steps

    assert asyncio.run(scenario()) == [1, 2]
