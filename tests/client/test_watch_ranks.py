"""A distributed watched run's ranks against the real app in process: two replicated
ranks (``rank=``/``world_size=`` given, two optimizers in one process) steered at one apply
step, or told they missed it; and the sharded run's merge and its bounded wait, from the
reports the ranks post (the real 2-rank jobs are in tests/e2e/test_watch_distributed.py)."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import torch
from fastapi.testclient import TestClient

import adamscope
from adamscope.client import codec
from adamscope.service.api.watch_ranks import MAX_PENDING, STALE, Ranks
from adamscope.service.inspect.watched_merge import merge_signals

W = "/v1/watch"
S = "/v1/steppers"


def _pair(
    app_client: TestClient, every: tuple[int, int] = (1, 1)
) -> list[tuple[torch.nn.Module, torch.optim.Optimizer, adamscope.Watch]]:
    out = []
    for rank in (0, 1):
        torch.manual_seed(0)  # replicas: the same start
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        run = adamscope.watch(
            opt,
            model=model,
            name="ddp",
            http_client=app_client,
            rank=rank,
            world_size=2,
            every=every[rank],
        )
        out.append((model, opt, run))
    return out


def _step_all(pair: list[Any], n: int = 1) -> None:
    for _ in range(n):
        for model, opt, run in pair:
            torch.manual_seed(1)  # the same gradient on every replica (DDP's all-reduce)
            model(torch.randn(2, 4)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
            run.flush()


def _settled(app_client: TestClient, pair: list[Any], cid: str) -> dict[str, Any]:
    for _ in range(200):
        c: dict[str, Any] = app_client.get(f"{W}/ddp/commands/{cid}").json()
        if c["status"] != "pending":
            return c
        _step_all(pair)
    raise AssertionError("the command never settled")


def test_replicated_ranks_are_one_run_and_apply_an_edit_at_one_step(
    app_client: TestClient,
) -> None:
    pair = _pair(app_client)
    try:
        _step_all(pair, 3)
        assert [s["name"] for s in app_client.get(S).json()["steppers"]] == ["ddp"]
        assert app_client.get(f"{S}/ddp").json()["step"] == 3
        r = app_client.post(f"{W}/ddp/commands", json={"op": "options", "options": {"lr": 0.5}})
        assert r.status_code == 202 and r.json()["args"]["at"] >= 3 + 2
        c = _settled(app_client, pair, r.json()["id"])
        assert c["status"] == "applied" and c["step"] == c["args"]["at"]
        assert [opt.param_groups[0]["lr"] for _, opt, _ in pair] == [0.5, 0.5]
        assert all(run.counters.errors == 0 for _, _, run in pair)
    finally:
        for _, _, run in pair:
            run.close()


def test_a_rank_that_gets_a_command_after_its_step_says_so_and_the_command_fails(
    app_client: TestClient,
) -> None:
    """Rank 1 reports every 5th step: a command due one step ahead reaches it late. It
    does not apply it late; the command fails naming the ranks that did apply it (the
    replicas now differ: the docs say to send it again)."""
    pair = _pair(app_client, every=(1, 5))
    try:
        _step_all(pair, 5)
        r = app_client.post(
            f"{W}/ddp/commands", json={"op": "options", "options": {"lr": 0.5}, "lead": 1}
        )
        assert r.json()["args"]["at"] == 6
        c = _settled(app_client, pair, r.json()["id"])
        assert c["status"] == "failed" and "rank 1: missed" in c["detail"]
        assert "applied on ranks [0]" in c["detail"]
        assert [opt.param_groups[0]["lr"] for _, opt, _ in pair] == [0.5, 1e-2]
        # Sent again with the lead the service picks: applied on both, at one step.
        r = app_client.post(f"{W}/ddp/commands", json={"op": "options", "options": {"lr": 0.5}})
        c = _settled(app_client, pair, r.json()["id"])
        assert c["status"] == "applied" and c["step"] == c["args"]["at"]
        assert [opt.param_groups[0]["lr"] for _, opt, _ in pair] == [0.5, 0.5]
    finally:
        for _, _, run in pair:
            run.close()


def test_a_state_read_a_rank_missed_is_asked_again_further_ahead(
    app_client: TestClient,
) -> None:
    """Rank 1 reports every 5th step, so a read due one step ahead reaches it late; the
    service asks again with a lead past its stride, and the read answers rank 0's state at
    a step every rank agreed on."""
    pair = _pair(app_client, every=(1, 5))
    stop = threading.Event()
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def train() -> None:
        while not desk.commands and not stop.is_set():  # the read is placed at step 6
            time.sleep(0.001)
        while not stop.is_set():
            _step_all(pair)
            _, opt, run = pair[0]
            seen[run.step] = {
                k: v.clone() for k, v in opt.state[opt.param_groups[0]["params"][0]].items()
            }

    try:
        _step_all(pair, 5)
        desk = app_client.app.state.watch_desks["ddp"]
        worker = threading.Thread(target=train, daemon=True)
        worker.start()
        r = app_client.get(f"{W}/ddp/state", params={"lead": 1, "name": "weight", "timeout": 60})
        stop.set()
        worker.join(30)
        assert r.status_code == 200, r.text
        step = int(r.headers["X-Adamscope-Step"])
        got = codec.decode(r.content)[0]
        assert torch.equal(got["weight/exp_avg_sq"], seen[step]["exp_avg_sq"])
        first, second = desk.commands.values()
        assert first.status == "failed" and "rank 1: missed: due at step 6" in first.detail
        assert second.status == "applied" and second.args["at"] >= 6 + 2 * 5
    finally:
        stop.set()
        for _, _, run in pair:
            run.close()


def test_a_bad_lead_is_refused(app_client: TestClient) -> None:
    pair = _pair(app_client)
    try:
        _step_all(pair)
        r = app_client.post(
            f"{W}/ddp/commands", json={"op": "options", "options": {"lr": 0.5}, "lead": 0}
        )
        assert r.status_code == 422 and r.json()["code"] == "invalid_spec"
        assert app_client.get(f"{S}/ddp").json()["groups"][0]["lr"] == 1e-2
    finally:
        for _, _, run in pair:
            run.close()


def test_a_report_from_a_rank_outside_its_world_is_refused_and_creates_nothing(
    app_client: TestClient,
) -> None:
    report = {
        "optimizer": "adam",
        "step": 0,
        "params": [{"name": "w", "shape": [2], "dtype": "float32"}],
        "groups": [{"params": ["w"], "lr": 0.1, "betas": [0.9, 0.999]}],
        "rank": 2,
        "world_size": 2,
        "layout": "sharded",
    }
    r = app_client.post(f"{W}/bad/report", json=report)
    assert r.status_code == 422 and r.json()["code"] == "invalid_spec"
    r = app_client.post(f"{W}/bad/report", json={**report, "rank": 0, "layout": "striped"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_spec"
    shard = {"offset": [0, 1], "shape": [1]}  # a place whose offset and shape differ
    params = [{**report["params"][0], "shard": shard}]  # type: ignore[index]
    r = app_client.post(f"{W}/bad/report", json={**report, "rank": 0, "params": params})
    assert r.status_code == 422 and "offset" in r.json()["detail"]
    assert app_client.get(f"{S}/bad").status_code == 404


# ---------------------------------------------------------------------- sharded merge


def _signals(step: int, tensors: dict[str, dict[str, float]]) -> dict[str, Any]:
    return {"step": step, "time": 1.0, "tensors": tensors, "aggregate": {"grad_norm": 0.0}}


def _shard(offset: int, rows: int) -> dict[str, list[int]]:
    return {"offset": [offset, 0], "shape": [rows, 2]}


def test_shards_merge_exactly_and_a_nan_shard_makes_the_whole_nan() -> None:
    a = {"grad_norm": 3.0, "grad_sum": 1.0, "grad_min": -2.0, "nan_count": 0.0}
    b = {"grad_norm": 4.0, "grad_sum": 2.5, "grad_min": -1.0, "nan_count": 1.0}
    parts = [
        (0, _signals(1, {"w": a}), {"w": _shard(0, 2)}),
        (1, _signals(1, {"w": b}), {"w": _shard(2, 2)}),
    ]
    merged = merge_signals(parts, {"w": [4, 2]}, 2)
    assert merged is not None
    w = merged["tensors"]["w"]
    assert w["grad_norm"] == 5.0 and w["grad_sum"] == 3.5 and w["grad_min"] == -2.0
    assert w["nan_count"] == 1.0
    assert merged["aggregate"]["grad_norm"] == 5.0
    assert merged["merge"]["ranks"] == [0, 1] and not merged["merge"]["partial"]
    # A replica of a block (HSDP's replicated dimension) counts once.
    replica = (1, _signals(1, {"w": a}), {"w": _shard(0, 2)})
    once = merge_signals([parts[0], replica], {"w": [4, 2]}, 2)
    assert once is not None and once["tensors"]["w"]["grad_norm"] == 3.0
    nan = (1, _signals(1, {"w": {**b, "grad_norm": math.nan}}), {"w": _shard(2, 2)})
    merged = merge_signals([parts[0], nan], {"w": [4, 2]}, 2)
    assert merged is not None and math.isnan(merged["tensors"]["w"]["grad_norm"])


def _report(rank: int, step: int) -> dict[str, Any]:
    return {
        "rank": rank,
        "step": step,
        "params": [{"name": "w", "shape": [4, 2], "shard": _shard(2 * rank, 2)}],
        "signals": _signals(step, {"w": {"grad_norm": 1.0}}),
    }


def _merged(ranks: Ranks, steps: list[Any]) -> list[dict[str, Any]]:
    return [ranks.merge(step, found) for step, found in steps]


def test_a_step_waits_for_every_rank_and_a_silent_rank_does_not_freeze_the_run() -> None:
    ranks = Ranks(2, "sharded")
    assert ranks.collect(_report(0, 1), now=0.0) == []  # rank 1's is not in yet
    (done,) = _merged(ranks, ranks.collect(_report(1, 1), now=0.0))
    assert done["step"] == 1 and done["signals"]["tensors"]["w"]["grad_norm"] == math.sqrt(2)
    # Rank 1's step 2 was lost: once both ranks reported step 3, step 2 is recorded partial.
    assert ranks.collect(_report(0, 2), now=0.0) == []
    assert ranks.collect(_report(0, 3), now=0.0) == []
    two, three = _merged(ranks, ranks.collect(_report(1, 3), now=0.0))
    assert two["signals"]["merge"]["partial"] and two["signals"]["merge"]["ranks"] == [0]
    assert not three["signals"]["merge"]["partial"]
    # Rank 1 stops: rank 0's steps wait at most STALE seconds, or MAX_PENDING steps.
    assert ranks.collect(_report(0, 4), now=1.0) == []
    (four,) = _merged(ranks, ranks.collect(_report(0, 5), now=1.0 + STALE + 1))
    assert four["step"] == 4 and four["signals"]["merge"]["partial"]
    out = []
    for step in range(6, 6 + MAX_PENDING):
        out += ranks.collect(_report(0, step), now=2.0 + STALE)
    assert [step for step, _ in out] == [5]
