"""The stepper resource through the real app in process: create, list, read, delete,
change options, bias correction."""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from api_support import (
    OCTET,
    SPEC,
    V1,
    assert_problem,
    create,
    create_body,
    get_params,
    grads,
    initial_values,
    local_twin,
    registered,
    snapshot,
    step,
)
from fastapi.testclient import TestClient

from adamscope.client import codec
from adamscope.client.protocol import StepperList, StepperSummary


def test_create_from_json_gives_zeros_and_a_full_summary(app_client: TestClient) -> None:
    summary = create(app_client)
    StepperSummary.model_validate(summary)
    assert summary["name"] == "net" and summary["optimizer"] == "adam"
    assert summary["device"] == "cpu" and summary["step"] == 0
    assert summary["numel"] == 6 + 3 + 4
    assert [
        (p["name"], p["shape"], p["dtype"], p["group"], p["step"], p["state"])
        for p in summary["params"]
    ] == [
        ("w", [2, 3], "float32", 0, None, []),
        ("b", [3], "float32", 0, None, []),
        ("h", [4], "bfloat16", 1, None, []),
    ]
    g0, g1 = summary["groups"]
    assert (g0["params"], g0["lr"], g0["amsgrad"], g0["foreach"]) == (
        ["w", "b"],
        0.01,
        False,
        False,
    )
    assert (g1["params"], g1["lr"], g1["amsgrad"]) == (["h"], 0.05, True)
    assert g0["betas"] == [0.9, 0.999] and g0["eps"] == 1e-8 and g0["weight_decay"] == 0.0
    params = get_params(app_client, "net")
    assert all(torch.equal(t, torch.zeros_like(t)) for t in params.values())
    assert params["h"].dtype == torch.bfloat16


def test_create_from_json_with_data(app_client: TestClient) -> None:
    spec = {
        "name": "d",
        "optimizer": "adamw",
        "params": [
            {"name": "x", "shape": [2, 2], "data": [[1.5, -2.0], [0.25, "NaN"]]},
            {"name": "s", "shape": [], "dtype": "float64", "data": 0.1},
        ],
    }
    summary = create(app_client, spec)
    assert summary["groups"][0]["weight_decay"] == 0.01  # AdamW's default, from PyTorch
    assert summary["groups"][0]["decoupled_weight_decay"] is True
    params = get_params(app_client, "d")
    assert torch.equal(params["x"][0], torch.tensor([1.5, -2.0]))
    assert params["x"][1, 0] == 0.25 and params["x"][1, 1].isnan()
    assert params["s"].dtype == torch.float64 and params["s"].item() == 0.1


def test_create_from_safetensors_keeps_values_bit_for_bit(app_client: TestClient) -> None:
    values = initial_values()
    summary = create(app_client, SPEC, values)
    assert [p["name"] for p in summary["params"]] == ["w", "b", "h"]
    got = get_params(app_client, "net")
    for n, t in values.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t)


def test_create_from_safetensors_takes_order_from_the_spec(app_client: TestClient) -> None:
    values = initial_values()
    spec = {
        **SPEC,
        "params": [{"name": "h"}, {"name": "w", "shape": [2, 3]}, {"name": "b"}],
        "groups": None,
    }
    body = codec.encode(values, {"adamscope.spec": json.dumps(spec)})
    r = app_client.post(V1, content=body, headers=OCTET)
    assert r.status_code == 201, r.text
    assert [p["name"] for p in r.json()["params"]] == ["h", "w", "b"]


def test_create_with_complex_and_half_params(app_client: TestClient) -> None:
    values = {
        "c": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "f": torch.tensor([0.5, -1.0], dtype=torch.float16),
    }
    create(app_client, {"name": "cx", "params": []}, values)
    got = get_params(app_client, "cx")
    assert torch.equal(got["c"], values["c"]) and torch.equal(got["f"], values["f"])


