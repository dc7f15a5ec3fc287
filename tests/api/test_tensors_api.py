"""Routes that move tensors, through the real app in process: step, parameters, state.

Every numeric check is against a local ``torch.optim.Adam`` built like the remote one, and
compares bit for bit (``torch.equal``), parameters and state alike.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from api_support import (
    OCTET,
    SPEC,
    V1,
    assert_problem,
    create,
    decode,
    get_params,
    get_state,
    grads,
    initial_values,
    local_twin,
    snapshot,
    step,
)
from fastapi.testclient import TestClient

from adamscope.client import codec
from adamscope.client.protocol import META_GROUPS, StepResult


class Local:
    """The local twin of the SPEC stepper: same values, same options, same grads."""

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        self.p, self.opt = local_twin(values)

    def step(self, gs: dict[str, torch.Tensor]) -> None:
        for n, p in self.p.items():
            p.grad = gs[n].clone() if n in gs else None
        self.opt.step()

    def state(self, name: str) -> dict[str, torch.Tensor]:
        return self.opt.state.get(self.p[name], {})


def assert_equal_to_local(client: TestClient, local: Local) -> None:
    params = get_params(client, "net")
    state = get_state(client, "net")
    for n, p in local.p.items():
        assert torch.equal(params[n], p.detach()), n
        expected = local.state(n)
        assert set(state.get(n, {})) == set(expected), n
        for k, v in expected.items():
            assert state[n][k].dtype == v.dtype and torch.equal(state[n][k], v), (n, k)


@pytest.fixture
def net(app_client: TestClient) -> tuple[TestClient, Local]:
    values = initial_values()
    create(app_client, SPEC, values)
    return app_client, Local(values)


# ---------------------------------------------------------------------------------- step


def test_step_json_result_and_parity(net: tuple[TestClient, Local]) -> None:
    client, local = net
    for k in range(6):
        gs = grads(local.p, k)
        if k % 2:
            del gs["b"]
        r = step(client, "net", gs)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        result = StepResult.model_validate(r.json())
        assert result.stepper == "net" and result.step == k + 1
        assert result.stepped == (["w", "h"] if k % 2 else ["w", "b", "h"])
        assert result.skipped == (["b"] if k % 2 else [])
        local.step(gs)
    assert_equal_to_local(client, local)
    steps = {p["name"]: p["step"] for p in client.get(f"{V1}/net").json()["params"]}
    assert steps == {"w": 6.0, "b": 3.0, "h": 6.0}


def test_step_return_params_answers_safetensors(net: tuple[TestClient, Local]) -> None:
    client, local = net
    gs = grads(local.p, 0)
    del gs["h"]
    r = step(client, "net", gs, return_params="true")
    tensors, meta = decode(r)
    local.step(gs)
    assert meta["adamscope.step"] == "1" and r.headers["x-adamscope-step"] == "1"
    assert json.loads(meta["adamscope.stepped"]) == ["w", "b"]
    assert list(tensors) == ["w", "b", "h"]
    assert all(torch.equal(tensors[n], p.detach()) for n, p in local.p.items())


def test_step_with_group_changes_in_metadata(net: tuple[TestClient, Local]) -> None:
    client, local = net
    gs = grads(local.p, 0)
    r = step(client, "net", gs, groups=[{"lr": 0.3}, {"maximize": True}])
    assert r.status_code == 200, r.text
    local.opt.param_groups[0]["lr"] = 0.3
    local.opt.param_groups[1]["maximize"] = True
    local.step(gs)
    assert_equal_to_local(client, local)
    groups = client.get(f"{V1}/net").json()["groups"]
    assert groups[0]["lr"] == 0.3 and groups[1]["maximize"] is True


def test_step_with_no_grads_counts_but_moves_nothing(net: tuple[TestClient, Local]) -> None:
    client, _ = net
    before = get_params(client, "net")
    r = step(client, "net", {})
    assert r.json()["step"] == 1 and r.json()["skipped"] == ["w", "b", "h"]
    after = get_params(client, "net")
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_repeated_step_bodies_stay_exact_as_the_layout_changes(
    net: tuple[TestClient, Local],
) -> None:
    """A body whose header repeats is read straight into the buffer laid out for the last
    one; a different header (fewer tensors, another order, new metadata) lays out anew."""
    client, local = net
    plans: list[tuple[list[str], list[dict[str, Any]] | None]] = [
        (["w", "b", "h"], None),
        (["w", "b", "h"], None),
        (["w", "h"], None),
        (["h", "b", "w"], None),
        (["h", "b", "w"], None),
        (["w", "b", "h"], [{"lr": 0.02}, {}]),
        (["w", "b", "h"], [{"lr": 0.02}, {}]),
        (["w", "b", "h"], None),
    ]
    for k, (names, groups) in enumerate(plans):
        full = grads(local.p, k)
        gs = {n: full[n] for n in names}
        r = step(client, "net", gs, groups=groups, return_params="true")
        tensors, _ = decode(r)
        if groups is not None:
            local.opt.param_groups[0]["lr"] = groups[0]["lr"]
        local.step(gs)
        assert all(torch.equal(tensors[n], p.detach()) for n, p in local.p.items()), k
    assert_equal_to_local(client, local)


def test_a_layout_whose_offsets_do_not_align_is_read_tensor_by_tensor(
    app_client: TestClient,
) -> None:
    """bf16 of 3 elements ends at byte 6: a float32 view there would be misaligned."""
    spec = {
        "name": "odd",
        "optimizer": "adam",
        "hyperparameters": {"lr": 0.1},
        "params": [
            {"name": "h", "shape": [3], "dtype": "bfloat16"},
            {"name": "w", "shape": [5], "dtype": "float32"},
        ],
    }
    values = {"h": torch.randn(3).to(torch.bfloat16), "w": torch.randn(5)}
    create(app_client, spec, values)
    p = {n: t.clone().requires_grad_(True) for n, t in values.items()}
    opt = torch.optim.Adam(list(p.values()), lr=0.1)
    for k in range(3):
        gs = grads(p, k)
        body = codec.encode(gs)
        assert (
            json.loads(body[8 : 8 + int.from_bytes(body[:8], "little")])["w"]["data_offsets"][0] % 4
        )
        tensors, _ = decode(step(app_client, "odd", gs, return_params="true"))
        for n, t in p.items():
            t.grad = gs[n].clone()
        opt.step()
        assert all(torch.equal(tensors[n], t.detach()) for n, t in p.items())


def test_a_repeated_header_is_still_refused_when_the_rest_is_wrong(
    net: tuple[TestClient, Local],
) -> None:
    """The header of the last accepted step again, with a body too short or too long, or a
    16-bit gradient that was accepted only with ``wire_dtype``: refused, nothing moves."""
    client, local = net
    gs = grads(local.p, 0)
    assert step(client, "net", gs).status_code == 200
    body = codec.encode(gs)
    before = snapshot(client, "net")
    for bad in (body[:-4], body + b"\0\0\0\0"):
        r = client.post(f"{V1}/net/step", content=bad, headers=OCTET)
        assert_problem(r, "malformed_body")
        assert snapshot(client, "net") == before
    half = {n: g.to(torch.bfloat16) for n, g in gs.items()}
    assert step(client, "net", half, wire_dtype="bfloat16").status_code == 200
    before = snapshot(client, "net")
    assert_problem(step(client, "net", half), "dtype_mismatch")
    assert snapshot(client, "net") == before


# ------------------------------------------------------------------------------ reading


def test_read_params_safetensors_json_and_filtered(net: tuple[TestClient, Local]) -> None:
    client, local = net
    step(client, "net", grads(local.p, 0))
    full, meta = decode(client.get(f"{V1}/net/params"))
    assert meta["adamscope.step"] == "1" and meta["adamscope.stepper"] == "net"

    by_query = client.get(f"{V1}/net/params", params={"format": "json"})
    by_accept = client.get(f"{V1}/net/params", headers={"accept": "application/json"})
    for r in (by_query, by_accept):
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        body = r.json()
        assert body["stepper"] == "net" and body["step"] == 1
        for n, t in full.items():
            doc = body["params"][n]
            assert doc["dtype"] == codec.dtype_name(t.dtype) and doc["shape"] == list(t.shape)
            back = codec.tensor_from_json(doc["data"], t.dtype, doc["shape"])
            assert torch.equal(back, t), n

    both = client.get(
        f"{V1}/net/params", headers={"accept": "application/json, application/octet-stream"}
    )
    assert both.headers["content-type"] == "application/octet-stream"
    some, _ = decode(client.get(f"{V1}/net/params", params=[("name", "h"), ("name", "w")]))
    assert list(some) == ["h", "w"]
    assert torch.equal(some["h"], full["h"])


def test_read_state_safetensors_json_and_filtered(net: tuple[TestClient, Local]) -> None:
    client, local = net
    gs = grads(local.p, 0)
    del gs["b"]
    step(client, "net", gs)
    local.step(gs)
    flat, meta = decode(client.get(f"{V1}/net/state"))
    assert meta["adamscope.step"] == "1"
    assert sorted(flat) == sorted(
        [
            "w.step",
            "w.exp_avg",
            "w.exp_avg_sq",
            "h.step",
            "h.exp_avg",
            "h.exp_avg_sq",
            "h.max_exp_avg_sq",
        ]
    )
    body = client.get(f"{V1}/net/state", params={"format": "json"}).json()
    assert body["step"] == 1 and body["state"]["b"] == {}
    for key, t in flat.items():
        pname, _, which = key.rpartition(".")
        doc = body["state"][pname][which]
        back = codec.tensor_from_json(
            doc["data"], codec.dtype_from_name(doc["dtype"]), doc["shape"]
        )
        assert torch.equal(back, t) and back.dtype == local.state(pname)[which].dtype, key

    only, _ = decode(
        client.get(f"{V1}/net/state", params=[("name", "h"), ("key", "max_exp_avg_sq")])
    )
    assert list(only) == ["h.max_exp_avg_sq"]
    assert torch.equal(only["h.max_exp_avg_sq"], local.state("h")["max_exp_avg_sq"])
    accept = client.get(
        f"{V1}/net/state", params={"key": "step"}, headers={"accept": "application/json"}
    ).json()
    assert accept["state"]["w"]["step"]["data"] == 1.0


# ------------------------------------------------------------------------------ writing


def test_put_params_safetensors_then_step(net: tuple[TestClient, Local]) -> None:
    client, local = net
    step(client, "net", grads(local.p, 0))
    local.step(grads(local.p, 0))
    new_b = torch.tensor([3.0, -1.0, 0.5])
    r = client.put(f"{V1}/net/params", content=codec.encode({"b": new_b}), headers=OCTET)
    assert r.status_code == 200, r.text
    assert r.json() == {"stepper": "net", "step": 1, "updated": ["b"]}
    with torch.no_grad():
        local.p["b"].copy_(new_b)
    assert_equal_to_local(client, local)
    step(client, "net", grads(local.p, 1))
    local.step(grads(local.p, 1))
    assert_equal_to_local(client, local)


def test_put_params_json_hand_edit(net: tuple[TestClient, Local]) -> None:
    client, local = net
    r = client.put(
        f"{V1}/net/params",
        json={
            "params": {
                "w": [[1.0, 2.0, 3.0], [4.0, 5.0, "-Infinity"]],
                "h": {"dtype": "bfloat16", "shape": [4], "data": [0.5, 0.25, -8.0, 1e-3]},
            }
        },
    )
    assert r.status_code == 200, r.text
    assert sorted(r.json()["updated"]) == ["h", "w"]
    got = get_params(client, "net")
    assert torch.equal(got["w"], torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, -float("inf")]]))
    assert torch.equal(got["h"], torch.tensor([0.5, 0.25, -8.0, 1e-3]).to(torch.bfloat16))
    assert torch.equal(got["b"], local.p["b"].detach())


def test_put_state_safetensors_round_trip_and_replace(net: tuple[TestClient, Local]) -> None:
    client, local = net
    step(client, "net", grads(local.p, 0))
    saved = client.get(f"{V1}/net/state").content
    step(client, "net", grads(local.p, 1))
    r = client.put(f"{V1}/net/state", content=saved, headers=OCTET)
    assert r.status_code == 200, r.text
    assert r.json()["updated"] == ["b", "h", "w"]
    assert (
        codec.decode(client.get(f"{V1}/net/state").content)[0].keys()
        == codec.decode(saved)[0].keys()
    )
    restored, _ = codec.decode(client.get(f"{V1}/net/state").content)
    original, _ = codec.decode(saved)
    assert all(torch.equal(restored[k], original[k]) for k in original)

    only_w = {k: v for k, v in original.items() if k.startswith("w.")}
    r = client.put(
        f"{V1}/net/state", params={"replace": "true"}, content=codec.encode(only_w), headers=OCTET
    )
    assert r.status_code == 200, r.text
    assert sorted(codec.decode(client.get(f"{V1}/net/state").content)[0]) == sorted(only_w)


def test_put_state_with_param_groups_metadata(net: tuple[TestClient, Local]) -> None:
    client, local = net
    step(client, "net", grads(local.p, 0))
    flat, _ = codec.decode(client.get(f"{V1}/net/state").content)
    groups = [{"lr": 0.125, "params": [0, 1]}, {"lr": 0.5, "params": [2]}]
    body = codec.encode(flat, {META_GROUPS: json.dumps(groups)})
    r = client.put(f"{V1}/net/state", content=body, headers=OCTET)
    assert r.status_code == 200, r.text
    assert [g["lr"] for g in client.get(f"{V1}/net").json()["groups"]] == [0.125, 0.5]


def test_put_state_json_single_tensor_edit(net: tuple[TestClient, Local]) -> None:
    client, local = net
    for k in range(2):
        step(client, "net", grads(local.p, k))
        local.step(grads(local.p, k))
    before = get_state(client, "net")
    r = client.put(f"{V1}/net/state", json={"state": {"b": {"exp_avg_sq": [0.5, 0.25, 1e-30]}}})
    assert r.status_code == 200, r.text
    assert r.json()["updated"] == ["b"]
    after = get_state(client, "net")
    assert torch.equal(after["b"]["exp_avg_sq"], torch.tensor([0.5, 0.25, 1e-30]))
    for n, entries in before.items():
        for key, v in entries.items():
            if (n, key) != ("b", "exp_avg_sq"):
                assert torch.equal(after[n][key], v), (n, key)
    local.state("b")["exp_avg_sq"].copy_(torch.tensor([0.5, 0.25, 1e-30]))
    step(client, "net", grads(local.p, 2))
    local.step(grads(local.p, 2))
    assert_equal_to_local(client, local)


def test_put_state_json_full_entry_and_groups(net: tuple[TestClient, Local]) -> None:
    client, local = net
    body: dict[str, Any] = {
        "state": {
            "b": {"step": 4, "exp_avg": [0.1, 0.2, 0.3], "exp_avg_sq": {"data": [1.0, 1.0, "NaN"]}}
        },
        "param_groups": [{"lr": 0.02}, {}],
    }
    r = client.put(f"{V1}/net/state", json=body)
    assert r.status_code == 200, r.text
    state = get_state(client, "net")
    assert state["b"]["step"].item() == 4.0 and state["b"]["step"].dtype == torch.float32
    assert torch.equal(state["b"]["exp_avg"], torch.tensor([0.1, 0.2, 0.3]))
    assert state["b"]["exp_avg_sq"][2].isnan()
    assert client.get(f"{V1}/net").json()["groups"][0]["lr"] == 0.02


def test_reset_state_some_then_all(net: tuple[TestClient, Local]) -> None:
    client, local = net
    for k in range(2):
        step(client, "net", grads(local.p, k))
        local.step(grads(local.p, k))
    r = client.delete(f"{V1}/net/state", params={"name": "w"})
    assert r.status_code == 200, r.text
    assert r.json() == {"stepper": "net", "step": 2, "reset": ["w"]}
    del local.opt.state[local.p["w"]]
    summary = client.get(f"{V1}/net").json()
    assert [(p["name"], p["step"]) for p in summary["params"]] == [
        ("w", None),
        ("b", 2.0),
        ("h", 2.0),
    ]
    step(client, "net", grads(local.p, 2))
    local.step(grads(local.p, 2))
    assert_equal_to_local(client, local)

    r = client.delete(f"{V1}/net/state")
    assert r.status_code == 200 and r.json()["reset"] == ["w", "b", "h"]
    assert codec.decode(client.get(f"{V1}/net/state").content)[0] == {}
    assert snapshot(client, "net")[2]["step"] == 3


def test_json_hand_edits_of_an_empty_parameter(app_client: TestClient) -> None:
    """[] is the only nested list an empty (0, 3) tensor has; it must still be accepted."""
    create(
        app_client,
        {"name": "e", "params": [{"name": "e", "shape": [0, 3]}, {"name": "x", "shape": [2]}]},
    )
    r = app_client.put(f"{V1}/e/params", json={"params": {"e": [], "x": [1.0, 2.0]}})
    assert r.status_code == 200, r.text
    doc = app_client.get(f"{V1}/e/params", params={"format": "json"}).json()["params"]["e"]
    assert doc == {"dtype": "float32", "shape": [0, 3], "data": []}
    assert get_params(app_client, "e")["e"].shape == (0, 3)
