"""The inspection routes over HTTP (service/api/stats.py) and their client methods:
statistics, signals, slices, dry runs and diffs.

Statistics are checked against numpy on the tensors the API itself returns (GET params and
state), the effective-LR view against PyTorch's for-loop formula bit for bit, and a dry run
against the real step that follows it (torch.equal on every tensor). Tolerances as in
tests/unit/test_stats.py: relative 1e-5 for float32-accumulated norms and moments, 1e-12
for quantiles, exact for counts, histograms and tensors.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from api_support import (
    OCTET,
    SPEC,
    V1,
    assert_problem,
    create,
    get_params,
    get_state,
    initial_values,
    snapshot,
    step,
)
from conftest import LiveServer
from fastapi.testclient import TestClient

from adamscope.client import AsyncClient, Client, codec
from adamscope.client.constants import META_DRY_RUN, META_GROUPS
from adamscope.client.errors import APIStatusError
from adamscope.service.api.routes import stats as stats_api
from adamscope.service.app import create_app
from adamscope.service.inspect.history import json_safe
from adamscope.service.inspect.signals import signals_of
from adamscope.service.settings import Settings

NET = f"{V1}/net"
QS = (0.01, 0.5, 0.99)


def f64(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.double().reshape(-1).numpy()


def num(x: Any) -> float:
    """A JSON number, or one of the strings that stand for NaN/Inf."""
    return (
        {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(x, x)
        if isinstance(x, str)
        else float(x)
    )


def grads(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return {
        "w": torch.randn(2, 3, generator=g),
        "b": torch.randn(3, generator=g),
        "h": torch.randn(4, generator=g).to(torch.bfloat16),
    }


@pytest.fixture
def net(app_client: TestClient) -> TestClient:
    """SPEC's stepper (float32 w, b in group 0; bf16 h under amsgrad in group 1), 2 steps."""
    create(app_client, SPEC, initial_values())
    for k in (1, 2):
        assert step(app_client, "net", grads(k)).status_code == 200
    return app_client


GROUPS = {"w": (0.01, False), "b": (0.01, False), "h": (0.05, True)}  # lr, amsgrad


def lr_eff(state: dict[str, torch.Tensor], lr: float, amsgrad: bool) -> torch.Tensor:
    """_single_tensor_adam's denominator (default betas and eps), widened."""
    t = state["step"].item()
    bias_correction1 = 1 - 0.9**t
    bias_correction2 = 1 - 0.999**t
    v = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
    denom = (v.sqrt() / bias_correction2**0.5).add_(1e-8)
    return torch.tensor(lr / bias_correction1, dtype=torch.float32) / denom.float()