def test_list_get_delete(app_client: TestClient) -> None:
    assert registered(app_client) == []
    create(app_client, {**SPEC, "name": "b-second"})
    create(app_client, {**SPEC, "name": "a-first"})
    listing = app_client.get(V1).json()
    StepperList.model_validate(listing)
    assert [s["name"] for s in listing["steppers"]] == ["a-first", "b-second"]
    got = app_client.get(f"{V1}/a-first")
    assert got.status_code == 200 and got.json()["name"] == "a-first"
    assert app_client.get("/healthz").json()["steppers"] == 2
    r = app_client.delete(f"{V1}/a-first")
    assert r.status_code == 204 and r.content == b""
    assert registered(app_client) == ["b-second"]
    assert_problem(app_client.get(f"{V1}/a-first"), "stepper_not_found", "'a-first'")
    assert_problem(app_client.delete(f"{V1}/a-first"), "stepper_not_found")


def test_name_can_be_reused_after_delete(app_client: TestClient) -> None:
    create(app_client)
    step(app_client, "net", grads(initial_values(), 0))
    assert app_client.delete(f"{V1}/net").status_code == 204
    summary = create(app_client)
    assert summary["step"] == 0 and all(p["state"] == [] for p in summary["params"])


def test_creating_an_existing_name_conflicts_and_keeps_the_original(app_client: TestClient) -> None:
    create(app_client, SPEC, initial_values())
    step(app_client, "net", grads(initial_values(), 0))
    before = snapshot(app_client, "net")
    other = {**SPEC, "optimizer": "adamw", "params": [{"name": "z", "shape": [1]}], "groups": None}
    assert_problem(app_client.post(V1, json=other), "stepper_exists", "'net' already exists")
    assert snapshot(app_client, "net") == before


# ------------------------------------------------------------------------ hyperparameters


def test_patch_lr_applies_to_the_next_step(app_client: TestClient) -> None:
    values = initial_values()
    create(app_client, SPEC, values)
    local, opt = local_twin(values)
    for k in range(4):
        if k == 2:
            r = app_client.patch(f"{V1}/net/hyperparameters", json={"lr": 0.2})
            assert r.status_code == 200, r.text
            assert [g["lr"] for g in r.json()["groups"]] == [0.2, 0.2]
            for g in opt.param_groups:
                g["lr"] = 0.2
        gs = grads(values, k)
        assert step(app_client, "net", gs).status_code == 200
        for n, p in local.items():
            p.grad = gs[n]
        opt.step()
    got = get_params(app_client, "net")
    assert all(torch.equal(got[n], p.detach()) for n, p in local.items())


def test_patch_one_group(app_client: TestClient) -> None:
    create(app_client)
    r = app_client.patch(
        f"{V1}/net/hyperparameters", json={"group": 1, "betas": [0.5, 0.75], "eps": 1e-6}
    )
    assert r.status_code == 200, r.text
    g0, g1 = r.json()["groups"]
    assert g0["betas"] == [0.9, 0.999] and g0["eps"] == 1e-8
    assert g1["betas"] == [0.5, 0.75] and g1["eps"] == 1e-6
    assert app_client.get(f"{V1}/net").json()["groups"][1]["betas"] == [0.5, 0.75]


def test_patch_foreach_null_returns_to_pytorchs_choice(app_client: TestClient) -> None:
    create(app_client)
    r = app_client.patch(f"{V1}/net/hyperparameters", json={"foreach": None})
    assert r.status_code == 200, r.text
    assert [g["foreach"] for g in r.json()["groups"]] == [None, None]


