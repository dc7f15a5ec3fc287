"""The application factory: ``create_app(settings)`` builds a FastAPI app; its lifespan
opens the registry, the data directory and the serving state, and closes them.

This is where the layers meet: the engine's registry gets a hook that gives every stepper
it admits (created, imported or restored) its signals and history (inspection), reporting
to the app's event hub (HTTP); the engine itself knows nothing of either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from adamscope.client.protocol import CreateStepper

from . import __version__
from .api import access
from .api.durability import flusher
from .api.events import QUEUE_SIZE, EventHub
from .api.http.requests import install_metrics
from .api.routes import ROUTERS
from .api.serving import ServingState
from .auth import banner, load_access
from .engine import Registry, Stepper
from .engine.errors import EngineError
from .errors import install_error_handlers
from .inspect.history import HistoryConfig
from .inspect.recorder import attach_history, close_history
from .inspect.signals import attach_signals
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
        _, defs = models_json_schema(
            [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
        )
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model_schema in defs.get("$defs", {}).items():
            schemas.setdefault(name, model_schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _monitor(app: FastAPI, stepper: Stepper) -> None:
    """The registry hook: a stepper's signals and history, reporting to the event hub.
    Both are computed once the step's reply has left (``defer_after_step``): a step's
    latency is PyTorch's update, and the signals overlap the client's next forward pass."""
    settings: Settings = app.state.settings
    hub: EventHub = app.state.events
    attach_signals(stepper).enabled = settings.signals
    stepper.defer_after_step = True
    persistence: Persistence | None = getattr(app.state, "persistence", None)
    path = None
    if settings.history_durable and persistence is not None:
        try:
            path = persistence.store.history_path(stepper.name)
        except (OSError, EngineError) as e:  # the stepper still loads; its history in memory
            log.error("history of %r cannot be kept on disk: %s", stepper.name, e)
    attach_history(
        stepper, app.state.history_config, sink=hub.notify, sequence=hub.next_seq, path=path
    )


def _close_histories(registry: Registry) -> None:
    """At shutdown: each stepper's last step into its history, then the database closed."""
    for stepper in registry.list():
        stepper.settle()
        close_history(stepper)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    serving: ServingState = app.state.serving
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    serving.compute.start()  # one thread runs PyTorch on every core; the event loop on one
    registry = app.state.registry = Registry()
    app.state.events.loop = asyncio.get_running_loop()
    registry.hooks.append(lambda stepper: _monitor(app, stepper))  # restored ones too
    log.info(
        "adamscope %s: default device %s, data in %s",
        __version__,
        settings.default_device(),
        settings.data_dir,
    )
    log.info("%s", banner(settings, app.state.access))
    persistence = app.state.persistence = Persistence(
        settings.data_dir, registry, settings.default_device(), settings.durability
    )
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
        await asyncio.to_thread(_close_histories, registry)
        app.state.registry = Registry()
        serving.compute.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    table = load_access(settings)  # TokenConfigError here, before anything starts
    # /docs and /redoc are routes of their own (api/routes/apidocs.py): FastAPI's load
    # their scripts from a CDN.
    app = FastAPI(
        title="adamscope",
        version=__version__,
        description=DESCRIPTION,
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.access = table
    app.state.serving = ServingState()
    app.state.history_config = HistoryConfig(
        steps=settings.history_steps,
        tensor_values=settings.history_tensor_values,
        tier_widths=tuple(settings.history_tier_widths),
        tier_buckets=settings.history_tier_buckets,
        tier_tensor_values=settings.history_tier_tensor_values,
    )
    app.state.events = EventHub(QUEUE_SIZE, settings.events_max_tensors)
    install_error_handlers(app)
    for router, prefix in ROUTERS:
        app.include_router(router, prefix=prefix)
    _document_models(app, CreateStepper)
    access.install(app, table)  # last: every route must declare its scope
    install_metrics(app)  # outermost middleware: counts refused requests too
    return app
