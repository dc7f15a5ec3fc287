"""``GET /steppers/{name}/slice``: a selection (``index``/``rows``) of one tensor, or one
derived view of it, as JSON, computed on the selected elements only."""

from __future__ import annotations

import json
import re
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from adamscope.client import codec
from adamscope.client.constants import INT64_MAX

from ...engine.errors import InvalidState
from ...errors import ApiError, problems
from ...inspect.views import VIEW_KEYS, view_of
from ..access import require
from ..deps import NAME_PROBLEMS, NAMES_QUERY, registry, serving, settings
from .stats import WATCHED_READS, invalid

__all__ = ["parse_index", "router"]

router = APIRouter(tags=["inspection"])

# At most 19 digits: every index fits int64 (checked in _index_int), and int() is never
# asked to read thousands of digits.
_INDEX_ITEM = re.compile(r" *(-?[0-9]{1,19})? *(: *(-?[0-9]{1,19})? *(: *([0-9]{1,19})? *)?)?")


def _index_int(text: str) -> int:
    value = int(text)
    if not -INT64_MAX <= value <= INT64_MAX:
        raise invalid(f"index {value} is outside the int64 range")
    return value


def parse_index(raw: str) -> tuple[int | slice, ...]:
    """``"3"``, ``"0:4"``, ``"2,1:10:2"``, ``":,0"``: ints and slices, numpy style (a step
    must be positive)."""
    items: list[int | slice] = []
    for part in raw.split(","):
        m = _INDEX_ITEM.fullmatch(part)
        if m is None or not part.strip():
            raise invalid(f"index item {part[:40]!r} is not an int or a slice a:b[:c]")
        start, colon, stop, _, step = m.groups()
        if colon is None:
            items.append(_index_int(start))
            continue
        if step is not None and int(step) == 0:
            raise invalid("a slice step must be positive")
        items.append(
            slice(
                _index_int(start) if start else None,
                _index_int(stop) if stop else None,
                _index_int(step) if step else None,
            )
        )
    return tuple(items)


@router.get(
    "/steppers/{name}/slice",
    summary="A slice or index selection of one tensor (or derived view) as JSON",
    dependencies=[Depends(require("read"))],
    responses=problems(
        *NAME_PROBLEMS, "unknown_parameter", "invalid_state", "json_too_large", "stepper_watched"
    ),
)
async def slice_tensor(
    name: str,
    request: Request,
    param: Annotated[str, Query(alias=NAMES_QUERY, description="the parameter")],
    key: Annotated[str, Query(description="one of " + ", ".join(VIEW_KEYS))] = "param",
    index: Annotated[
        str | None,
        Query(
            description="numpy-style selection: ints and slices, comma-separated ('3', "
            "'0:4', '2,1:10:2')"
        ),
    ] = None,
    rows: Annotated[str | None, Query(description="a:b[:c] over the first dimension")] = None,
) -> Response:
    stepper = registry(request).get(name)
    stepper.check_hosted_tensors(WATCHED_READS)
    if key not in VIEW_KEYS:
        raise invalid(f"unknown key {key!r}; expected one of {', '.join(VIEW_KEYS)}")
    if index is not None and rows is not None:
        raise invalid("give index or rows, not both")
    selection = (
        parse_index(index) if index is not None else (parse_index(rows) if rows is not None else ())
    )
    if rows is not None and (len(selection) != 1 or not isinstance(selection[0], slice)):
        raise invalid(f"rows must be one slice a:b[:c], got {rows!r}")
    limit = settings(request).max_json_elements

    def select() -> tuple[int, torch.Tensor]:
        with stepper.lock:
            shape, _ = stepper.param_meta(param)  # unknown_parameter
            if len(selection) > len(shape):
                raise invalid(
                    f"{len(selection)} index items for a tensor of {len(shape)} "
                    f"dimension(s) {shape}"
                )
            view = view_of(
                stepper.param(param), stepper.param_state(param), stepper.param_group(param), key
            )
            if isinstance(view, str):
                raise InvalidState(f"{key} of {param!r}: {view}", parameter=param)
            try:
                probe = torch.empty(shape, device="meta")[selection]
            except (IndexError, RuntimeError) as e:  # RuntimeError: a size past int64
                raise invalid(f"index {index or rows!r} on shape {shape}: {e}") from None
            if probe.numel() > limit:
                raise ApiError(
                    "json_too_large",
                    f"{probe.numel()} elements exceed the JSON limit of {limit}; select fewer",
                    limit=limit,
                )
            return stepper.step_count, view.select(selection).detach().to("cpu", copy=True)

    step, t = await serving(request).off_loop(stepper, select)
    return Response(
        json.dumps(
            {
                "stepper": name,
                "step": step,
                "name": param,
                "key": key,
                "index": index if index is not None else rows,
                **codec.tensor_to_json(t),
            },
            separators=(",", ":"),
        ).encode(),
        media_type="application/json",
    )
