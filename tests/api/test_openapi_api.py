"""The OpenAPI document and the interactive docs the app serves.

Clients are generated from /openapi.json, so each route must be there with the problems it
can return (as problem+json bodies of the Problem schema) and, for tensor uploads, its
safetensors request body.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adamscope.client.errors import CODES

V1 = "/v1/steppers"
NAMED = f"{V1}/{{name}}"

#: Problems each route must document (at least); every route naming a stepper adds
#: stepper_not_found, every route taking a body adds the three body problems.
BODY = {"malformed_body", "payload_too_large", "unsupported_media_type"}
TENSORS = {"unknown_parameter", "shape_mismatch", "dtype_mismatch"}
EXPECTED: dict[tuple[str, str], set[str]] = {
    ("get", V1): set(),
    ("post", V1): BODY
    | TENSORS
    | {
        "stepper_exists",
        "request_validation_error",
        "invalid_hyperparameter",
        "invalid_spec",
        "duplicate_name",
        "device_unavailable",
    },
    ("get", NAMED): {"stepper_not_found"},
    ("delete", NAMED): {"stepper_not_found"},
    ("patch", NAMED): {"stepper_not_found", "request_validation_error"},
    ("patch", f"{NAMED}/hyperparameters"): {
        "stepper_not_found",
        "request_validation_error",
        "invalid_hyperparameter",
        "invalid_state",
    },
    ("get", f"{NAMED}/bias-correction"): {
        "stepper_not_found",
        "request_validation_error",
        "invalid_state",
    },
    ("post", f"{NAMED}/step"): BODY
    | TENSORS
    | {
        "stepper_not_found",
        "invalid_hyperparameter",
        "invalid_state",
        "request_validation_error",
        "step_conflict",
        "stepper_frozen",
        "invalid_spec",
    },
    ("post", f"{NAMED}/commit"): {"stepper_not_found", "step_conflict", "stepper_frozen"},
    ("get", f"{NAMED}/params"): {
        "stepper_not_found",
        "unknown_parameter",
        "json_too_large",
        "request_validation_error",
    },
    ("put", f"{NAMED}/params"): BODY | TENSORS | {"stepper_not_found"},
    ("get", f"{NAMED}/state"): {
        "stepper_not_found",
        "unknown_parameter",
        "invalid_state",
        "json_too_large",
    },
    ("put", f"{NAMED}/state"): BODY
    | TENSORS
    | {"stepper_not_found", "invalid_state", "invalid_hyperparameter"},
    ("delete", f"{NAMED}/state"): {"stepper_not_found", "unknown_parameter"},
    ("get", "/healthz"): set(),
    ("get", "/v1/whoami"): set(),
    # durability (service/api/snapshots.py)
    ("post", f"{NAMED}/checkpoint"): {"stepper_not_found", "persistence_failed"},
    ("put", f"{NAMED}/durability"): {
        "stepper_not_found",
        "request_validation_error",
        "persistence_failed",
    },
    ("post", f"{NAMED}/snapshots"): {
        "stepper_not_found",
        "snapshot_exists",
        "request_validation_error",
        "persistence_failed",
    },
    ("get", f"{NAMED}/snapshots"): {"stepper_not_found"},
    ("get", f"{NAMED}/snapshots/{{snap}}"): {
        "stepper_not_found",
        "snapshot_not_found",
        "request_validation_error",
    },
    ("delete", f"{NAMED}/snapshots/{{snap}}"): {
        "stepper_not_found",
        "snapshot_not_found",
        "request_validation_error",
    },
    ("post", f"{NAMED}/snapshots/{{snap}}/restore"): {
        "stepper_not_found",
        "snapshot_not_found",
        "invalid_checkpoint",
    },
    ("post", f"{V1}/import"): BODY
    | {"invalid_checkpoint", "stepper_exists", "request_validation_error", "device_unavailable"},
    # history, alerts, live events and metrics (service/api/history.py, events.py, metrics.py)
    ("get", f"{NAMED}/history"): {
        "stepper_not_found",
        "request_validation_error",
        "unknown_parameter",
    },
    ("get", f"{NAMED}/histograms"): {
        "stepper_not_found",
        "request_validation_error",
        "unknown_parameter",
    },
    ("get", f"{NAMED}/alerts"): {"stepper_not_found", "request_validation_error"},
    ("put", f"{NAMED}/alerts"): {
        "stepper_not_found",
        "request_validation_error",
        "unknown_parameter",
        "malformed_body",
        "persistence_failed",
    },
    ("post", f"{NAMED}/loss"): {"stepper_not_found", "request_validation_error", "malformed_body"},
    ("get", "/v1/events"): {"request_validation_error"},
    ("get", "/metrics"): set(),
    # statistics, signals, slices, dry runs and diffs (service/api/stats.py)
    ("get", f"{NAMED}/stats"): {
        "stepper_not_found",
        "request_validation_error",
        "unknown_parameter",
    },
    ("get", f"{NAMED}/signals"): {"stepper_not_found"},
    ("get", f"{NAMED}/slice"): {
        "stepper_not_found",
        "request_validation_error",
        "unknown_parameter",
        "invalid_state",
        "json_too_large",
    },
    ("post", f"{NAMED}/dry-run"): BODY
    | TENSORS
    | {"stepper_not_found", "invalid_hyperparameter", "invalid_state"},
    ("get", "/v1/diff"): {
        "stepper_not_found",
        "snapshot_not_found",
        "request_validation_error",
        "invalid_checkpoint",
    },
}
# watched runs (service/api/routes/watch.py)
WATCH = "/v1/watch/{name}"
EXPECTED.update(
    {
        ("post", f"{WATCH}/report"): {"malformed_body", "invalid_spec", "stepper_exists"},
        ("post", f"{WATCH}/commands"): {
            "malformed_body",
            "invalid_spec",
            "stepper_not_found",
            "snapshot_not_found",
        },
        ("put", f"{WATCH}/state"): {"malformed_body", "stepper_not_found"},
        ("get", f"{WATCH}/commands/{{cid}}"): {"stepper_not_found", "command_not_found"},
        ("get", f"{WATCH}/commands/{{cid}}/body"): {"command_not_found"},
        ("post", f"{WATCH}/commands/{{cid}}/upload"): {"command_not_found", "malformed_body"},
        ("get", f"{WATCH}/state"): {"stepper_not_found", "trainer_timeout"},
        ("get", f"{WATCH}/snapshots"): {"stepper_not_found"},
    }
)
UPLOADS = {
    ("post", V1),
    ("post", f"{NAMED}/step"),
    ("put", f"{NAMED}/params"),
    ("put", f"{NAMED}/state"),
    ("post", f"{V1}/import"),
    ("post", f"{NAMED}/dry-run"),
}


@pytest.fixture
def openapi(app_client: TestClient) -> dict[str, Any]:
    r = app_client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    return r.json()  # type: ignore[no-any-return]


def documented(op: dict[str, Any]) -> dict[str, set[str]]:
    """status -> problem codes named in that response's description."""
    return {
        status: set(re.findall(r"`([a-z_]+)`", resp.get("description", "")))
        for status, resp in op["responses"].items()
        if status[0] in "45"
    }


