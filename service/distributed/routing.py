"""The ingress's routes, derived from the single-process app's own.

Every route of the app a slot runs (:func:`adamscope.service.app.create_app`) is served by
the ingress at the same method and path; what the ingress does with it is looked up here
by the function that serves it in one process, so a path is never typed twice and a route
added to the app without an entry here stops the ingress from starting (and fails
tests/distributed/test_routing.py):

* :data:`ACROSS`: routes about no one stepper that the ingress answers across slots;
* :data:`ON_STEPPER`: routes about stepper ``{name}``. An unsharded stepper's slot
  answers (through the entry's ``single`` handler, forwarding by default); for a sharded
  one, ``sharded`` says how the route behaves: forwarded to one shard, fanned out and
  merged, or 501 ``not_supported_sharded``;
* everything else (the dashboard's files, the API's documentation pages and their files,
  FastAPI's OpenAPI document, identity): any slot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request

from ..api import routes as r
from ..api.access import endpoints
from ..api.deps import NAMES_QUERY
from . import creation, gateway, merge, sharded
from .cluster import ShardedRecord
from .gateway import ClusterHandler, SingleHandler
from .ingress import Ingress
from .sharded import Handler

__all__ = ["ACROSS", "ANYWHERE", "ON_STEPPER", "OnStepper", "Route", "routes"]


@dataclass(frozen=True)
class OnStepper:
    """A route about stepper ``{name}``: ``single`` serves it when one slot holds the
    stepper, ``sharded`` when it is sharded."""

    sharded: Handler
    single: SingleHandler = gateway.forward


def _summaries(
    ingress: Ingress,
    record: ShardedRecord,
    shards: Sequence[int],
    parts: Sequence[dict[str, Any]],
    request: Request,
) -> dict[str, Any]:
    """The stepper's summary, with where its shards live (as an unsharded one's has)."""
    return {**merge.summaries(record, parts), "placement": ingress.cluster.placement(record.name)}


def _alerts(
    ingress: Ingress,
    record: ShardedRecord,
    shards: Sequence[int],
    parts: Sequence[dict[str, Any]],
    request: Request,
) -> dict[str, Any]:
    limit = request.query_params.get("limit")
    return merge.alerts(record, parts, int(limit) if limit else None)


def _signals(
    ingress: Ingress,
    record: ShardedRecord,
    shards: Sequence[int],
    parts: Sequence[dict[str, Any]],
    request: Request,
) -> dict[str, Any]:
    return merge.signals(record, shards, parts)


def _stats(
    ingress: Ingress,
    record: ShardedRecord,
    shards: Sequence[int],
    parts: Sequence[dict[str, Any]],
    request: Request,
) -> dict[str, Any]:
    return merge.stats(record, shards, parts)


_NOT_WATCHED = "a sharded stepper is hosted: watched runs report to a single-process service"

#: Routes about no one stepper that the ingress answers across slots.
ACROSS: dict[Callable[..., Any], ClusterHandler] = {
    r.health.healthz: gateway.healthz,
    r.steppers.list_steppers: gateway.list_steppers,
    r.steppers.create_stepper: creation.create,
    r.snapshots.import_stepper: gateway.import_checkpoint,
    r.events.events: gateway.events,
    r.metrics.metrics: gateway.metrics,
    r.diff.diff_route: gateway.diff,
}

#: Routes about one stepper (see the module docstring).
ON_STEPPER: dict[Callable[..., Any], OnStepper] = {
    r.steppers.get_stepper: OnStepper(sharded.fan_out(_summaries), gateway.summary),
    r.steppers.delete_stepper: OnStepper(sharded.delete, gateway.delete_stepper),
    r.steppers.patch_hyperparameters: OnStepper(sharded.fan_out(_summaries)),
    r.steppers.patch_stepper: OnStepper(sharded.fan_out(_summaries)),  # freeze: every shard
    r.steppers.bias_correction: OnStepper(sharded.to_first),
    r.step.step: OnStepper(sharded.step, gateway.step),
    r.step.commit: OnStepper(
        sharded.unsupported(
            "accumulate mode is not available; sum the workers' gradients before stepping"
        )
    ),
    r.tensors.get_params: OnStepper(sharded.fan_out(by=NAMES_QUERY, tensors="params")),
    r.tensors.put_params: OnStepper(sharded.put_tensors("params")),
    r.tensors.get_state: OnStepper(sharded.fan_out(by=NAMES_QUERY, tensors="state")),
    r.tensors.put_state: OnStepper(sharded.put_tensors("state")),
    r.tensors.reset_state: OnStepper(sharded.fan_out(by=NAMES_QUERY)),
    r.snapshots.checkpoint: OnStepper(sharded.fan_out()),
    r.snapshots.set_durability: OnStepper(sharded.fan_out(_summaries)),
    r.snapshots.take_snapshot: OnStepper(sharded.take_snapshot),
    r.snapshots.list_snapshots: OnStepper(sharded.to_first),
    r.snapshots.download_snapshot: OnStepper(
        sharded.unsupported("each shard keeps its own snapshot file; download them from the slots")
    ),
    r.snapshots.restore_snapshot: OnStepper(sharded.fan_out()),
    r.snapshots.delete_snapshot: OnStepper(sharded.fan_out()),
    r.history.get_history: OnStepper(sharded.history),
    r.history.get_alerts: OnStepper(sharded.fan_out(_alerts)),
    r.history.put_alerts: OnStepper(sharded.fan_out(_alerts)),
    r.history.post_loss: OnStepper(sharded.to_first),  # losses are the stepper's: one shard's
    r.histograms.get_histograms: OnStepper(sharded.to_owner(r.histograms.TENSOR_QUERY)),
    r.stats.stats: OnStepper(sharded.fan_out(_stats, by=NAMES_QUERY)),
    r.stats.signals: OnStepper(sharded.fan_out(_signals)),
    r.slice.slice_tensor: OnStepper(sharded.to_owner(NAMES_QUERY)),
    r.dryrun.dry_run_route: OnStepper(
        sharded.unsupported(
            "a dry run of several shards is not merged; dry-run a stepper on one slot"
        )
    ),
    # Watched runs: a slot that holds one serves it; a sharded stepper is never watched.
    **{
        route: OnStepper(sharded.unsupported(_NOT_WATCHED))
        for route in (
            r.watch.report,
            r.watch.command,
            r.watch.load_state,
            r.watch.command_status,
            r.watch.command_body,
            r.watch.upload,
            r.watch.read_state,
            r.watch.list_snapshots,
        )
    },
}

#: Modules whose every route any slot answers (files, the API's documentation pages, the
#: caller's identity).
ANYWHERE = (r.dashboard, r.apidocs, r.identity)


@dataclass(frozen=True)
class Route:
    """One route of the app, and how the ingress serves it."""

    method: str
    path: str
    across: ClusterHandler | None = None
    on_stepper: OnStepper | None = None  # neither: any slot answers


def routes(app: FastAPI) -> Iterator[Route]:
    """Every route of ``app`` (the single-process app), with its handling here; raises
    when one has none, so that no route can be forgotten."""
    anywhere = {m.__name__ for m in ANYWHERE}
    for e in endpoints(app):
        call = e.call
        if call in ACROSS:
            yield Route(e.method, e.path, across=ACROSS[call])
        elif call in ON_STEPPER:
            if "{name}" not in e.path:
                raise RuntimeError(f"{e.method} {e.path} is not about one stepper")
            yield Route(e.method, e.path, on_stepper=ON_STEPPER[call])
        elif getattr(call, "__module__", None) in anywhere or e.path in _documents(app):
            yield Route(e.method, e.path)
        else:
            raise RuntimeError(
                f"the distributed ingress does not know how to serve {e.method} {e.path} "
                f"({getattr(call, '__qualname__', call)}): add it to "
                "adamscope.service.distributed.routing"
            )


def _documents(app: FastAPI) -> set[str | None]:
    """FastAPI's own routes: the API document and its pages."""
    return {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
