"""What route handlers take from the app: its registry, persistence, settings, serving
state and event hub, and the stepper a path names. The one place routes reach the app's
state, so a route module is only parse -> engine/inspect -> reply."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, cast

from fastapi import Query, Request

from ..engine import Registry, Stepper
from ..persistence import Persistence
from ..settings import Settings
from .serving import ServingState

if TYPE_CHECKING:
    from .events import EventHub

__all__ = [
    "NAMES_QUERY",
    "NAME_PROBLEMS",
    "Names",
    "hub",
    "persistence",
    "registry",
    "serving",
    "settings",
    "stepper",
]

#: The problems of every route that names a stepper in its path.
NAME_PROBLEMS = ("stepper_not_found", "request_validation_error")
#: The query parameter that picks parameters by name (repeated: ``?name=a&name=b``), on
#: every route that reads some of a stepper's tensors (the distributed ingress routes a
#: sharded stepper's requests by it).
NAMES_QUERY = "name"

Names = Annotated[
    list[str] | None, Query(alias=NAMES_QUERY, description="parameter names; all if none")
]


def registry(request: Request) -> Registry:
    return cast(Registry, request.app.state.registry)


def stepper(request: Request, name: str) -> Stepper:
    """The stepper ``name`` (404 ``stepper_not_found``)."""
    return registry(request).get(name)


def persistence(request: Request) -> Persistence:
    return cast(Persistence, request.app.state.persistence)


def settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


def serving(request: Request) -> ServingState:
    return cast(ServingState, request.app.state.serving)


def hub(request: Request) -> EventHub:
    return cast("EventHub", request.app.state.events)
