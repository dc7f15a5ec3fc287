"""``GET /metrics`` read by prometheus_client's own parser: the families and their types,
step counters and latency histograms, the signal gauges (equal to the history's latest
values), request counts by route template and status, the stepper cap and token prefixes.
"""

from __future__ import annotations

import math
import types
from pathlib import Path
from typing import Any

import pytest
from api_support import SPEC, V1, create, grads, initial_values, step
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from adamscope.service.api.http import requests as request_metrics
from adamscope.service.app import create_app
from adamscope.service.inspect.history import LATENCY_BUCKETS
from adamscope.service.inspect.schedule import GROUP_FIELDS
from adamscope.service.inspect.signals import SIGNALS
from adamscope.service.settings import Settings

VALUES = initial_values()


def scrape(c: TestClient, **headers: str) -> tuple[dict[str, Any], list[Sample]]:
    r = c.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = [s for f in families.values() for s in f.samples]
    return families, samples


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, found)
    return float(found[0])


def test_metrics_parse_and_count_steps(app_client: TestClient) -> None:
    create(app_client, SPEC, VALUES)
    create(app_client, {**SPEC, "name": "other"}, VALUES)
    for k in range(3):
        assert step(app_client, "net", grads(VALUES, k)).status_code == 200
    assert step(app_client, "other", grads(VALUES, 9)).status_code == 200
    assert app_client.post(f"{V1}/net/loss", json={"loss": 0.5}).status_code == 200
    assert app_client.get(f"{V1}/nobody").status_code == 404
    assert app_client.get("/no/such/page").status_code == 404
    families, samples = scrape(app_client)
    kinds = {name: f.type for name, f in families.items()}
    assert kinds["adamscope_stepper_steps"] == "counter"
    assert kinds["adamscope_step_duration_seconds"] == "histogram"
    assert kinds["adamscope_signal"] == "gauge"
    assert kinds["adamscope_http_requests"] == "counter"
    assert kinds["adamscope_http_request_duration_seconds"] == "histogram"

    assert value(samples, "adamscope_steppers") == 2
    assert value(samples, "adamscope_stepper_steps_total", stepper="net") == 3
    assert value(samples, "adamscope_stepper_steps_total", stepper="other") == 1
    assert value(samples, "adamscope_stepper_step", stepper="net") == 3
    assert value(samples, "adamscope_stepper_parameters", stepper="net") == 13
    assert value(samples, "adamscope_loss", stepper="net") == 0.5

    buckets = [
        (s.labels["le"], s.value)
        for s in samples
        if s.name == "adamscope_step_duration_seconds_bucket" and s.labels["stepper"] == "net"
    ]
    assert [le for le, _ in buckets] == [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == 3
    assert value(samples, "adamscope_step_duration_seconds_count", stepper="net") == 3
    assert value(samples, "adamscope_step_duration_seconds_sum", stepper="net") > 0

    latest = app_client.get(f"{V1}/net/history", params={"limit": 1}).json()["aggregate"]
    for s in SIGNALS:
        got = value(samples, "adamscope_signal", stepper="net", signal=s)
        want = latest["values"][s][0]
        assert (math.isnan(got) and want == "NaN") or got == want, s
    # Each param group's schedule, labelled by group (one group here).
    for option in GROUP_FIELDS:
        got = value(samples, "adamscope_group_option", stepper="net", group="0", option=option)
        assert got == latest["values"][f"group0.{option}"][0], option
    assert value(samples, "adamscope_group_option", stepper="net", group="0", option="lr") > 0

    def requests(route: str, status: str, method: str = "GET") -> float:
        return value(
            samples, "adamscope_http_requests_total", method=method, route=route, status=status
        )

    assert requests("/v1/steppers/{name}/step", "200", "POST") == 4
    assert requests("/v1/steppers", "201", "POST") == 2
    assert requests("/v1/steppers/{name}", "404") == 1
    assert requests("<unmatched>", "404") == 1
    assert (
        value(
            samples,
            "adamscope_http_request_duration_seconds_count",
            method="POST",
            route="/v1/steppers/{name}/step",
        )
        == 4
    )
    assert value(samples, "adamscope_event_subscribers") == 0
    assert value(samples, "adamscope_events_dropped_total") == 0


def test_per_stepper_series_are_capped(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", device="cpu", metrics_max_steppers=1)
    with TestClient(create_app(settings)) as c:
        for name in ("zeta", "alpha"):
            create(c, {**SPEC, "name": name}, VALUES)
            assert step(c, name, grads(VALUES, 0)).status_code == 200
        _, samples = scrape(c)
        steppers = {s.labels["stepper"] for s in samples if "stepper" in s.labels}
        assert steppers == {"alpha"}  # the first by name
        assert value(samples, "adamscope_steppers") == 2
        assert value(samples, "adamscope_metrics_steppers_omitted") == 1


READ_A = "team-a-read-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


@pytest.fixture
def guarded(tmp_path: Path) -> Any:
    tokens = [
        {"token": READ_A, "scope": "read", "prefix": "team-a-"},
        {"token": ADMIN, "scope": "admin"},
    ]
    with TestClient(
        create_app(Settings(data_dir=tmp_path / "d", device="cpu", tokens=tokens))
    ) as c:
        yield c


def test_a_prefixed_token_sees_only_its_steppers_and_refusals_count(
    guarded: TestClient,
) -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    for name in ("team-a-x", "team-b-y"):
        r = guarded.post(V1, json={**SPEC, "name": name}, headers=admin)
        assert r.status_code == 201, r.text
    assert guarded.get("/metrics").status_code == 401
    assert (
        guarded.get(f"{V1}/team-b-y", headers={"authorization": f"Bearer {READ_A}"}).status_code
        == 403
    )
    _, samples = scrape(guarded, authorization=f"Bearer {READ_A}")
    assert {s.labels["stepper"] for s in samples if "stepper" in s.labels} == {"team-a-x"}
    assert value(samples, "adamscope_steppers") == 1
    assert (
        value(
            samples, "adamscope_http_requests_total", method="GET", route="/metrics", status="401"
        )
        == 1
    )
    assert (
        value(
            samples,
            "adamscope_http_requests_total",
            method="GET",
            route="/v1/steppers/{name}",
            status="403",
        )
        == 1
    )


def test_a_step_request_is_timed_until_its_reply_left_not_its_deferred_signals(
    app_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's signals and history run after its reply's last byte, inside the request's
    ASGI call: the request's duration stops at that byte. An after-step observer moves the
    middleware's clock by an hour; the step's recorded duration does not include it."""
    create(app_client, SPEC, VALUES)
    skipped = [0.0]
    real = request_metrics.time.perf_counter
    clock = types.SimpleNamespace(perf_counter=lambda: real() + skipped[0])
    monkeypatch.setattr(request_metrics, "time", clock)

    class SlowAfterStep:
        def before_step(self, stepper: object, grads: object) -> None:
            pass

        def after_step(self, stepper: object, grads: object) -> None:
            skipped[0] += 3600.0

    stepper = app_client.app.state.registry.get("net")  # type: ignore[attr-defined]
    stepper.observers.append(SlowAfterStep())
    assert step(app_client, "net", grads(VALUES, 0)).status_code == 200
    _, samples = scrape(app_client)
    assert skipped[0] == 3600.0  # the observer ran (deferred: after the reply)
    took = value(
        samples,
        "adamscope_http_request_duration_seconds_sum",
        method="POST",
        route="/v1/steppers/{name}/step",
    )
    assert 0 < took < 3600.0
