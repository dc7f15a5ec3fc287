"""The ingress's routes are the single-process app's own (no Ray needed): every route of
the app a slot runs has an entry in service.distributed.routing, served at the same
method and path; a route the table does not know stops the ingress from being built; and
the ingress's own answers are problems of the one builder, with codes the client knows."""

from __future__ import annotations

import json

import pytest
from fastapi import APIRouter, Depends

from adamscope.client.errors import CODES, NotSupportedShardedError, error_from_problem
from adamscope.service.api.access import endpoints, require
from adamscope.service.app import create_app
from adamscope.service.distributed import routing
from adamscope.service.errors import problem_response
from adamscope.service.settings import Settings


def app_routes() -> set[tuple[str, str]]:
    return {(e.method, e.path) for e in endpoints(create_app(Settings.model_construct()))}


def test_every_route_of_the_single_process_app_has_an_entry() -> None:
    served = {(r.method, r.path): r for r in routing.routes(create_app(Settings.model_construct()))}
    assert set(served) == app_routes()
    # Every route about one stepper says how it behaves when the stepper is sharded.
    about_one = {k for k in served if "{name}" in k[1] and k[1].startswith("/v1/steppers/")}
    assert about_one and all(served[k].on_stepper is not None for k in about_one)
    assert served[("POST", "/v1/steppers")].across is not None
    assert served[("GET", "/healthz")].across is not None
    assert served[("GET", "/dashboard")].across is None
    assert served[("GET", "/dashboard")].on_stepper is None  # any slot answers


def test_a_route_the_table_does_not_know_stops_the_ingress() -> None:
    app = create_app(Settings.model_construct())
    extra = APIRouter()

    @extra.get("/v1/steppers/{name}/brand-new", dependencies=[Depends(require("read"))])
    async def brand_new(name: str) -> dict[str, str]:
        return {"name": name}

    app.include_router(extra)
    with pytest.raises(RuntimeError, match="brand-new"):
        list(routing.routes(app))


def test_the_ingress_serves_the_apps_paths(tmp_path) -> None:
    """The ingress app (not started: no Ray here) routes exactly the app's paths."""
    pytest.importorskip("ray")
    from adamscope.service.distributed.app import build_app
    from adamscope.service.distributed.cluster import ClusterConfig

    app, _ = build_app(ClusterConfig(settings={"data_dir": str(tmp_path)}, slots=1))
    registered = {
        (m, r.path)
        for r in app.routes
        if hasattr(r, "methods") and r.methods
        for m in r.methods
        if m != "HEAD"
    }
    assert app_routes() <= registered


@pytest.mark.parametrize("code", ["slot_unavailable", "not_supported_sharded", "shards_diverged"])
def test_the_ingresses_codes_are_problems_the_client_knows(code: str) -> None:
    r = problem_response(code, "why", "/v1/steppers/x/step")
    body = json.loads(bytes(r.body))
    assert body["type"] == f"urn:adamscope:problem:{code}"
    assert r.status_code == body["status"] == CODES[code][0]
    if code == "not_supported_sharded":
        assert isinstance(error_from_problem(body), NotSupportedShardedError)
