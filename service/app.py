"""The application factory: ``create_app(settings)`` builds a FastAPI app; its lifespan
opens the registry (and the data directory) and closes them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from adamscope.client.protocol import API_PREFIX, CreateStepper

from . import __version__
from .api import access as api_access
from .api.routes import dashboard, events, history, identity, metrics, snapshots, steppers, tensors
from .api.routes import stats as api_stats
from .api.access import AccessDenied, authenticate, require
from .api.durability import flusher
from .api.http.stream import torch_threads
from .auth import banner, load_access
from .engine import Registry
from .errors import clean_detail, install_error_handlers
from .persistence import Persistence
from .settings import Settings

__all__ = ["create_app"]

log = logging.getLogger("adamscope")

DESCRIPTION = """
Host Adam optimizers ("steppers") and step, read and load their state over REST.

Bulk tensors travel as **safetensors** bodies (`application/octet-stream`); small ones can
also be read and written as JSON. Every error is RFC 9457 `application/problem+json` with
a stable `code`. Nothing received is ever unpickled.
"""


def _document_models(app: FastAPI, *models: type[BaseModel]) -> None:
    """Put schemas in the OpenAPI components that routes ``$ref`` but parse by hand.

    The create route reads its body itself (JSON, or a spec inside safetensors metadata),
    so FastAPI never sees CreateStepper and would leave its ``$ref`` dangling.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()  # FastAPI's document, cached by FastAPI as app.openapi_schema
        _, defs = models_json_schema([(m, "validation") for m in models],
                                     ref_template="#/components/schemas/{model}")
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model_schema in defs.get("$defs", {}).items():
            schemas.setdefault(name, model_schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    access = load_access(settings)  # TokenConfigError here, before anything starts

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        torch_threads()  # one thread runs PyTorch on every core; the event loop on one
        registry = app.state.registry = Registry()
        events.start_monitoring(app, registry)  # before restore: restored steppers too
        log.info("adamscope %s: default device %s, data in %s", __version__,
                 settings.default_device(), settings.data_dir)
        log.info("%s", banner(settings, access))
        persistence = app.state.persistence = Persistence(
            settings.data_dir, registry, settings.default_device(), settings.durability)
        await asyncio.to_thread(persistence.restore_all)
        background = asyncio.create_task(flusher(persistence))
        try:
            yield
        finally:
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
            written = await asyncio.to_thread(persistence.flush_all)
            if written:
                log.info("wrote %d stepper(s) with unwritten changes at shutdown", written)
            app.state.registry = Registry()

    app = FastAPI(
        title="adamscope",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(steppers.router, prefix=API_PREFIX)
    app.include_router(tensors.router, prefix=API_PREFIX)
    app.include_router(snapshots.router, prefix=API_PREFIX)
    app.include_router(identity.router, prefix=API_PREFIX)
    app.include_router(dashboard.router)
    app.include_router(history.router, prefix=API_PREFIX)
    app.include_router(events.router, prefix=API_PREFIX)
    app.include_router(metrics.router)
    app.include_router(api_stats.router, prefix=API_PREFIX)
    events.install_events(app)
    _document_models(app, CreateStepper)

    @app.get("/healthz", tags=["service"], summary="Liveness and basic facts",
             description="Public. Steppers whose restore failed are counted for everyone, "
                         "and named only to a caller whose token could list them.",
             dependencies=[Depends(require("public"))])
    async def healthz(request: Request) -> dict[str, Any]:
        persistence: dict[str, Any] = request.app.state.persistence.health()
        try:
            who = authenticate(request.app.state.access, request.headers.get("authorization"))
        except AccessDenied:
            who = None
        failed = persistence["failed"]
        return {
            "status": "ok",
            "version": __version__,
            "torch": torch.__version__,
            "default_device": settings.default_device(),
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "steppers": len(request.app.state.registry),
            "persistence": {
                **persistence,
                "failed": [{**f, "error": clean_detail(f["error"])} for f in failed
                           if who is not None and who.reaches(f["stepper"])],
                "failed_count": len(failed),
            },
        }

    api_access.install(app, access)  # last: every route must declare its scope
    metrics.install_metrics(app)  # outermost middleware: counts refused requests too
    return app