def test_patch_invalid_is_rejected_with_pytorchs_message(app_client: TestClient) -> None:
    create(app_client, SPEC, initial_values())
    step(app_client, "net", grads(initial_values(), 0))
    before = snapshot(app_client, "net")
    cases: list[tuple[Any, str, str]] = [
        ({"lr": -1.0}, "invalid_hyperparameter", "Invalid learning rate: -1.0"),
        ({"betas": [1.0, 0.9]}, "invalid_hyperparameter", "Invalid beta parameter at index 0"),
        ({"eps": -1.0}, "invalid_hyperparameter", "Invalid epsilon value: -1.0"),
        ({"weight_decay": -1.0}, "invalid_hyperparameter", "Invalid weight_decay value: -1.0"),
        ({"lr": None}, "invalid_hyperparameter", "lr may not be null"),
        (
            {"fused": True, "foreach": True},
            "invalid_hyperparameter",
            "`fused` and `foreach` cannot be `True` together.",
        ),
        ({"capturable": True}, "invalid_hyperparameter", "If capturable=True"),
        ({"differentiable": True}, "invalid_hyperparameter", "differentiable=True"),
        ({"lr": 0.1, "group": 2}, "invalid_hyperparameter", "param group 2 does not exist"),
        ({"amsgrad": True, "group": 0}, "invalid_state", "state of 'w' would lack max_exp_avg_sq"),
    ]
    for patch, code, fragment in cases:
        r = app_client.patch(f"{V1}/net/hyperparameters", json=patch)
        assert_problem(r, code, fragment)
        assert snapshot(app_client, "net") == before, patch


# ------------------------------------------------------------------------ bias correction


def _expected(lr: float, beta1: float, beta2: float, t: float) -> dict[str, Any]:
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    return {
        "step": t,
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "bias_correction1": bc1,
        "bias_correction2": bc2,
        "step_size": lr / bc1 if bc1 else None,
        "bias_correction2_sqrt": bc2**0.5,
    }


def test_bias_correction_current_given_and_per_param(app_client: TestClient) -> None:
    spec = copy.deepcopy(SPEC)
    spec["groups"][1]["betas"] = [0.8, 0.99]
    values = initial_values()
    create(app_client, spec, values)
    for k in range(3):
        gs = grads(values, k)
        if k == 0:
            del gs["b"]  # b's own step lags by one
        assert step(app_client, "net", gs).status_code == 200

    current = app_client.get(f"{V1}/net/bias-correction")
    assert current.status_code == 200, current.text
    body = current.json()
    assert body["stepper"] == "net" and body["step"] == 3
    assert body["groups"] == [_expected(0.01, 0.9, 0.999, 3.0), _expected(0.05, 0.8, 0.99, 3.0)]
    assert body["params"] == {
        "w": _expected(0.01, 0.9, 0.999, 3.0),
        "b": _expected(0.01, 0.9, 0.999, 2.0),
        "h": _expected(0.05, 0.8, 0.99, 3.0),
    }

    for t in (1, 2, 1000):
        r = app_client.get(f"{V1}/net/bias-correction", params={"step": t})
        assert r.status_code == 200, r.text
        assert r.json()["groups"] == [
            _expected(0.01, 0.9, 0.999, float(t)),
            _expected(0.05, 0.8, 0.99, float(t)),
        ]
        assert r.json()["params"] == {}


def test_bias_correction_at_zero_and_bad_steps(app_client: TestClient) -> None:
    create(app_client)
    g0 = app_client.get(f"{V1}/net/bias-correction").json()["groups"][0]
    assert g0["bias_correction1"] == 0.0 and g0["step_size"] is None
    assert_problem(
        app_client.get(f"{V1}/net/bias-correction", params={"step": -1}),
        "request_validation_error",
        "query.step",
    )
    assert_problem(
        app_client.get(f"{V1}/net/bias-correction", params={"step": "inf"}),
        "invalid_state",
        "step must be finite",
    )
    assert_problem(app_client.get(f"{V1}/nope/bias-correction"), "stepper_not_found")


def test_create_body_helper_round_trips() -> None:
    """Guards the helper the safetensors create tests rely on."""
    values = initial_values()
    tensors, meta = codec.decode(create_body(SPEC, values))
    assert json.loads(meta["adamscope.spec"])["params"] == [{"name": n} for n in values]
    assert all(torch.equal(tensors[n], values[n]) for n in values)