def check_stats(got: dict[str, Any], x: np.ndarray, bins: int | None = None) -> None:
    assert got["numel"] == x.size and got["nan"] == got["inf"] == 0
    assert math.isclose(got["norm"], float(np.linalg.norm(x)), rel_tol=1e-5)
    assert math.isclose(got["mean"], float(x.mean()), rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(got["std"], float(x.std()), rel_tol=1e-5, abs_tol=1e-7)
    assert got["min"] == float(x.min()) and got["max"] == float(x.max())
    want = np.quantile(x, QS)
    for q, w in zip(QS, want, strict=True):
        assert math.isclose(got["quantiles"][repr(q)], float(w), rel_tol=1e-12)
    if bins is not None:
        counts, edges = np.histogram(x, bins=bins, range=(x.min(), x.max()))
        assert got["hist"]["counts"] == counts.tolist()
        assert got["hist"]["edges"] == edges.tolist()


# ---------------------------------------------------------------------- stats


def test_stats_match_numpy_per_tensor_and_aggregate(net: TestClient) -> None:
    r = net.get(
        f"{NET}/stats",
        params={
            "key": ["param", "exp_avg_sq", "lr_eff", "max_exp_avg_sq"],
            "bins": 5,
            "log": "true",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["step"] == 2 and body["keys"] == ["param", "exp_avg_sq", "lr_eff", "max_exp_avg_sq"]
    params, state = get_params(net, "net"), get_state(net, "net")
    views = {n: lr_eff(state[n], *GROUPS[n]) for n in GROUPS}
    for n in GROUPS:
        check_stats(body["tensors"][n]["param"], f64(params[n]), bins=5)
        check_stats(body["tensors"][n]["exp_avg_sq"], f64(state[n]["exp_avg_sq"]), bins=5)
        check_stats(body["tensors"][n]["lr_eff"], f64(views[n]), bins=5)
        log = body["tensors"][n]["param"]["log_hist"]
        logs = torch.log10(torch.from_numpy(np.abs(f64(params[n])))).numpy()
        counts, _ = np.histogram(logs, bins=5, range=(logs.min(), logs.max()))
        assert log["counts"] == counts.tolist()
        assert log["negative"] == int((f64(params[n]) < 0).sum())
    assert set(body["tensors"]["h"]) == {"param", "exp_avg_sq", "lr_eff", "max_exp_avg_sq"}
    assert body["missing"] == [
        {"name": n, "key": "max_exp_avg_sq", "reason": "amsgrad is off"} for n in ("w", "b")
    ]
    check_stats(
        body["aggregate"]["lr_eff"], np.concatenate([f64(views[n]) for n in GROUPS]), bins=5
    )


def test_stats_are_cached_until_the_stepper_changes(
    net: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, ...]] = []
    real = stats_api.describe_optimizer

    def counting(*args: Any) -> Any:
        calls.append(args[1:3])
        return real(*args)

    monkeypatch.setattr(stats_api, "describe_optimizer", counting)
    first = net.get(f"{NET}/stats", params={"key": "lr_eff"})
    again = net.get(f"{NET}/stats", params={"key": "lr_eff"})
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and len(calls) == 1
    assert net.get(f"{NET}/stats", params={"key": "lr_eff", "bins": 3}).status_code == 200
    assert len(calls) == 2
    assert step(net, "net", grads(3)).status_code == 200
    after = net.get(f"{NET}/stats", params={"key": "lr_eff"})
    assert len(calls) == 3 and after.json()["step"] == 3 and after.content != first.content


@pytest.mark.parametrize(
    "query,code,fragment",
    [
        ({"quantiles": "x"}, "request_validation_error", "comma-separated"),
        ({"quantiles": "0.5,2"}, "request_validation_error", "[0, 1]"),
        ({"bins": 100_000}, "request_validation_error", "bins"),
        ({"range": "1"}, "request_validation_error", "lo,hi"),
        ({"range": "2,1"}, "request_validation_error", "lo < hi"),
        ({"log": "true", "bins": 0}, "request_validation_error", "log histogram"),
        ({"key": "grad"}, "request_validation_error", "grad"),
        ({"name": "nope"}, "unknown_parameter", "nope"),
    ],
)
def test_bad_stats_queries_are_problems(
    net: TestClient, query: dict[str, Any], code: str, fragment: str
) -> None:
    before = snapshot(net, "net")
    assert_problem(net.get(f"{NET}/stats", params=query), code, fragment)
    assert snapshot(net, "net") == before
    assert_problem(net.get(f"{V1}/nope/stats"), "stepper_not_found")


# ---------------------------------------------------------------------- signals


def test_signals_are_the_last_steps(app_client: TestClient) -> None:
    create(app_client, SPEC, initial_values())
    empty = app_client.get(f"{NET}/signals").json()
    assert empty == {
        "stepper": "net",
        "step": None,
        "time": None,
        "tensors": {},
        "aggregate": {},
        "sample": {},
    }
    assert step(app_client, "net", grads(1)).status_code == 200
    first = app_client.get(f"{NET}/signals").json()
    assert first["step"] == 1 and first["tensors"]["w"]["shock_p99"] == "NaN"
    assert step(app_client, "net", grads(2)).status_code == 200
    body = app_client.get(f"{NET}/signals").json()
    engine = signals_of(app_client.app.state.registry.get("net"))  # type: ignore[attr-defined]
    assert body == {"stepper": "net", **json_safe(engine)}
    # The per-step p99 is the statistic's p99 (every tensor here is small: exact).
    lr = app_client.get(f"{NET}/stats", params={"key": "lr_eff"}).json()
    for n in GROUPS:
        assert body["tensors"][n]["lr_eff_p99"] == lr["tensors"][n]["lr_eff"]["quantiles"]["0.99"]
    assert body["aggregate"]["lr_eff_p50"] == lr["aggregate"]["lr_eff"]["quantiles"]["0.5"]


# ---------------------------------------------------------------------- slice


def test_slices_of_state_and_views(net: TestClient) -> None:
    state = get_state(net, "net")

    def sliced(**query: Any) -> torch.Tensor:
        r = net.get(f"{NET}/slice", params=query)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["step"] == 2 and body["name"] == query["name"]
        return codec.tensor_from_json(
            body["data"], codec.dtype_from_name(body["dtype"]), body["shape"]
        )

    v = state["w"]["exp_avg_sq"]
    assert torch.equal(sliced(name="w", key="exp_avg_sq", index="1"), v[1])
    assert torch.equal(sliced(name="w", key="exp_avg_sq", rows="0:1"), v[0:1])
    assert torch.equal(sliced(name="w", key="exp_avg_sq", index="-1,0:3:2"), v[-1, 0:3:2])
    assert torch.equal(sliced(name="w", key="exp_avg"), state["w"]["exp_avg"])
    assert torch.equal(
        sliced(name="h", key="lr_eff", index="1:3"), lr_eff(state["h"], 0.05, True)[1:3]
    )
    h = sliced(name="h", key="param", index="2")
    assert h.dtype == torch.bfloat16 and torch.equal(h, get_params(net, "net")["h"][2])


@pytest.mark.parametrize(
    "query,code,fragment",
    [
        ({"name": "w", "index": "a"}, "request_validation_error", "not an int"),
        ({"name": "w", "index": "5"}, "request_validation_error", "index"),
        ({"name": "w", "index": "0,0,0"}, "request_validation_error", "dimension"),
        ({"name": "w", "index": "0:2:0"}, "request_validation_error", "positive"),
        ({"name": "w", "rows": "1"}, "request_validation_error", "one slice"),
        ({"name": "w", "rows": "0:1", "index": "0"}, "request_validation_error", "not both"),
        ({"name": "w", "key": "grad"}, "request_validation_error", "grad"),
        ({"name": "nope"}, "unknown_parameter", "nope"),
        ({"name": "w", "key": "max_exp_avg_sq"}, "invalid_state", "amsgrad"),
    ],
)
def test_bad_slices_are_problems(
    net: TestClient, query: dict[str, Any], code: str, fragment: str
) -> None:
    assert_problem(net.get(f"{NET}/slice", params=query), code, fragment)


def test_a_slice_is_bounded_by_the_json_limit(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", device="cpu", max_json_elements=2)
    with TestClient(create_app(settings)) as c:
        create(c, SPEC, initial_values())
        assert_problem(
            c.get(f"{NET}/slice", params={"name": "w", "index": "0"}),
            "json_too_large",
            "3 elements",
        )
        assert c.get(f"{NET}/slice", params={"name": "w", "index": "0,0:2"}).status_code == 200
        assert_problem(
            c.get(f"{NET}/slice", params={"name": "w", "key": "lr_eff", "index": "0,0"}),
            "invalid_state",
            "not stepped",
        )


# ---------------------------------------------------------------------- dry run


def dry(
    client: TestClient,
    tensors: dict[str, torch.Tensor],
    groups: list[dict[str, Any]] | None = None,
    **query: Any,
) -> Any:
    meta = {META_GROUPS: json.dumps(groups)} if groups is not None else None
    return client.post(
        f"{NET}/dry-run", content=codec.encode(tensors, meta), headers=OCTET, params=query
    )


def test_a_dry_run_is_the_next_step_bit_for_bit_and_changes_nothing(net: TestClient) -> None:
    g = grads(3)
    del g["b"]
    groups = [{"lr": 0.002}, {}]
    before = snapshot(net, "net")
    params_before = get_params(net, "net")
    report = dry(net, g, groups)
    assert report.status_code == 200, report.text
    r = dry(net, g, groups, return_update="true")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert snapshot(net, "net") == before
    tensors, meta = codec.decode(r.content)
    body = json.loads(meta[META_DRY_RUN])
    assert {**body, "signals": None} == {**report.json(), "signals": None}
    assert body["step"] == 3 and body["stepped"] == ["w", "h"] and body["skipped"] == ["b"]
    assert step(net, "net", g, groups).status_code == 200
    params, state = get_params(net, "net"), get_state(net, "net")
    for n in ("w", "h"):
        assert torch.equal(tensors[f"{n}.param"], params[n])
        assert torch.equal(tensors[f"{n}.update"], params[n] - params_before[n])
        for key, value in state[n].items():
            assert torch.equal(tensors[f"{n}.{key}"], value), (n, key)
        change = f64(params[n]) - f64(params_before[n])
        check_stats(body["tensors"][n]["update"], change)
        check_stats(body["tensors"][n]["grad"], f64(g[n]))
    assert "b.param" not in tensors
    signals = net.get(f"{NET}/signals").json()
    assert {k: v for k, v in body["signals"].items() if k != "time"} == {
        k: v for k, v in signals.items() if k not in ("time", "stepper")
    }


def test_a_bad_dry_run_is_a_problem_and_changes_nothing(net: TestClient) -> None:
    before = snapshot(net, "net")
    assert_problem(dry(net, {"w": torch.zeros(3)}), "shape_mismatch", "w")
    assert_problem(dry(net, {"zz": torch.zeros(3)}), "unknown_parameter", "zz")
    assert_problem(dry(net, {"w": torch.zeros(2, 3)}, [{"lr": -1.0}, {}]), "invalid_hyperparameter")
    assert_problem(net.post(f"{NET}/dry-run", content=b"junk", headers=OCTET), "malformed_body")
    assert snapshot(net, "net") == before


# ---------------------------------------------------------------------- diff


def test_diff_of_steppers_and_snapshots(net: TestClient) -> None:
    assert net.post(f"{NET}/snapshots", json={"name": "s2"}).status_code == 201
    state2, params2 = get_state(net, "net"), get_params(net, "net")
    assert step(net, "net", {"w": grads(3)["w"]}).status_code == 200
    r = net.get("/v1/diff", params={"a": "net/s2", "b": "net"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["a"] == {"stepper": "net", "snapshot": "s2", "step": 2}
    assert body["b"] == {"stepper": "net", "snapshot": None, "step": 3}
    assert body["changed"] == ["w.param", "w.step", "w.exp_avg", "w.exp_avg_sq"]
    state3, params3 = get_state(net, "net"), get_params(net, "net")
    d = f64(params3["w"]) - f64(params2["w"])
    got = body["tensors"]["w"]["param"]
    assert got["changed_elements"] == int((d != 0).sum())
    assert math.isclose(got["diff_norm"], float(np.linalg.norm(d)), rel_tol=1e-12)
    assert got["max_abs_diff"] == float(np.abs(d).max())
    assert body["tensors"]["w"]["step"]["a"] == 2.0 and body["tensors"]["w"]["step"]["b"] == 3.0
    assert not body["tensors"]["h"]["max_exp_avg_sq"]["changed"]
    assert torch.equal(state2["h"]["exp_avg"], state3["h"]["exp_avg"])
    create(net, {**SPEC, "name": "twin"}, initial_values())  # as net was before stepping
    twin = net.get("/v1/diff", params={"a": "net", "b": "twin"}).json()
    assert twin["changed"] == ["w.param", "b.param", "h.param"]
    assert {(m["name"], m["key"], m["in"]) for m in twin["state_only_in_one"]} == {
        (n, k, "a") for n in GROUPS for k in state3[n]
    }
    assert net.get("/v1/diff", params={"a": "net", "b": "net"}).json()["changed"] == []


@pytest.mark.parametrize(
    "a,b,code",
    [
        ("net/../x", "net", "request_validation_error"),
        ("net/a/b", "net", "request_validation_error"),
        ("nope", "net", "stepper_not_found"),
        ("net/nosnap", "net", "snapshot_not_found"),
    ],
)
def test_bad_diffs_are_problems(net: TestClient, a: str, b: str, code: str) -> None:
    assert_problem(net.get("/v1/diff", params={"a": a, "b": b}), code)


def test_diffing_a_snapshot_needs_the_admin_scope(tmp_path: Path) -> None:
    tokens = [
        {"token": "read-token-0123456789abcdef", "scope": "read"},
        {"token": "admin-token-0123456789abcdef", "scope": "admin"},
    ]
    settings = Settings(data_dir=tmp_path / "data", device="cpu", tokens=tokens)
    with TestClient(create_app(settings)) as c:
        c.headers["authorization"] = "Bearer admin-token-0123456789abcdef"
        create(c, SPEC, initial_values())
        assert c.post(f"{NET}/snapshots", json={"name": "s"}).status_code == 201
        c.headers["authorization"] = "Bearer read-token-0123456789abcdef"
        assert c.get("/v1/diff", params={"a": "net", "b": "net"}).status_code == 200
        assert_problem(c.get("/v1/diff", params={"a": "net/s", "b": "net"}), "forbidden", "admin")
        c.headers["authorization"] = "Bearer admin-token-0123456789abcdef"
        assert c.get("/v1/diff", params={"a": "net/s", "b": "net"}).status_code == 200


# ---------------------------------------------------------------------- clients


@pytest.fixture
def remote(live_server: LiveServer) -> Iterator[str]:
    name = f"insp-{uuid.uuid4().hex[:12]}"
    with Client(live_server.url) as c:
        c.create(
            name,
            initial_values(),
            lr=0.01,
            groups=[{"params": ["w", "b"]}, {"params": ["h"], "lr": 0.05, "amsgrad": True}],
        )
        yield name
        c.delete(name)


def test_client_methods(live_server: LiveServer, remote: str) -> None:
    with Client(live_server.url) as c:
        c.step(remote, grads(1))
        reply = c.dry_run(remote, grads(2), return_update=True)
        assert reply.tensors is not None and reply.report["step"] == 2
        c.step(remote, grads(2))
        assert torch.equal(reply.tensors["w"]["param"], c.get_params(remote)["w"])
        assert torch.equal(reply.tensors["h"]["exp_avg_sq"], c.get_state(remote)["h"]["exp_avg_sq"])
        report = c.dry_run(remote, grads(3), quantiles=[0.5], bins=2)
        assert report.tensors is None and list(
            report.report["tensors"]["w"]["update"]["quantiles"]
        ) == ["0.5"]
        stats = c.stats(remote, ["w"], ["lr_eff", "m_hat"], quantiles=[0.25], bins=3, log=True)
        assert set(stats["tensors"]["w"]) == {"lr_eff", "m_hat"}
        assert len(stats["tensors"]["w"]["lr_eff"]["hist"]["counts"]) == 3
        signals = c.signals(remote)
        assert signals["step"] == 2 and isinstance(signals["tensors"]["w"]["shock_p99"], float)
        assert signals == c.signals(remote)
        state = c.get_state(remote)
        assert torch.equal(c.slice(remote, "w", "exp_avg", index=1), state["w"]["exp_avg"][1])
        assert torch.equal(c.slice(remote, "w", "exp_avg", rows="0:1"), state["w"]["exp_avg"][0:1])
        assert c.diff(remote, remote)["changed"] == []
        with pytest.raises(APIStatusError) as e:
            c.slice(remote, "w", "nope")
        assert e.value.code == "request_validation_error"


def test_async_client_methods(live_server: LiveServer, remote: str) -> None:
    async def main() -> None:
        async with AsyncClient(live_server.url) as c:
            await c.step(remote, grads(1))
            first = await c.signals(remote)
            assert first["step"] == 1 and math.isnan(first["tensors"]["w"]["gamma_frac"])
            reply = await c.dry_run(remote, grads(2), return_update=True)
            await c.step(remote, grads(2))
            assert reply.tensors is not None
            assert torch.equal(reply.tensors["b"]["param"], (await c.get_params(remote))["b"])
            stats = await c.stats(remote, keys=["v_hat"], aggregate=False)
            assert "aggregate" not in stats and set(stats["tensors"]) == {"w", "b", "h"}
            t = await c.slice(remote, "h", "lr_eff", index="0:2")
            assert t.shape == (2,) and t.dtype == torch.float32
            assert (await c.diff(remote, remote))["changed"] == []

    asyncio.run(main())