def test_every_route_is_in_the_document(openapi: dict[str, Any]) -> None:
    listed = {(m, p) for p, ops in openapi["paths"].items() for m in ops}
    assert listed == set(EXPECTED)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_every_schema_reference_resolves(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    refs = set(_refs(openapi))
    assert "#/components/schemas/CreateStepper" in refs  # the create body's JSON form
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in schemas, f"dangling {ref}"


@pytest.mark.parametrize(("method", "path"), sorted(EXPECTED), ids=lambda x: str(x))
def test_route_documents_its_problems(openapi: dict[str, Any], method: str, path: str) -> None:
    op = openapi["paths"][path][method]
    by_status = documented(op)
    codes = set().union(*by_status.values()) if by_status else set()
    assert EXPECTED[(method, path)] <= codes, EXPECTED[(method, path)] - codes
    for status, cs in by_status.items():
        assert cs, f"{method} {path} {status} names no problem code"
        for code in cs:
            assert str(CODES[code][0]) == status, (code, status)
        content = op["responses"][status]["content"]
        assert content["application/problem+json"]["schema"] == {
            "$ref": "#/components/schemas/Problem"
        }
    assert op.get("summary"), f"{method} {path} has no summary"


@pytest.mark.parametrize(("method", "path"), sorted(UPLOADS), ids=lambda x: str(x))
def test_uploads_document_a_safetensors_body(
    openapi: dict[str, Any], method: str, path: str
) -> None:
    body = openapi["paths"][path][method]["requestBody"]
    assert body["required"] is True and "safetensors" in body["description"]
    assert body["content"]["application/octet-stream"]["schema"] == {
        "type": "string",
        "format": "binary",
    }


def test_problem_schema(openapi: dict[str, Any]) -> None:
    schema = openapi["components"]["schemas"]["Problem"]
    assert set(schema["required"]) == {"type", "title", "status", "detail", "code"}
    create = openapi["components"]["schemas"]["CreateStepper"]
    assert {"name", "params"} <= set(create["required"])


def test_docs_serve_html(app_client: TestClient) -> None:
    r = app_client.get("/docs")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in r.text and "/openapi.json" in r.text


def test_the_step_documents_its_query_parameters(openapi: dict[str, Any]) -> None:
    """The step validates its query in one pass (not as FastAPI parameters): the document
    still lists every one of them, with its type and bounds."""
    params = {
        p["name"]: p
        for p in openapi["paths"]["/v1/steppers/{name}/step"]["post"]["parameters"]
        if p["in"] == "query"
    }
    assert set(params) == {
        "return_params",
        "only_stepped",
        "wire_dtype",
        "expected_step",
        "contributors",
        "worker",
        "wait",
    }
    assert params["return_params"]["schema"] == {"default": False, "type": "boolean"}
    assert {"minimum": 1, "maximum": 1024, "type": "integer"} in (
        params["contributors"]["schema"]["anyOf"]
    )
    assert {"enum": ["bfloat16", "float16"], "type": "string"} in (
        params["wire_dtype"]["schema"]["anyOf"]
    )
    assert all(p["description"] and p["required"] is False for p in params.values())


def test_the_statistics_document_their_query_parameters(openapi: dict[str, Any]) -> None:
    params = {
        p["name"]: p
        for p in openapi["paths"]["/v1/steppers/{name}/stats"]["get"]["parameters"]
        if p["in"] == "query"
    }
    assert set(params) == {
        "quantiles",
        "bins",
        "range",
        "log",
        "log_range",
        "name",
        "key",
        "aggregate",
    }
    assert {"type": "array", "items": {"type": "string"}} in params["key"]["schema"]["anyOf"]
    assert params["bins"]["schema"]["maximum"] > 0 and params["aggregate"]["schema"] == {
        "default": True,
        "type": "boolean",
    }


def test_repeated_query_names_are_lists_and_a_single_value_is_the_last(
    app_client: TestClient,
) -> None:
    """?key=a&key=b is a list; a scalar given twice is its last value, as FastAPI takes it."""
    from api_support import SPEC, create, initial_values

    create(app_client, SPEC, initial_values())
    r = app_client.get(
        "/v1/steppers/net/stats",
        params=[
            ("key", "param"),
            ("key", "exp_avg"),
            ("name", "w"),
            ("bins", "100000"),
            ("bins", "3"),
        ],
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["tensors"]) == {"w"} and body["keys"] == ["param", "exp_avg"]
    assert len(body["tensors"]["w"]["param"]["hist"]["counts"]) == 3


def test_the_dry_run_documents_its_query_parameters(openapi: dict[str, Any]) -> None:
    params = {
        p["name"]
        for p in openapi["paths"]["/v1/steppers/{name}/dry-run"]["post"]["parameters"]
        if p["in"] == "query"
    }
    assert params == {"quantiles", "bins", "range", "log", "log_range", "return_update"}
