"""Routes for watched runs: a training job's own optimizer, reported by ``adamscope.watch``.

The trainer posts a report after its steps (``POST /watch/{name}/report``, write scope):
the first creates the stepper, of kind ``watched``; each records the step with the
signals the trainer computed, and its reply carries the commands queued for the run
(:mod:`..watching`). Everything that reads a stepper (list, summary, signals, history,
alerts, events, metrics, the dashboard) reads a watched one unchanged; steps and edits are
refused with 409 ``stepper_watched`` and go through the commands here instead.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response

from adamscope.client import codec
from adamscope.client.constants import STEPPER_NAME_PATTERN

from ...engine import Stepper
from ...engine.errors import InvalidSpec, StepperNotFound, StepperWatched
from ...engine.stepper import WATCHED
from ...engine.watched import record_step
from ...errors import ApiError, problems
from ...inspect.recorder import history_of
from ...inspect.watched import clean_signals, use_reported_signals
from .. import watch_queue as queue
from .. import watch_snapshots as snapshots
from ..access import authorize_name, require
from ..deps import NAME_PROBLEMS, hub, persistence, registry, settings
from ..http.body import read_body
from ..http.media import OCTET
from ..http.reply import json_response
from ..watch_layout import builder
from ..watch_ranks import Ranks, ranks_of
from ..watching import Command, Desk, desk_of

__all__ = ["router"]

router = APIRouter(tags=["watch"])

#: Longest a state read waits for the trainer's next step boundary (seconds).
MAX_WAIT = 300.0
_OPS = ("options", "state", "snapshot", "restore")
#: The most steps ahead a distributed run's command may be placed (``lead``).
MAX_LEAD = 100_000
#: A distributed run's state read is asked again (further ahead) when a rank missed it.
READ_TRIES = 3


def _desks(request: Request) -> dict[str, Desk]:
    return queue.desks(request)  # each loaded from the data directory when first needed


def _ranks(request: Request) -> dict[str, Ranks]:
    """The distributed runs' ranks, by run name (:mod:`..watch_ranks`)."""
    found: dict[str, Ranks] | None = getattr(request.app.state, "watch_ranks", None)
    if found is None:
        found = request.app.state.watch_ranks = {}
    return found


def _stamp(request: Request, name: str, c: Command, lead: int | None) -> int:
    """A distributed run's command gets the step every rank applies it at (its lead over
    the latest step reported is returned; 0 for a single process)."""
    ranks = _ranks(request).get(name)
    if ranks is None:
        return 0
    c.args["at"] = ranks.apply_step(lead)
    return int(c.args["at"]) - max(ranks.latest.values(), default=0)


