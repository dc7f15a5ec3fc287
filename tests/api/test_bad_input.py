"""The bad-input bar: every rejected request is a documented problem+json 4xx and leaves
every stepper byte-identical (parameters, state, summary), and a failed create registers
nothing.

Each case runs against a stepper that has already stepped (so it has moments, steps and
an amsgrad maximum to lose) and compares a snapshot taken before and after.
"""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from api_support import (
    OCTET,
    SPEC,
    V1,
    assert_problem,
    create,
    create_body,
    documented_codes,
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
from adamscope.client.protocol import META_GROUPS, META_SPEC

JSON = {"content-type": "application/json"}


@dataclass
class Bad:
    """One rejected request: what is sent, and the problem it must come back as."""

    id: str
    method: str
    route: str  # OpenAPI path template
    code: str
    fragment: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = "net"

    @property
    def url(self) -> str:
        return self.route.replace("{name}", self.name)


def good_grads(k: int = 5) -> dict[str, torch.Tensor]:
    return grads(initial_values(), k)


def st(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> dict[str, Any]:
    return {"content": codec.encode(tensors, meta), "headers": OCTET}


def raw(body: bytes, ctype: str = "application/octet-stream") -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": ctype}}


def duplicate_header_body() -> bytes:
    """A safetensors body whose header names 'w' twice (a dict cannot, so by hand)."""
    entry = '{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}'
    head = f'{{"w":{entry},"w":{entry}}}'.encode()
    return struct.pack("<Q", len(head)) + head + b"\0" * 24


def _cases() -> list[Bad]:
    w, b, h = (good_grads()[n] for n in ("w", "b", "h"))
    valid = codec.encode({"w": w, "b": b})
    step_r, params_r, state_r = (
        f"{V1}/{{name}}/step",
        f"{V1}/{{name}}/params",
        f"{V1}/{{name}}/state",
    )
    hyper_r, one_r, bias_r = (
        f"{V1}/{{name}}/hyperparameters",
        f"{V1}/{{name}}",
        f"{V1}/{{name}}/bias-correction",
    )
    cases = [
        # -- unknown stepper, on every route that names one
        *[
            Bad(
                f"no-stepper-{m}-{r.rsplit('/', 1)[-1]}",
                m,
                r,
                "stepper_not_found",
                "no stepper named 'ghost'",
                kw,
                name="ghost",
            )
            for m, r, kw in [
                ("GET", one_r, {}),
                ("DELETE", one_r, {}),
                ("PATCH", hyper_r, {"json": {"lr": 0.1}}),
                ("POST", step_r, st({"w": w})),
                ("GET", params_r, {}),
                ("PUT", params_r, st({"w": w})),
                ("GET", state_r, {}),
                ("PUT", state_r, st({"w.exp_avg": w})),
                ("DELETE", state_r, {}),
                ("GET", bias_r, {}),
            ]
        ],
        # -- unknown parameter
        Bad(
            "step-unknown-param",
            "POST",
            step_r,
            "unknown_parameter",
            "stepper 'net' has no parameter 'zz'",
            st({"w": w, "b": b, "zz": b, "h": h}),
        ),
        Bad(
            "put-params-unknown",
            "PUT",
            params_r,
            "unknown_parameter",
            "no parameter 'zz'",
            st({"w": w, "zz": b}),
        ),
        Bad(
            "put-params-json-unknown",
            "PUT",
            params_r,
            "unknown_parameter",
            "no parameter 'zz'",
            {"json": {"params": {"w": w.tolist(), "zz": [1.0]}}},
        ),
        Bad(
            "put-state-unknown",
            "PUT",
            state_r,
            "unknown_parameter",
            "no parameter 'zz'",
            st({"w.exp_avg": w, "zz.exp_avg": b}),
        ),
        Bad(
            "put-state-json-unknown",
            "PUT",
            state_r,
            "unknown_parameter",
            "no parameter 'zz'",
            {"json": {"state": {"zz": {"exp_avg": [1.0]}}}},
        ),
        Bad(
            "get-params-unknown",
            "GET",
            params_r,
            "unknown_parameter",
            "no parameter 'zz'",
            {"params": [("name", "w"), ("name", "zz")]},
        ),
        Bad(
            "get-state-unknown",
            "GET",
            state_r,
            "unknown_parameter",
            "no parameter 'zz'",
            {"params": {"name": "zz"}},
        ),
        Bad(
            "reset-state-unknown",
            "DELETE",
            state_r,
            "unknown_parameter",
            "no parameter 'zz'",
            {"params": [("name", "w"), ("name", "zz")]},
        ),
        # -- wrong shape
        Bad(
            "step-shape",
            "POST",
            step_r,
            "shape_mismatch",
            "gradient for 'b' has shape [4], parameter has [3]",
            st({"w": w, "b": torch.ones(4), "h": h}),
        ),
        Bad(
            "put-params-shape",
            "PUT",
            params_r,
            "shape_mismatch",
            "value for 'w' has shape [3, 2]",
            st({"b": b, "w": w.t()}),
        ),
        Bad(
            "put-params-json-shape",
            "PUT",
            params_r,
            "shape_mismatch",
            "value for 'b' has shape [2], parameter has [3]",
            {"json": {"params": {"w": w.tolist(), "b": [1.0, 2.0]}}},
        ),
        Bad(
            "put-state-shape",
            "PUT",
            state_r,
            "shape_mismatch",
            "exp_avg_sq for 'b' has shape [2, 3]",
            st({"w.exp_avg": w, "b.exp_avg_sq": w}),
        ),
        Bad(
            "put-state-json-shape",
            "PUT",
            state_r,
            "shape_mismatch",
            "exp_avg for 'b' has shape [4], parameter has [3]",
            {"json": {"state": {"w": {"exp_avg": w.tolist()}, "b": {"exp_avg": [1, 2, 3, 4]}}}},
        ),
        Bad(
            "put-state-step-vector",
            "PUT",
            state_r,
            "shape_mismatch",
            "step of 'w' must be a scalar",
            st({"w.step": torch.tensor([1.0, 2.0])}),
        ),
        # -- wrong dtype
        Bad(
            "step-dtype",
            "POST",
            step_r,
            "dtype_mismatch",
            "gradient for 'h' has dtype float32, parameter has bfloat16",
            st({"w": w, "b": b, "h": h.float()}),
        ),
        Bad(
            "put-params-dtype",
            "PUT",
            params_r,
            "dtype_mismatch",
            "value for 'w' has dtype float64, parameter has float32",
            st({"b": b, "w": w.double()}),
        ),
        Bad(
            "put-params-json-dtype",
            "PUT",
            params_r,
            "dtype_mismatch",
            "value for 'b' has dtype complex64",
            {"json": {"params": {"b": {"dtype": "complex64", "data": [[1, 0], [2, 0], [3, 0]]}}}},
        ),
        Bad(
            "put-state-dtype",
            "PUT",
            state_r,
            "dtype_mismatch",
            "exp_avg for 'b' has dtype complex64, parameter has float32",
            st({"w.exp_avg": w, "b.exp_avg": b.to(torch.complex64)}),
        ),
        # -- hyperparameters, NaN included (the JSON NaN token is accepted by the parser)
        Bad(
            "patch-nan-lr",
            "PATCH",
            hyper_r,
            "invalid_hyperparameter",
            "Invalid learning rate: nan",
            raw(b'{"lr": NaN}', "application/json"),
        ),
        Bad(
            "patch-nan-beta",
            "PATCH",
            hyper_r,
            "invalid_hyperparameter",
            "Invalid beta parameter at index 0: nan",
            raw(b'{"betas": [NaN, 0.9], "group": 1}', "application/json"),
        ),
        Bad(
            "patch-inf-eps",
            "PATCH",
            hyper_r,
            "invalid_hyperparameter",
            "eps must be finite, got inf",
            raw(b'{"eps": Infinity}', "application/json"),
        ),
        Bad(
            "patch-negative-lr",
            "PATCH",
            hyper_r,
            "invalid_hyperparameter",
            "Invalid learning rate: -1.0",
            {"json": {"lr": -1.0}},
        ),
        Bad(
            "step-groups-nan-lr",
            "POST",
            step_r,
            "invalid_hyperparameter",
            "Invalid learning rate: nan",
            st({"w": w}, {META_GROUPS: '[{"lr": NaN}, {}]'}),
        ),
        Bad(
            "step-groups-count",
            "POST",
            step_r,
            "invalid_hyperparameter",
            "got options for 1 param group(s); stepper has 2",
            st({"w": w}, {META_GROUPS: '[{"lr": 0.1}]'}),
        ),
        Bad(
            "step-groups-not-list",
            "POST",
            step_r,
            "invalid_hyperparameter",
            "param_groups must be a list",
            st({"w": w}, {META_GROUPS: '{"lr": 0.1}'}),
        ),
        Bad(
            "step-groups-bad-type",
            "POST",
            step_r,
            "invalid_hyperparameter",
            "param_groups[1].lr",
            st({"w": w}, {META_GROUPS: '[{}, {"lr": "fast"}]'}),
        ),
        Bad(
            "step-groups-amsgrad",
            "POST",
            step_r,
            "invalid_state",
            "state of 'w' would lack max_exp_avg_sq",
            st({"w": w}, {META_GROUPS: '[{"amsgrad": true}, {}]'}),
        ),
        Bad(
            "put-state-groups-invalid",
            "PUT",
            state_r,
            "invalid_hyperparameter",
            "Invalid beta parameter at index 1: 1.0",
            st({"w.exp_avg": w}, {META_GROUPS: '[{"betas": [0.9, 1.0]}, {}]'}),
        ),
        # -- state content
        Bad(
            "put-state-unknown-key",
            "PUT",
            state_r,
            "invalid_state",
            "unknown state key 'momentum' for 'w'",
            st({"w.exp_avg": w, "w.momentum": w}),
        ),
        Bad(
            "put-state-no-dot",
            "PUT",
            state_r,
            "invalid_state",
            "must be named '<parameter>.<key>'",
            st({"exp_avg": w}),
        ),
        Bad(
            "put-state-negative-step",
            "PUT",
            state_r,
            "invalid_state",
            "step of 'b' must be finite and >= 0, got -3.0",
            {"json": {"state": {"b": {"step": -3}}}},
        ),
        Bad(
            "put-state-incomplete-replace",
            "PUT",
            state_r,
            "invalid_state",
            "state of 'w' would lack step, exp_avg_sq",
            {**st({"w.exp_avg": w}), "params": {"replace": "true"}},
        ),
        Bad(
            "get-state-unknown-key",
            "GET",
            state_r,
            "invalid_state",
            "unknown state key 'momentum'",
            {"params": {"key": "momentum"}},
        ),
        # -- malformed bodies
        Bad("step-empty-body", "POST", step_r, "malformed_body", "empty body", raw(b"")),
        Bad("step-too-short", "POST", step_r, "malformed_body", "too short", raw(b"\x01\x02")),
        Bad("step-truncated", "POST", step_r, "malformed_body", "covers 36 bytes", raw(valid[:-4])),
        Bad(
            "step-trailing",
            "POST",
            step_r,
            "malformed_body",
            "covers 36 bytes but the body carries 37",
            raw(valid + b"\0"),
        ),
        Bad(
            "step-header-claims-too-much",
            "POST",
            step_r,
            "malformed_body",
            "claims",
            raw(struct.pack("<Q", 1 << 14) + valid[8:]),
        ),
        Bad(
            "step-bad-meta-json",
            "POST",
            step_r,
            "malformed_body",
            "metadata 'adamscope.param_groups' is not valid JSON",
            st({"w": w}, {META_GROUPS: "[{"}),
        ),
        Bad(
            "put-params-not-json-header",
            "PUT",
            params_r,
            "malformed_body",
            "not valid JSON",
            raw(struct.pack("<Q", 4) + b"{{{{"),
        ),
        Bad(
            "put-state-header-array",
            "PUT",
            state_r,
            "malformed_body",
            "must be a JSON object",
            raw(struct.pack("<Q", 2) + b"[]"),
        ),
        Bad(
            "put-params-json-invalid",
            "PUT",
            params_r,
            "malformed_body",
            "body is not valid JSON",
            raw(b'{"params": ', "application/json"),
        ),
        Bad(
            "put-params-json-array",
            "PUT",
            params_r,
            "malformed_body",
            "JSON body must be an object",
            raw(b"[1, 2]", "application/json"),
        ),
        Bad(
            "put-params-json-shape-not-list",
            "PUT",
            params_r,
            "malformed_body",
            "shape must be a list",
            {"json": {"params": {"b": {"data": [1, 2, 3], "shape": 3}}}},
        ),
        Bad(
            "put-params-json-ragged",
            "PUT",
            params_r,
            "malformed_body",
            "not a regular nested list",
            {"json": {"params": {"w": [[1, 2, 3], [4]]}}},
        ),
        Bad(
            "put-params-json-string",
            "PUT",
            params_r,
            "malformed_body",
            "unexpected string 'one'",
            {"json": {"params": {"b": ["one", 2, 3]}}},
        ),
        Bad(
            "put-params-json-no-params",
            "PUT",
            params_r,
            "malformed_body",
            'JSON body must be {"params"',
            {"json": {"w": [1, 2]}},
        ),
        Bad(
            "put-state-json-state-list",
            "PUT",
            state_r,
            "malformed_body",
            "'state' must map parameter names",
            {"json": {"state": [1]}},
        ),
        # -- duplicate names inside one safetensors header
        Bad(
            "step-duplicate-name",
            "POST",
            step_r,
            "malformed_body",
            "duplicate tensor name 'w'",
            raw(duplicate_header_body()),
        ),
        Bad(
            "put-params-duplicate-name",
            "PUT",
            params_r,
            "malformed_body",
            "duplicate tensor name 'w'",
            raw(duplicate_header_body()),
        ),
        # -- unsupported media types
        Bad(
            "step-json-media",
            "POST",
            step_r,
            "unsupported_media_type",
            "'application/json'",
            {"json": {"w": w.tolist()}},
        ),
        Bad(
            "put-params-text",
            "PUT",
            params_r,
            "unsupported_media_type",
            "'text/plain'",
            raw(valid, "text/plain"),
        ),
        Bad(
            "put-state-form",
            "PUT",
            state_r,
            "unsupported_media_type",
            "'application/x-www-form-urlencoded'",
            {"data": {"a": "1"}},
        ),
        # -- FastAPI's own request validation, rendered as problems too
        Bad(
            "step-bad-query",
            "POST",
            step_r,
            "request_validation_error",
            "query.return_params",
            {**st({"w": w}), "params": {"return_params": "maybe"}},
        ),
        Bad(
            "params-bad-format",
            "GET",
            params_r,
            "request_validation_error",
            "query.format",
            {"params": {"format": "xml"}},
        ),
        Bad(
            "state-bad-replace",
            "PUT",
            state_r,
            "request_validation_error",
            "query.replace",
            {**st({"w.exp_avg": w}), "params": {"replace": "perhaps"}},
        ),
        Bad(
            "patch-wrong-type",
            "PATCH",
            hyper_r,
            "request_validation_error",
            "body.lr",
            {"json": {"lr": "fast"}},
        ),
        Bad(
            "patch-negative-group",
            "PATCH",
            hyper_r,
            "request_validation_error",
            "body.group",
            {"json": {"lr": 0.1, "group": -1}},
        ),
        Bad(
            "patch-unknown-field",
            "PATCH",
            hyper_r,
            "request_validation_error",
            "body.learning_rate",
            {"json": {"learning_rate": 0.1}},
        ),
        Bad(
            "patch-betas-arity",
            "PATCH",
            hyper_r,
            "request_validation_error",
            "body.betas",
            {"json": {"betas": [0.9]}},
        ),
        Bad(
            "patch-invalid-json",
            "PATCH",
            hyper_r,
            "request_validation_error",
            "body",
            raw(b'{"lr": ', "application/json"),
        ),
        Bad(
            "bias-negative-step",
            "GET",
            bias_r,
            "request_validation_error",
            "query.step",
            {"params": {"step": -1}},
        ),
    ]
    return cases


CASES = _cases()


@pytest.fixture
def primed(app_client: TestClient) -> TestClient:
    """The SPEC stepper after two steps (b skipped on the first), plus a bystander."""
    values = initial_values()
    create(app_client, SPEC, values)
    create(app_client, {**SPEC, "name": "bystander"}, initial_values(seed=3))
    for k in range(2):
        gs = grads(values, k)
        if k == 0:
            del gs["b"]
        for name in ("net", "bystander"):
            assert step(app_client, name, gs).status_code == 200
    return app_client


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rejected_request_is_a_documented_problem_and_changes_nothing(
    primed: TestClient, case: Bad
) -> None:
    before = {n: snapshot(primed, n) for n in ("net", "bystander")}
    r = primed.request(case.method, case.url, **case.kwargs)
    body = assert_problem(r, case.code, case.fragment)
    assert body["instance"] == case.url
    assert case.code in documented_codes(case.method, case.route), (
        f"{case.code} is not among the problems OpenAPI lists for {case.method} {case.route}"
    )
    assert {n: snapshot(primed, n) for n in ("net", "bystander")} == before
    assert registered(primed) == ["bystander", "net"]


def test_validation_errors_list_each_error(primed: TestClient) -> None:
    r = primed.patch(f"{V1}/net/hyperparameters", json={"lr": "fast", "eps": "tiny"})
    body = assert_problem(r, "request_validation_error", "body.lr", "body.eps")
    assert [e["loc"] for e in body["errors"]] == [["body", "lr"], ["body", "eps"]]


# ---------------------------------------------------------------- steps are atomic


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        ({"b": torch.ones(2, 2)}, "shape_mismatch"),
        ({"nope": torch.ones(3)}, "unknown_parameter"),
        ({"b": torch.ones(3, dtype=torch.float64)}, "dtype_mismatch"),
        ({"h": torch.ones(4, dtype=torch.float16)}, "dtype_mismatch"),
    ],
    ids=["shape", "unknown", "dtype-f64", "dtype-f16"],
)
def test_a_step_that_fails_on_one_tensor_changes_none(
    app_client: TestClient, bad: dict[str, torch.Tensor], code: str
) -> None:
    values = initial_values()
    create(app_client, SPEC, values)
    local, opt = local_twin(values)

    def both(gs: dict[str, torch.Tensor]) -> None:
        assert step(app_client, "net", gs).status_code == 200
        for n, p in local.items():
            p.grad = gs.get(n)
        opt.step()

    both(grads(values, 0))
    before = snapshot(app_client, "net")
    # Good gradients first and last, the bad one in the middle: none may be applied.
    good = grads(values, 1)
    mixed = {"w": good["w"], **bad}
    for n in ("b", "h"):
        mixed.setdefault(n, good[n])
    assert_problem(step(app_client, "net", mixed), code)
    assert snapshot(app_client, "net") == before
    # Nothing lingers either (no stale gradient, no half-made state): a later step that
    # gives only w a gradient matches a local optimizer that never saw the failed one.
    both({"w": grads(values, 2)["w"]})
    both(grads(values, 3))
    got = get_params(app_client, "net")
    assert all(torch.equal(got[n], p.detach()) for n, p in local.items())


