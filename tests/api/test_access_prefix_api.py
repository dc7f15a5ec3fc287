"""A prefix-restricted token over HTTP, against steppers whose names *contain* its prefix
without beginning with it (``x-team-a-anything``, ``xteam-a-net``): every route that names
a stepper (path, body, query) refuses them with 403 and changes nothing, and the list
does not show them. The matrix in test_auth.py only uses names that begin with a prefix or
share none of it, so a rule that matched the prefix anywhere in a name would pass it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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

from adamscope.client import codec
from adamscope.service.app import create_app
from adamscope.service.settings import Settings

ADMIN = "admin-token-0123456789abcdef"
TEAM_A = "team-a-token-0123456789abcdef"
TOKENS = [
    {"token": ADMIN, "scope": "admin", "name": "operator"},
    {"token": TEAM_A, "scope": "admin", "prefix": "team-a-", "name": "team-a"},
]
OURS = "team-a-net"
#: Names that contain the prefix "team-a-" but do not begin with it.
THEIRS = ["x-team-a-anything", "xteam-a-net"]


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", device="cpu", tokens=TOKENS)
    with TestClient(create_app(settings)) as c:
        c.headers.update(auth(ADMIN))
        values = initial_values()
        for name in (OURS, *THEIRS):
            create(c, {**SPEC, "name": name}, values)
            assert (
                step(c, name, {k: torch.ones_like(v) for k, v in values.items()}).status_code == 200
            )
        assert c.post(f"{V1}/{THEIRS[0]}/snapshots", json={"name": "s1"}).status_code == 201
        yield c


def observed(c: TestClient) -> tuple[object, ...]:
    """Everything about every stepper, as the unrestricted admin sees it."""
    return (registered(c), *(snapshot(c, n) for n in (OURS, *THEIRS)))


def test_the_prefix_reaches_its_own_stepper(client: TestClient) -> None:
    h = auth(TEAM_A)
    assert client.get(f"{V1}/{OURS}", headers=h).status_code == 200
    r = client.post(
        f"{V1}/{OURS}/step", content=codec.encode({"b": torch.ones(3)}), headers={**OCTET, **h}
    )
    assert r.status_code == 200, r.text
    assert client.get(V1, headers=h).json()["steppers"][0]["name"] == OURS


@pytest.mark.parametrize("name", THEIRS)
def test_names_containing_the_prefix_elsewhere_are_out_of_reach(
    client: TestClient, name: str
) -> None:
    before = observed(client)
    h = auth(TEAM_A)
    grads = codec.encode({"b": torch.ones(3)})
    refused = [
        client.get(f"{V1}/{name}", headers=h),
        client.get(f"{V1}/{name}/params", headers=h),
        client.get(f"{V1}/{name}/state", headers=h),
        client.post(f"{V1}/{name}/step", content=grads, headers={**OCTET, **h}),
        client.post(f"{V1}/{name}/dry-run", content=grads, headers={**OCTET, **h}),
        client.put(f"{V1}/{name}/params", content=grads, headers={**OCTET, **h}),
        client.patch(f"{V1}/{name}/hyperparameters", json={"lr": 0.5}, headers=h),
        client.delete(f"{V1}/{name}/state", headers=h),
        client.delete(f"{V1}/{name}", headers=h),
        client.get("/v1/diff", params={"a": OURS, "b": name}, headers=h),
    ]
    for r in refused:
        body = assert_problem(r, "forbidden", f"'{name}' does not")
        assert body["prefix"] == "team-a-"
    assert observed(client) == before


@pytest.mark.parametrize("name", ["x-team-a-new", "xteam-a-new"])
def test_creating_or_importing_such_a_name_is_refused(client: TestClient, name: str) -> None:
    before = observed(client)
    h = auth(TEAM_A)
    assert_problem(
        client.post(V1, json={**SPEC, "name": name}, headers=h), "forbidden", f"'{name}' does not"
    )
    exported = client.post(f"{V1}/{OURS}/snapshots", json={"name": "mine"}, headers=h)
    assert exported.status_code == 201, exported.text
    data = client.get(f"{V1}/{OURS}/snapshots/mine", headers=h).content
    assert_problem(
        client.post(f"{V1}/import", params={"name": name}, content=data, headers={**OCTET, **h}),
        "forbidden",
        f"'{name}' does not",
    )
    assert name not in registered(client)
    assert registered(client) == before[0]


def test_the_list_and_snapshots_show_only_reachable_steppers(client: TestClient) -> None:
    h = auth(TEAM_A)
    assert [s["name"] for s in client.get(V1, headers=h).json()["steppers"]] == [OURS]
    assert_problem(client.get(f"{V1}/{THEIRS[0]}/snapshots", headers=h), "forbidden")
    assert_problem(client.get(f"{V1}/{THEIRS[0]}/snapshots/s1", headers=h), "forbidden")
    # The admin (no prefix) sees all three.
    assert registered(client) == sorted([OURS, *THEIRS])


def test_refusals_name_the_request_and_the_openapi_document_describes_them(
    client: TestClient,
) -> None:
    path = f"{V1}/{THEIRS[0]}"
    forbidden = assert_problem(client.get(path, headers=auth(TEAM_A)), "forbidden")
    unauthorized = assert_problem(client.get(path, headers={"authorization": ""}), "unauthorized")
    assert forbidden["instance"] == unauthorized["instance"] == path
    doc = client.get("/openapi.json").json()
    step_op = doc["paths"][f"{V1}/{{name}}/step"]["post"]
    for status in ("401", "403"):
        assert step_op["responses"][status]["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        }