def _lead(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_LEAD:
        raise InvalidSpec(f"lead must be an integer in [1, {MAX_LEAD}], got {value!r}")
    return value


def _json(body: bytes | bytearray) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError as e:
        raise ApiError("malformed_body", f"body is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ApiError("malformed_body", "body must be a JSON object")
    return value


def _watched(request: Request, name: str, report: dict[str, Any] | None) -> Stepper:
    reg = registry(request)
    try:
        stepper = reg.get(name)
    except StepperNotFound:
        if report is None:
            raise
        build = builder(name, report, settings(request), reg, persistence(request).failed)
        stepper = reg.create(name, build)
    if stepper.hosting != WATCHED:
        raise ApiError(
            "stepper_exists",
            f"stepper {name!r} exists and is {stepper.hosting}: a watched run needs its own name",
        )
    use_reported_signals(stepper)
    return stepper


def _record(stepper: Stepper, report: dict[str, Any]) -> None:
    step = report.get("step")
    if not isinstance(step, int) or step < 0:
        raise InvalidSpec(f"report's step must be an integer >= 0, got {step!r}")
    raw = report.get("groups")
    groups: list[dict[str, Any]] = (
        [g for g in raw if isinstance(g, dict)] if isinstance(raw, list) else []
    )
    with stepper.lock:
        observer = use_reported_signals(stepper)
        observer.incoming = clean_signals(report.get("signals"), step)
        record_step(stepper, step, groups)
    stepper.settle()


def _merge_record(
    stepper: Stepper, ranks: Ranks, step: int, found: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    merged = ranks.merge(step, found)
    _record(stepper, merged)
    return merged


@router.post(
    "/watch/{name}/report",
    summary="A watched run's report: its step, signals and scalars",
    dependencies=[Depends(require("write"))],
    responses=problems(
        *NAME_PROBLEMS,
        "malformed_body",
        "invalid_spec",
        "stepper_exists",
        "forbidden",
        "tensor_too_large",
        "stepper_limit",
        "unknown_parameter",
        "duplicate_name",
        "invalid_hyperparameter",
    ),
)
async def report(
    request: Request, name: Annotated[str, Path(pattern=STEPPER_NAME_PATTERN)]
) -> Response:
    authorize_name(request, name)
    body = _json(await read_body(request))
    ranks = ranks_of(_ranks(request), name, body)  # checked before the run is created
    stepper = _watched(request, name, body)
    desk = desk_of(_desks(request), name)
    if ranks is None:
        await asyncio.to_thread(_record, stepper, body)
        settled = desk.ack(body.get("acks"))
        _losses(request, stepper, body.get("scalars"))
    else:  # one rank of a distributed job: recorded once merged (or by rank 0)
        async with ranks.lock:
            for step, found in ranks.collect(body):
                merged = await asyncio.to_thread(_merge_record, stepper, ranks, step, found)
                _losses(request, stepper, merged.get("scalars"))
        settled = ranks.settle(desk, int(body["rank"]), body.get("acks"))
        await _deliver_ready(request, name, ranks)
    for c in settled:
        _publish(request, name, c)
    return json_response({"step": stepper.step_count, "commands": desk.pending()})


async def _deliver(request: Request, name: str, c: Command, body: bytes) -> None:
    """The trainer's answer to state read or snapshot ``c`` (a distributed job's gathered
    from its ranks): a snapshot is kept in the data directory, a state read handed to
    whoever waits for it."""
    if c.op == "snapshot":  # kept in the data directory, not here
        await snapshots.store(request, _watched(request, name, None), c, body)
        body = b""
    desk_of(_desks(request), name).answer(c.id, body)


async def _deliver_ready(request: Request, name: str, ranks: Ranks) -> None:
    """Deliver the answers the ranks' uploads and acknowledgements completed."""
    for c, body in ranks.take_ready():
        await _deliver(request, name, c, body)


def _losses(request: Request, stepper: Stepper, scalars: Any) -> None:
    """The ``loss`` scalars the trainer logged, each at the step it was logged after."""
    recorder = history_of(stepper)
    now = time.time()
    for s in scalars if isinstance(scalars, list) else []:
        if not isinstance(s, dict) or s.get("name") != "loss":
            continue
        step, value = s.get("step"), s.get("value")
        if isinstance(step, int) and isinstance(value, float | int):
            if recorder is not None:
                recorder.history.record_loss(step, float(value), now)
            hub(request).publish_loss(stepper.name, step, float(value), now)


def _publish(request: Request, name: str, c: Command) -> None:
    event = {"stepper": name, **c.public()}
    for sub in hub(request).subscribers:
        if sub.wants(name):
            sub.push("command", event)


@router.post(
    "/watch/{name}/commands",
    status_code=202,
    summary="Queue a command for a watched run's trainer (options, state, snapshot, restore)",
    dependencies=[Depends(require("write"))],
    responses=problems(
        *NAME_PROBLEMS,
        "malformed_body",
        "invalid_spec",
        "stepper_exists",
        "forbidden",
        "snapshot_not_found",
        "snapshot_exists",
        "invalid_checkpoint",
    ),
)
async def command(request: Request, name: str) -> Response:
    authorize_name(request, name)
    body = _json(await read_body(request))
    stepper = _watched(request, name, None)
    op = body.pop("op", None)
    lead = _lead(body.pop("lead", None))
    if op not in _OPS:
        raise InvalidSpec(f"op must be one of {list(_OPS)}, got {op!r}")
    if op == "options":
        opts = body.get("options")
        if (
            not isinstance(opts, dict)
            or not opts
            or set(opts) - {"lr", "betas", "weight_decay", "eps"}
        ):
            raise InvalidSpec("options: a non-empty object of lr, betas, weight_decay, eps")
    desk = desk_of(_desks(request), name)
    if op == "restore":
        kept = await snapshots.restore_body(request, stepper, body.get("snapshot"))
        c = desk.add("load", {"snapshot": body["snapshot"]}, kept)
    else:
        if op == "snapshot":
            body["with_params"] = True
            body.pop("names", None)
            if body.get("snapshot") is not None:
                snapshots.check_new(request, stepper, body["snapshot"])
        c = desk.add(op, body)
        if op == "snapshot" and not c.args.get("snapshot"):
            c.args["snapshot"] = c.id
    _stamp(request, name, c, lead)
    return json_response(c.public(), status_code=202)


@router.put(
    "/watch/{name}/state",
    status_code=202,
    summary="Queue a state load (safetensors, keys '<param>/<key>') for a watched run",
    dependencies=[Depends(require("write"))],
    responses=problems(*NAME_PROBLEMS, "malformed_body", "stepper_exists", "forbidden"),
)
async def load_state(request: Request, name: str) -> Response:
    authorize_name(request, name)
    body = bytes(await read_body(request))
    _watched(request, name, None)
    try:
        codec.decode(body)
    except codec.CodecError as e:
        raise ApiError("malformed_body", f"not safetensors: {e}") from None
    c = desk_of(_desks(request), name).add("load", {}, body)
    _stamp(request, name, c, None)
    return json_response(c.public(), status_code=202)


def _command(request: Request, name: str, cid: str) -> Command:
    _watched(request, name, None)
    c = desk_of(_desks(request), name).commands.get(cid)
    if c is None:
        raise ApiError("command_not_found", f"run {name!r} has no command {cid!r}")
    return c


@router.get(
    "/watch/{name}/commands/{cid}",
    summary="A command's status: pending, or applied at a step",
    dependencies=[Depends(require("read"))],
    responses=problems(*NAME_PROBLEMS, "command_not_found", "stepper_exists"),
)
async def command_status(request: Request, name: str, cid: str) -> Response:
    return json_response(_command(request, name, cid).public())


@router.get(
    "/watch/{name}/commands/{cid}/body",
    summary="The tensors a command carries (for the trainer)",
    dependencies=[Depends(require("write"))],
    responses=problems(*NAME_PROBLEMS, "command_not_found", "stepper_exists"),
)
async def command_body(request: Request, name: str, cid: str) -> Response:
    c = _command(request, name, cid)
    return Response(c.body or codec.encode({}), media_type=OCTET)


@router.post(
    "/watch/{name}/commands/{cid}/upload",
    summary="The trainer's answer to a state read: safetensors",
    dependencies=[Depends(require("write"))],
    responses=problems(
        *NAME_PROBLEMS,
        "command_not_found",
        "malformed_body",
        "invalid_spec",
        "stepper_exists",
        "invalid_checkpoint",
        "snapshot_exists",
        "persistence_failed",
    ),
)
async def upload(request: Request, name: str, cid: str) -> Response:
    authorize_name(request, name)
    c = _command(request, name, cid)
    body = bytes(await read_body(request))
    ranks = _ranks(request).get(name)
    if ranks is None:
        await _deliver(request, name, c, body)
    else:  # one rank's part: answered when the ranks that hold the state uploaded theirs
        ranks.answer(c, body)
        await _deliver_ready(request, name, ranks)
    return json_response({"ok": True})


@router.get(
    "/watch/{name}/state",
    summary="A watched run's state, as of the trainer's next step boundary (safetensors)",
    dependencies=[Depends(require("read"))],
    responses=problems(*NAME_PROBLEMS, "trainer_timeout", "stepper_exists"),
)
async def read_state(
    request: Request,
    name: str,
    names: Annotated[list[str] | None, Query(alias="name")] = None,
    with_params: bool = False,
    timeout: Annotated[float, Query(gt=0, le=MAX_WAIT)] = 30.0,
    lead: Annotated[int | None, Query(ge=1, le=MAX_LEAD)] = None,
) -> Response:
    _watched(request, name, None)
    desk = desk_of(_desks(request), name)
    end = asyncio.get_running_loop().time() + timeout
    for _ in range(READ_TRIES):
        c = desk.add("state", {"names": names, "with_params": with_params})
        used = _stamp(request, name, c, lead)
        try:
            await asyncio.wait_for(c.done.wait(), end - asyncio.get_running_loop().time())
        except TimeoutError:
            c.status = "expired"
            raise ApiError(
                "trainer_timeout",
                f"the trainer of {name!r} did not answer within {timeout} s (is it stepping? "
                "state is read at its next step boundary)",
            ) from None
        ranks = _ranks(request).get(name)
        if c.upload is not None or ranks is None or not ranks.missed(c):
            break
        lead = max(2 * used, ranks.lead())  # a rank got it after its step: further ahead
    if c.upload is None:
        raise StepperWatched(f"the trainer could not read the state: {c.detail}")
    step = codec.decode(c.upload)[1].get("step", "")
    return Response(c.upload, media_type=OCTET, headers={"X-Adamscope-Step": step})


@router.get(
    "/watch/{name}/snapshots",
    summary="The snapshots a watched run's trainer uploaded (kept in the data directory)",
    dependencies=[Depends(require("read"))],
    responses=problems(*NAME_PROBLEMS, "stepper_exists"),
)
async def list_snapshots(request: Request, name: str) -> Response:
    found = await snapshots.listing(request, _watched(request, name, None))
    return json_response({"snapshots": found})