# ------------------------------------------------------------- creates that fail


def _spec(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec.update(changes)
    return spec


def _failed_creates() -> list[tuple[str, dict[str, Any], str, str]]:
    values = initial_values()
    p1 = [{"name": "w", "shape": [2]}]
    dup_spec = _spec(params=[{"name": "w"}, {"name": "w"}, {"name": "b"}, {"name": "h"}])
    return [
        (
            "nan-lr",
            raw(
                b'{"name": "new", "hyperparameters": {"lr": NaN}, '
                b'"params": [{"name": "w", "shape": [2]}]}',
                "application/json",
            ),
            "invalid_hyperparameter",
            "Invalid learning rate: nan",
        ),
        (
            "inf-lr",
            raw(
                b'{"name": "new", "hyperparameters": {"lr": Infinity}, '
                b'"params": [{"name": "w", "shape": [2]}]}',
                "application/json",
            ),
            "invalid_hyperparameter",
            "lr must be finite, got inf",
        ),
        (
            "nan-group-beta",
            raw(
                json.dumps(_spec(name="new"))
                .replace('"amsgrad": true', '"amsgrad": true, "betas": [0.9, NaN]')
                .encode(),
                "application/json",
            ),
            "invalid_hyperparameter",
            "Invalid beta parameter at index 1: nan",
        ),
        (
            "bad-lr",
            {"json": _spec(name="new", hyperparameters={"lr": -1.0})},
            "invalid_hyperparameter",
            "Invalid learning rate: -1.0",
        ),
        (
            "fused-complex",
            {
                "json": {
                    "name": "new",
                    "hyperparameters": {"fused": True},
                    "params": [{"name": "c", "shape": [2], "dtype": "complex64"}],
                }
            },
            "invalid_hyperparameter",
            "`fused=True` requires all the params to be floating",
        ),
        (
            "duplicate-json",
            {"json": {"name": "new", "params": p1 + p1}},
            "duplicate_name",
            "'w' appears more than once",
        ),
        (
            "duplicate-spec-safetensors",
            {
                "content": codec.encode(
                    values, {META_SPEC: json.dumps({**dup_spec, "name": "new", "groups": None})}
                ),
                "headers": OCTET,
            },
            "duplicate_name",
            "listed more than once: ['w']",
        ),
        (
            "duplicate-header-safetensors",
            raw(duplicate_header_body()),
            "malformed_body",
            "duplicate tensor name 'w'",
        ),
        (
            "malformed-safetensors",
            raw(create_body(_spec(name="new"), values)[:-2]),
            "malformed_body",
            "tensor data covers",
        ),
        (
            "no-spec",
            {"content": codec.encode(values), "headers": OCTET},
            "invalid_spec",
            "lacks __metadata__['adamscope.spec']",
        ),
        (
            "spec-not-json",
            {"content": codec.encode(values, {META_SPEC: "{"}), "headers": OCTET},
            "malformed_body",
            "is not valid JSON",
        ),
        (
            "spec-misses-tensor",
            {
                "content": create_body(_spec(name="new"), values).replace(
                    b'{\\"name\\": \\"h\\"}', b'{\\"name\\": \\"q\\"}'
                ),
                "headers": OCTET,
            },
            "invalid_spec",
            "no tensor for ['q']; not in spec: ['h']",
        ),
        (
            "spec-shape-differs",
            {
                "content": codec.encode(
                    values,
                    {
                        META_SPEC: json.dumps(
                            _spec(
                                name="new",
                                params=[
                                    {"name": "w", "shape": [3, 2]},
                                    {"name": "b"},
                                    {"name": "h"},
                                ],
                            )
                        )
                    },
                ),
                "headers": OCTET,
            },
            "shape_mismatch",
            "tensor 'w' has shape [2, 3], spec says [3, 2]",
        ),
        (
            "spec-dtype-differs",
            {
                "content": codec.encode(
                    values,
                    {
                        META_SPEC: json.dumps(
                            _spec(
                                name="new",
                                params=[
                                    {"name": "w"},
                                    {"name": "b"},
                                    {"name": "h", "dtype": "float16"},
                                ],
                            )
                        )
                    },
                ),
                "headers": OCTET,
            },
            "dtype_mismatch",
            "tensor 'h' has dtype bfloat16, spec says float16",
        ),
        (
            "group-unknown-param",
            {"json": _spec(name="new", groups=[{"params": ["w", "b"]}, {"params": ["h", "zz"]}])},
            "unknown_parameter",
            "unknown parameter 'zz'",
        ),
        (
            "group-missing-param",
            {"json": _spec(name="new", groups=[{"params": ["w", "b"]}])},
            "invalid_spec",
            "in none: ['h']",
        ),
        (
            "no-shape",
            {"json": {"name": "new", "params": [{"name": "w"}]}},
            "invalid_spec",
            "needs a shape",
        ),
        (
            "negative-dim",
            {"json": {"name": "new", "params": [{"name": "w", "shape": [-1]}]}},
            "invalid_spec",
            "negative dimension",
        ),
        (
            "data-shape",
            {
                "json": {
                    "name": "new",
                    "params": [{"name": "w", "shape": [2], "data": [1.0, 2.0, 3.0]}],
                }
            },
            "malformed_body",
            "tensor data has shape [3], expected [2]",
        ),
        (
            "device",
            {"json": {"name": "new", "device": "cuda:99", "params": p1}},
            "device_unavailable",
            "cuda:99",
        ),
        ("missing-params", {"json": {"name": "new"}}, "request_validation_error", "params"),
        (
            "empty-params",
            {"json": {"name": "new", "params": []}},
            "request_validation_error",
            "params",
        ),
        (
            "bad-name",
            {"json": {"name": "../etc", "params": p1}},
            "request_validation_error",
            "name",
        ),
        (
            "bad-dtype",
            {"json": {"name": "new", "params": [{"name": "w", "shape": [1], "dtype": "int64"}]}},
            "request_validation_error",
            "dtype",
        ),
        (
            "bad-optimizer",
            {"json": {"name": "new", "optimizer": "sgd", "params": p1}},
            "request_validation_error",
            "optimizer",
        ),
        ("invalid-json", raw(b'{"name": ', "application/json"), "malformed_body", "not valid JSON"),
        ("json-array", raw(b"[]", "application/json"), "malformed_body", "must be an object"),
        ("text-plain", raw(b"name=new", "text/plain"), "unsupported_media_type", "'text/plain'"),
        ("no-content-type", {"content": b"{}"}, "unsupported_media_type", "''"),
    ]


FAILED_CREATES = _failed_creates()


@pytest.mark.parametrize(
    ("kwargs", "code", "fragment"),
    [c[1:] for c in FAILED_CREATES],
    ids=[c[0] for c in FAILED_CREATES],
)
def test_a_failed_create_registers_nothing(
    primed: TestClient, kwargs: dict[str, Any], code: str, fragment: str
) -> None:
    before = {n: snapshot(primed, n) for n in ("net", "bystander")}
    r = primed.post(V1, **kwargs)
    assert_problem(r, code, fragment)
    assert code in documented_codes("POST", V1)
    assert registered(primed) == ["bystander", "net"]
    assert_problem(primed.get(f"{V1}/new"), "stepper_not_found")
    assert {n: snapshot(primed, n) for n in ("net", "bystander")} == before
    # The name stays free: the same name can be created right after.
    create(primed, _spec(name="new"))
