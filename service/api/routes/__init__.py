"""The routes, one module per resource: each handler parses the request, calls the engine
or inspection, and replies. :data:`ROUTERS` lists them with their prefix, in the order the
app includes them (the OpenAPI document keeps that order)."""

from __future__ import annotations

from fastapi import APIRouter

from adamscope.client.constants import API_PREFIX

from . import (
    apidocs,
    dashboard,
    diff,
    dryrun,
    events,
    health,
    histograms,
    history,
    identity,
    metrics,
    slice,
    snapshots,
    stats,
    step,
    steppers,
    tensors,
    watch,
)

__all__ = ["ROUTERS"]

#: (router, path prefix) of every route module.
ROUTERS: tuple[tuple[APIRouter, str], ...] = (
    (steppers.router, API_PREFIX),
    (step.router, API_PREFIX),
    (tensors.router, API_PREFIX),
    (snapshots.router, API_PREFIX),
    (identity.router, API_PREFIX),
    (dashboard.router, ""),
    (apidocs.router, ""),
    (history.router, API_PREFIX),
    (histograms.router, API_PREFIX),
    (events.router, API_PREFIX),
    (metrics.router, ""),
    (stats.router, API_PREFIX),
    (slice.router, API_PREFIX),
    (dryrun.router, API_PREFIX),
    (diff.router, API_PREFIX),
    (health.router, ""),
    (watch.router, API_PREFIX),
)
