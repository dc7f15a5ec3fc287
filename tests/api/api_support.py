"""Helpers for the API tier: building bodies, checking problems, snapshotting steppers.

A snapshot is everything a client can observe about a stepper (its parameters and state
as safetensors bytes, and its summary without timestamps), so "byte-identical before and
after a rejected request" is a plain equality of two snapshots.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import torch
from fastapi.testclient import TestClient
from httpx import Response

from adamscope.client import codec
from adamscope.client.errors import CODES
from adamscope.client.protocol import META_GROUPS, META_SPEC
from adamscope.service.app import create_app
from adamscope.service.settings import Settings

V1 = "/v1/steppers"
OCTET = {"content-type": "application/octet-stream"}
PROBLEM = "application/problem+json"

#: The stepper most API tests use: three float32 parameters and one bf16, two groups.
SPEC: dict[str, Any] = {
    "name": "net",
    "optimizer": "adam",
    "hyperparameters": {"lr": 0.01, "foreach": False},
    "params": [
        {"name": "w", "shape": [2, 3], "dtype": "float32"},
        {"name": "b", "shape": [3], "dtype": "float32"},
        {"name": "h", "shape": [4], "dtype": "bfloat16"},
    ],
    "groups": [{"params": ["w", "b"]}, {"params": ["h"], "lr": 0.05, "amsgrad": True}],
}


def initial_values(spec: dict[str, Any] = SPEC, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        p["name"]: torch.randn(tuple(p["shape"]), generator=g, dtype=torch.float64).to(
            codec.dtype_from_name(p.get("dtype", "float32"))
        )
        for p in spec["params"]
    }


def local_twin(
    values: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.optim.Adam]:
    """Leaf tensors and a local ``torch.optim.Adam`` configured exactly like SPEC."""
    p = {n: t.clone().requires_grad_(True) for n, t in values.items()}
    groups: list[dict[str, Any]] = [
        {"params": [p["w"], p["b"]]},
        {"params": [p["h"]], "lr": 0.05, "amsgrad": True},
    ]
    return p, torch.optim.Adam(groups, lr=0.01, foreach=False)


def grads(shapes: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Deterministic gradients like the given tensors, different for every step ``k``."""
    out = {}
    for i, (n, t) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(100 * k + i)
        out[n] = torch.randn(tuple(t.shape), generator=g, dtype=torch.float64).to(t.dtype)
    return out


def create_body(spec: dict[str, Any], values: dict[str, torch.Tensor]) -> bytes:
    """A safetensors create body: the values, with the spec (names only) in metadata."""
    meta_spec = {**spec, "params": [{"name": n} for n in values]}
    return codec.encode(values, {META_SPEC: json.dumps(meta_spec)})


def create(
    client: TestClient, spec: dict[str, Any] = SPEC, values: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Create a stepper from safetensors values (or JSON zeros when ``values`` is None)."""
    if values is None:
        r = client.post(V1, json=spec)
    else:
        r = client.post(V1, content=create_body(spec, values), headers=OCTET)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def step(
    client: TestClient,
    name: str,
    tensors: dict[str, torch.Tensor],
    groups: list[dict[str, Any]] | None = None,
    **query: Any,
) -> Response:
    meta = {META_GROUPS: json.dumps(groups)} if groups is not None else None
    return client.post(
        f"{V1}/{name}/step", content=codec.encode(tensors, meta), headers=OCTET, params=query
    )


def decode(r: Response) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    return codec.decode(r.content)


def get_params(client: TestClient, name: str) -> dict[str, torch.Tensor]:
    return decode(client.get(f"{V1}/{name}/params"))[0]


def get_state(client: TestClient, name: str) -> dict[str, dict[str, torch.Tensor]]:
    flat, _ = decode(client.get(f"{V1}/{name}/state"))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        pname, _, which = key.rpartition(".")
        out.setdefault(pname, {})[which] = t
    return out


def snapshot(client: TestClient, name: str) -> tuple[bytes, bytes, dict[str, Any]]:
    """Parameters and state as safetensors bytes, and the summary minus timestamps."""
    params = client.get(f"{V1}/{name}/params")
    state = client.get(f"{V1}/{name}/state")
    summary = client.get(f"{V1}/{name}")
    assert params.status_code == state.status_code == summary.status_code == 200
    body = summary.json()
    del body["created_at"], body["updated_at"]
    return params.content, state.content, body


def registered(client: TestClient) -> list[str]:
    r = client.get(V1)
    assert r.status_code == 200
    return [s["name"] for s in r.json()["steppers"]]


def assert_problem(r: Response, code: str, *fragments: str) -> dict[str, Any]:
    """``r`` is the RFC 9457 problem for ``code`` and its detail says each fragment."""
    status, title = CODES[code]
    assert r.status_code == status, r.text
    assert r.headers["content-type"].split(";")[0] == PROBLEM, r.headers
    body = r.json()
    assert body["type"] == f"urn:adamscope:problem:{code}"
    assert body["title"] == title
    assert body["status"] == status
    assert body["code"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    return body  # type: ignore[no-any-return]


_DOC_CODE = re.compile(r"`([a-z_]+)`")


@functools.cache
def _openapi() -> dict[str, Any]:
    """The app's OpenAPI document, built once: routes do not depend on settings."""
    return create_app(Settings(device="cpu")).openapi()


def documented_codes(method: str, path: str) -> set[str]:
    """Problem codes the OpenAPI document lists for a route (``path`` as templated)."""
    op = _openapi()["paths"][path][method.lower()]
    codes: set[str] = set()
    for status, resp in op["responses"].items():
        if status.startswith("4") or status.startswith("5"):
            codes.update(_DOC_CODE.findall(resp.get("description", "")))
    return codes
