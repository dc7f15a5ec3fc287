"""The distributed service's front door: a FastAPI app that Ray Serve runs as its ingress.

It serves every route of the single-process app at the same method and path
(:mod:`.routing` derives them from that app): a request about a stepper goes to the slot
that holds it (:mod:`.ingress`), whose service (the single-process app unchanged) answers
it, and the reply streams back as it came; so every endpoint, the dashboard and the Python
client work as on one machine. A **sharded** stepper (its tensors over several slots) is a
stepper of the same name on each of those slots; :mod:`.sharded` says how each route
behaves for one, under the stepper's lock (so reads never see shards at different steps).

Authentication stays where it is: each slot's service checks the caller's token (the
ingress passes the Authorization header on), so scopes and prefixes hold unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..app import create_app
from ..errors import problem_response
from ..settings import Settings
from . import sharded
from .cluster import ClusterConfig, SlotStartError
from .gateway import ClusterHandler
from .ingress import Ingress
from .routing import OnStepper, routes

__all__ = ["build_app"]

log = logging.getLogger("adamscope.distributed")

Endpoint = Callable[[Request], Awaitable[Response]]


def _across(ingress: Ingress, handler: ClusterHandler) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return await handler(ingress, request)

    return endpoint


def _on_stepper(ingress: Ingress, route: OnStepper) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        name = request.path_params["name"]
        record = ingress.record(name)
        if record is None:
            slot = await ingress.slot_for(name)
            if slot is None:  # a slot's service says it has no such stepper
                return await ingress.anywhere(request)
            return await route.single(ingress, slot, request)
        async with ingress.lock(name):
            if request.method != "GET" and route.sharded is not sharded.step:
                ingress.steps.pop(name, None)  # a state load or restore may move the step
            return await route.sharded(ingress, record, request)

    return endpoint


def _anywhere(ingress: Ingress) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        return await ingress.anywhere(request)

    return endpoint


def _started(
    ingress: Ingress,
) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """Every answer says when the slots did not start (``/healthz`` with them)."""

    async def middleware(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if ingress.start_error is not None:
            if request.url.path == "/healthz":
                return JSONResponse(
                    {
                        "status": "failed",
                        "mode": "ray",
                        "error": ingress.start_error,
                        "slots": ingress.cluster.describe(),
                    },
                    status_code=503,
                )
            return problem_response(
                "slot_unavailable",
                f"the slots did not start: {ingress.start_error}",
                request.url.path,
            )
        await ingress.ready()
        return await call_next(request)

    return middleware


def build_app(config: ClusterConfig) -> tuple[FastAPI, Ingress]:
    """The ingress app and its router state."""
    ingress = Ingress(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # At startup, not in a request: a request's cancellation (its client gave up)
        # would cancel the actor calls it started. A start that fails is reported by every
        # answer (and /healthz, which `adamscope serve --ray` waits on), not retried: the
        # slots' resources cannot be had, or their services do not start.
        try:
            await ingress.ready()
        except Exception as e:  # noqa: BLE001 - reported, see above
            ingress.start_error = (
                str(e) if isinstance(e, SlotStartError) else f"{type(e).__name__}: {e}"
            )
            log.error("distributed: the slots did not start: %s", ingress.start_error)
        yield
        # Serve tears the replica down (the application deleted, Serve shut down): the
        # slots stop gracefully, each writing what its durability policy still owes.
        await ingress.stop()
        await ingress.http.aclose()

    app = FastAPI(
        title="adamscope (distributed)",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.ingress = ingress
    app.middleware("http")(_started(ingress))
    # The routes of the app each slot runs (its settings do not change its routes).
    for route in routes(create_app(Settings.model_construct())):
        if route.across is not None:
            endpoint = _across(ingress, route.across)
        elif route.on_stepper is not None:
            endpoint = _on_stepper(ingress, route.on_stepper)
        else:
            endpoint = _anywhere(ingress)
        app.add_route(route.path, endpoint, methods=[route.method], include_in_schema=False)
    # Anything else: a slot's service answers (its 404 and 405 problems, say).
    app.add_route(
        "/{path:path}",
        _anywhere(ingress),
        methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
    return app, ingress
