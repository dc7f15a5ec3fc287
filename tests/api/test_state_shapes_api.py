"""Over HTTP, a tensor with the right element count in the wrong shape is refused on
every path that loads one, with a problem naming both shapes, and nothing changes.

The shape-mismatch cases elsewhere use different element counts, so a service that
reshaped whatever fits (an ``exp_avg`` of ``[6]`` into a ``[2, 3]`` parameter) would
pass them. Here: PUT /state (safetensors, JSON, full load, RemoteAdam.load_state_dict),
PUT /params (safetensors, JSON), create (values, JSON data), import, snapshot restore,
step, accumulate-mode contributions and dry run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from api_support import (
    OCTET,
    SPEC,
    V1,
    assert_problem,
    create,
    initial_values,
    registered,
    snapshot,
    step,
)
from fastapi.testclient import TestClient
from httpx import Response

from adamscope.client import Client, RemoteAdam, codec
from adamscope.client.errors import ShapeMismatchError
from adamscope.client.protocol import META_GROUPS, META_SPEC
from adamscope.service.settings import Settings

NAME = SPEC["name"]  # w: [2, 3] float32, b: [3] float32, h: [4] bfloat16 (amsgrad)
#: (parameter, wrong shape with the same element count)
WRONG = [("w", [6]), ("w", [3, 2]), ("w", [1, 2, 3]), ("b", [3, 1]), ("h", [2, 2])]
IDS = [f"{n}-{s}" for n, s in WRONG]


@pytest.fixture
def served(app_client: TestClient) -> TestClient:
    """NAME, stepped twice (every state tensor exists), with a snapshot 'base'."""
    values = initial_values()
    create(app_client, SPEC, values)
    for k in range(2):
        r = step(
            app_client, NAME, {n: torch.full_like(v, 0.1 * (k + 1)) for n, v in values.items()}
        )
        assert r.status_code == 200, r.text
    assert app_client.post(f"{V1}/{NAME}/snapshots", json={"name": "base"}).status_code == 201
    return app_client


def state_tensors(client: TestClient) -> dict[str, torch.Tensor]:
    r = client.get(f"{V1}/{NAME}/state")
    assert r.status_code == 200
    return codec.decode(r.content)[0]


def refused(
    client: TestClient, send: Any, *fragments: str, code: str = "shape_mismatch"
) -> dict[str, Any]:
    """``send()`` answers the problem ``code`` and changes nothing observable."""
    before = snapshot(client, NAME), registered(client)
    r: Response = send()
    body = assert_problem(r, code, *fragments)
    assert (snapshot(client, NAME), registered(client)) == before
    return body


def as_shape(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return t.detach().clone().reshape(shape)


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize(("name", "shape"), WRONG, ids=IDS)
def test_put_state_safetensors(served: TestClient, name: str, shape: list[int], key: str) -> None:
    bad = as_shape(state_tensors(served)[f"{name}.{key}"], shape)
    refused(
        served,
        lambda: served.put(
            f"{V1}/{NAME}/state", content=codec.encode({f"{name}.{key}": bad}), headers=OCTET
        ),
        f"{key} for '{name}' has shape {shape}",
    )


def test_put_state_max_exp_avg_sq(served: TestClient) -> None:
    bad = as_shape(state_tensors(served)["h.max_exp_avg_sq"], [2, 2])
    refused(
        served,
        lambda: served.put(
            f"{V1}/{NAME}/state", content=codec.encode({"h.max_exp_avg_sq": bad}), headers=OCTET
        ),
        "max_exp_avg_sq for 'h' has shape [2, 2]",
    )


@pytest.mark.parametrize(("name", "shape"), WRONG, ids=IDS)
def test_put_state_json(served: TestClient, name: str, shape: list[int]) -> None:
    """Nested lists of another shape, bare or declaring that shape."""
    data = as_shape(state_tensors(served)[f"{name}.exp_avg"], shape).double().tolist()
    for value in (data, {"data": data, "shape": shape}):
        refused(
            served,
            lambda v=value: served.put(
                f"{V1}/{NAME}/state", json={"state": {name: {"exp_avg": v}}}
            ),
            f"exp_avg for '{name}' has shape {shape}",
        )


@pytest.mark.parametrize(("name", "shape"), WRONG, ids=IDS)
def test_put_state_full_load(served: TestClient, name: str, shape: list[int]) -> None:
    state = state_tensors(served)
    state[f"{name}.exp_avg_sq"] = as_shape(state[f"{name}.exp_avg_sq"], shape)
    groups = json.dumps([{"lr": 0.5}, {"lr": 0.5}])
    refused(
        served,
        lambda: served.put(
            f"{V1}/{NAME}/state",
            params={"replace": "true"},
            content=codec.encode(state, {META_GROUPS: groups}),
            headers=OCTET,
        ),
        f"exp_avg_sq for '{name}' has shape {shape}",
    )


def test_remote_adam_load_state_dict(served: TestClient) -> None:
    """torch's own load_state_dict accepts a reshaped moment; the service does not, and the
    optimizer keeps its options."""
    values = initial_values()
    params = [torch.nn.Parameter(values[n].clone()) for n in ("w", "b", "h")]
    groups = [
        {"params": [("w", params[0]), ("b", params[1])]},
        {"params": [("h", params[2])], "lr": 0.05, "amsgrad": True},
    ]
    opt = RemoteAdam(groups, lr=0.01, foreach=False, name=NAME, client=Client(http_client=served))
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].reshape(3, 2)
    sd["param_groups"][0]["lr"] = 0.5
    before = snapshot(served, NAME)
    with pytest.raises(ShapeMismatchError, match=r"exp_avg for 'w' has shape \[3, 2\]"):
        opt.load_state_dict(sd)
    assert snapshot(served, NAME) == before
    assert opt.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize(("name", "shape"), WRONG, ids=IDS)
def test_put_params(served: TestClient, name: str, shape: list[int]) -> None:
    values = initial_values()
    bad = as_shape(values[name] + 1, shape)
    refused(
        served,
        lambda: served.put(f"{V1}/{NAME}/params", content=codec.encode({name: bad}), headers=OCTET),
        f"value for '{name}' has shape {shape}",
    )
    refused(
        served,
        lambda: served.put(f"{V1}/{NAME}/params", json={"params": {name: bad.double().tolist()}}),
        f"value for '{name}' has shape {shape}",
    )


@pytest.mark.parametrize(("name", "shape"), WRONG, ids=IDS)
def test_create_with_values(served: TestClient, name: str, shape: list[int]) -> None:
    """The body's tensor against the spec's shape; and JSON data against its shape."""
    values = initial_values()
    values[name] = as_shape(values[name], shape)
    spec = {**SPEC, "name": "other"}  # its params declare shapes and dtypes
    refused(
        served,
        lambda: served.post(
            V1, content=codec.encode(values, {META_SPEC: json.dumps(spec)}), headers=OCTET
        ),
        f"tensor '{name}' has shape {shape}, spec says",
    )
    data_spec = {
        **spec,
        "params": [{**p, "data": (values[p["name"]].double().tolist())} for p in SPEC["params"]],
    }
    refused(
        served,
        lambda: served.post(V1, json=data_spec),
        f"has shape {shape}, expected",
        code="malformed_body",
    )


def reexported(client: TestClient, tensor: str, shape: list[int]) -> bytes:
    r = client.get(f"{V1}/{NAME}/snapshots/base")
    assert r.status_code == 200
    tensors, metadata = codec.decode(r.content)
    tensors[tensor] = tensors[tensor].reshape(shape)
    return codec.encode(tensors, metadata)


@pytest.mark.parametrize(("name", "shape"), WRONG, ids=IDS)
def test_import_a_checkpoint(served: TestClient, name: str, shape: list[int]) -> None:
    data = reexported(served, f"state/{name}/exp_avg", shape)
    refused(
        served,
        lambda: served.post(
            f"{V1}/import", params={"name": "imported"}, content=data, headers=OCTET
        ),
        f"exp_avg for '{name}' has shape {shape}",
        code="invalid_checkpoint",
    )


@pytest.mark.parametrize("tensor", ["state/{}/exp_avg", "param/{}"])
@pytest.mark.parametrize(("name", "shape"), WRONG, ids=IDS)
def test_restore_a_snapshot(
    served: TestClient, settings: Settings, name: str, shape: list[int], tensor: str
) -> None:
    """A snapshot file changed on disk (the service wrote it, someone reshaped a tensor)."""
    data = reexported(served, tensor.format(name), shape)
    path = Path(settings.data_dir) / "steppers" / NAME / "snapshots" / "base.safetensors"
    path.write_bytes(data)
    refused(
        served,
        lambda: served.post(f"{V1}/{NAME}/snapshots/base/restore"),
        f"{shape}",
        code="invalid_checkpoint",
    )


@pytest.mark.parametrize(("name", "shape"), WRONG, ids=IDS)
def test_step_gradients(served: TestClient, name: str, shape: list[int]) -> None:
    values = initial_values()
    grads = {n: torch.ones_like(v) for n, v in values.items()}
    grads[name] = grads[name].reshape(shape)
    problem = f"gradient for '{name}' has shape {shape}"
    refused(served, lambda: step(served, NAME, grads), problem)
    refused(served, lambda: step(served, NAME, grads, contributors=2, worker=0), problem)
    refused(
        served,
        lambda: served.post(f"{V1}/{NAME}/dry-run", content=codec.encode(grads), headers=OCTET),
        problem,
    )
    # The same body layout as a good step, so the route's cached layout is in play too.
    good = {n: torch.ones_like(v) for n, v in values.items()}
    assert step(served, NAME, good).status_code == 200
    refused(served, lambda: step(served, NAME, grads), problem)
