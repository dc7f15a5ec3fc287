"""adamscope.watch against the real app in process: a local optimizer reported, read and
steered (the sender talks to the app through its TestClient, an httpx client)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import adamscope
from adamscope.client import codec

W = "/v1/watch"
S = "/v1/steppers"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(5, 6)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture(params=["foreach", "fused"])
def impl(request: pytest.FixtureRequest) -> dict[str, bool]:
    return {str(request.param): True}


@pytest.fixture
def watched(
    app_client: TestClient, impl: dict[str, bool]
) -> Iterator[tuple[torch.nn.Module, torch.optim.Optimizer, adamscope.Watch]]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **impl)
    run = adamscope.watch(opt, model=model, name="w", http_client=app_client)
    yield model, opt, run
    run.close()


def _f64_norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.detach().double()))


def test_a_watched_run_is_listed_with_its_steps_and_exact_signals(
    app_client: TestClient, watched: Any
) -> None:
    model, opt, run = watched
    for _ in range(3):
        model(torch.randn(5, 6)).pow(2).sum().backward()
        grad_norm = _f64_norm(model[0].weight.grad)
        opt.step()
        opt.zero_grad()
        run.log(loss=1.5)
    assert run.flush()
    summary = app_client.get(f"{S}/w").json()
    assert summary["kind"] == "watched" and summary["step"] == 3
    assert [p["name"] for p in summary["params"]] == [n for n, _ in model.named_parameters()]
    signals = app_client.get(f"{S}/w/signals").json()
    assert signals["step"] == 3
    t = signals["tensors"]["0.weight"]
    # Exact (over every element, computed where the state lives): float64's within the
    # roundings of a float32 accumulation.
    assert t["grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
    assert t["param_norm"] == pytest.approx(_f64_norm(model[0].weight), rel=1e-6)
    exp_avg = opt.state[model[0].weight]["exp_avg"]
    assert t["exp_avg_norm"] == pytest.approx(_f64_norm(exp_avg), rel=1e-6)
    history = app_client.get(f"{S}/w/history").json()
    assert history["aggregate"]["steps"] == [1, 2, 3]
    assert history["aggregate"]["values"]["grad_norm"][-1] == signals["aggregate"]["grad_norm"]
    assert history["loss"]["values"] == [1.5, 1.5, 1.5]
    assert run.dropped == 0 and run.counters.errors == 0
    assert "w" in [s["name"] for s in app_client.get(S).json()["steppers"]]


def test_a_step_or_an_edit_of_a_watched_run_is_refused_and_changes_nothing(
    app_client: TestClient, watched: Any
) -> None:
    model, opt, run = watched
    _step(model, opt)
    assert run.flush()
    before = app_client.get(f"{S}/w").json()
    body = codec.encode({n: torch.ones_like(p) for n, p in model.named_parameters()})
    r = app_client.post(
        f"{S}/w/step", content=body, headers={"Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 409 and r.json()["code"] == "stepper_watched"
    assert r.headers["content-type"] == "application/problem+json"
    r = app_client.patch(f"{S}/w/hyperparameters", json={"lr": 0.5})
    assert r.status_code == 409 and r.json()["code"] == "stepper_watched"
    after = app_client.get(f"{S}/w").json()
    assert {**after, "updated_at": 0} == {**before, "updated_at": 0}


def test_statistics_and_slices_of_a_watched_run_say_where_its_tensors_are(
    app_client: TestClient, watched: Any
) -> None:
    """The service holds no tensor of a watched run: its statistics and slices answer 409
    naming the state read that asks the trainer, never numbers of an empty mirror."""
    model, opt, run = watched
    _step(model, opt)
    assert run.flush()
    for path, query in (("stats", {}), ("slice", {"name": "0.weight", "key": "exp_avg"})):
        r = app_client.get(f"{S}/w/{path}", params=query)
        assert r.status_code == 409, (path, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "stepper_watched" and "/v1/watch/w/state" in r.json()["detail"]
    assert app_client.get(f"{S}/w/signals").status_code == 200  # its signals are here


def _read_state(app_client: TestClient, out: dict[str, Any], **query: Any) -> None:
    r = app_client.get(f"{W}/w/state", params=query)
    out["status"] = r.status_code
    if r.status_code == 200:
        out["step"] = int(r.headers["x-adamscope-step"])
        out["tensors"] = codec.decode(r.content)[0]
    else:
        out["problem"] = r.json()


def test_state_on_demand_is_the_local_state_at_the_step_it_names(
    app_client: TestClient, watched: Any
) -> None:
    model, opt, run = watched
    seen: dict[int, dict[str, torch.Tensor]] = {}
    names = dict(model.named_parameters())
    out: dict[str, Any] = {}
    reader = threading.Thread(target=_read_state, args=(app_client, out), kwargs={"name": "2.bias"})
    for i in range(40):
        _step(model, opt)
        seen[run.step] = copy.deepcopy(opt.state[names["2.bias"]])
        if i == 2:
            reader.start()
        if i > 2 and not reader.is_alive():
            break
        run.flush()
    reader.join(30)
    assert out["status"] == 200, out
    want = seen[out["step"]]
    got = out["tensors"]
    assert set(got) == {f"2.bias/{k}" for k in want}
    for k, v in want.items():
        assert torch.equal(got[f"2.bias/{k}"], v.cpu()), k  # bit for bit


def test_a_state_read_of_a_trainer_that_does_not_step_answers_504(
    app_client: TestClient, watched: Any
) -> None:
    _, _, run = watched
    assert run.flush()  # the run appears (its first report) before it ever steps
    out: dict[str, Any] = {}
    _read_state(app_client, out, timeout=0.3)
    assert out["status"] == 504 and out["problem"]["code"] == "trainer_timeout"


def _settle(run: adamscope.Watch, app_client: TestClient, cid: str, model: Any, opt: Any) -> Any:
    for _ in range(10):
        _step(model, opt)
        run.flush()
        c = app_client.get(f"{W}/w/commands/{cid}").json()
        if c["status"] != "pending":
            return c
    raise AssertionError("the command was never applied")


def test_an_lr_change_applies_once_at_a_step_boundary(app_client: TestClient, watched: Any) -> None:
    model, opt, run = watched
    _step(model, opt)
    run.flush()
    r = app_client.post(f"{W}/w/commands", json={"op": "options", "options": {"lr": 0.5}})
    assert r.status_code == 202
    c = _settle(run, app_client, r.json()["id"], model, opt)
    assert c["status"] == "applied" and c["step"] >= 1
    assert opt.param_groups[0]["lr"] == 0.5
    opt.param_groups[0]["lr"] = 0.25  # the user's own change: never overwritten again
    for _ in range(3):
        _step(model, opt)
        run.flush()
    assert opt.param_groups[0]["lr"] == 0.25
    # Delivered again (as after a reconnect that lost the acknowledgement): not reapplied.
    run._receive([{"id": c["id"], "op": "options", "options": {"lr": 0.5}}])
    _step(model, opt)
    run.flush()
    assert opt.param_groups[0]["lr"] == 0.25
    assert run.counters.applied == 1
    assert app_client.get(f"{S}/w").json()["groups"][0]["lr"] == 0.25


def test_a_state_load_is_applied_between_two_steps(
    app_client: TestClient, watched: Any, impl: dict[str, bool]
) -> None:
    model, opt, run = watched
    _step(model, opt)
    run.flush()
    w = model[2].bias
    load = {"2.bias/exp_avg": torch.full_like(w, 0.125), "2.bias/exp_avg_sq": torch.ones_like(w)}
    r = app_client.put(
        f"{W}/w/state",
        content=codec.encode(load),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 202
    taken: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    c: dict[str, Any] = {"status": "pending"}
    for _ in range(5):
        model(torch.randn(5, 6)).pow(2).sum().backward()
        p0, g, t0 = w.detach().clone(), w.grad.clone(), opt.state[w]["step"].clone()
        opt.step()
        opt.zero_grad()
        taken[run.step] = (p0, g, t0)
        run.flush()
        c = app_client.get(f"{W}/w/commands/{r.json()['id']}").json()
        if c["status"] != "pending":
            break
    assert c["status"] == "applied"
    # The step after the acknowledged one started from the loaded moments: replay it.
    p0, g, t0 = taken[c["step"] + 1]
    ref_p = torch.nn.Parameter(p0)
    ref = torch.optim.AdamW([ref_p], lr=1e-2, weight_decay=0.1, **impl)
    ref.state[ref_p] = {"step": t0, **{k.split("/")[1]: v.clone() for k, v in load.items()}}
    ref_p.grad = g
    ref.step()
    assert c["step"] + 1 == run.step  # acknowledged with the next report
    assert torch.equal(ref_p, w)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(ref.state[ref_p][k], opt.state[w][k]), k


def test_a_snapshot_restored_brings_back_the_state_and_parameters_it_took(
    app_client: TestClient, watched: Any
) -> None:
    model, opt, run = watched
    _step(model, opt)
    run.flush()
    r = app_client.post(f"{W}/w/commands", json={"op": "snapshot", "snapshot": "s1"})
    assert r.status_code == 202
    kept: dict[int, tuple[dict[str, torch.Tensor], dict[Any, Any]]] = {}
    c = {"status": "pending"}
    while c["status"] == "pending" and run.step < 10:
        kept[run.step] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state))
        _step(model, opt)
        run.flush()
        c = app_client.get(f"{W}/w/commands/{r.json()['id']}").json()
    assert c["status"] == "applied"
    snaps = app_client.get(f"{W}/w/snapshots").json()["snapshots"]
    assert [(s["name"], s["step"]) for s in snaps] == [("s1", c["step"])]
    params_then, state_then = kept[c["step"]]
    for _ in range(3):
        _step(model, opt)
    run.flush()
    r = app_client.post(f"{W}/w/commands", json={"op": "restore", "snapshot": "s1"})
    assert r.status_code == 202
    restore = _settle(run, app_client, r.json()["id"], model, opt)
    assert restore["status"] == "applied"
    # Restored once more, and read at that boundary, before any step moves it on.
    r = app_client.post(f"{W}/w/commands", json={"op": "restore", "snapshot": "s1"})
    run.flush()
    _step_hooks_only(run, opt)
    for n, p in model.named_parameters():
        assert torch.equal(p, params_then[n]), n
        for k, v in state_then[p].items():
            assert torch.equal(opt.state[p][k], v), (n, k)
    missing = app_client.post(f"{W}/w/commands", json={"op": "restore", "snapshot": "nope"})
    assert missing.status_code == 404 and missing.json()["code"] == "snapshot_not_found"


def _step_hooks_only(run: adamscope.Watch, opt: torch.optim.Optimizer) -> None:
    """Bring the trainer to a step boundary without stepping: one report and its reply
    deliver the pending commands, the pre-step hook applies them (a step of no gradients
    changes nothing in torch.optim's Adam)."""
    run._report(None)
    run.flush()
    opt.step()  # no gradient: PyTorch skips every parameter; the pre-hook applies
