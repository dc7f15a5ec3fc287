"""Whole-run history queries: any range of steps, in at most ``max_points`` points.

:func:`span` reads a :class:`~.history.History`'s store over steps ``first..last``: raw rows
for recent steps and tier buckets for older ones (see :mod:`.history_store`), and when they
are more than ``max_points``, merges consecutive ones on a grid of equal step spans, so a
million-step run is answered from step 1 in a bounded reply. Each point says which steps
it covers (``first_steps`` to ``steps``) and how many were recorded (``counts``), with the
mean (``values``), ``min`` and ``max`` of every signal over them (NaN values left out); a
raw step is a point whose mean, min and max are its value.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .history_store import AGGREGATE, TENSORS, Points
from .tiers import MAX, MIN, group, mean

if TYPE_CHECKING:
    from .history import History

__all__ = ["MAX_POINTS", "span", "span_csv"]

#: Points per series when a whole-run query names no ``max_points``.
MAX_POINTS = 1_000


def _grouped(points: Points, max_points: int) -> Points:
    """At most ``max_points`` points: consecutive ones merged on a grid of equal spans."""
    if len(points.lo) <= max_points:
        return points
    first, last = int(points.lo[0]), int(points.hi[-1])
    width = math.ceil((last - first + 1) / max_points)
    keys = (points.lo - first) // width
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)] - 1
    rows, stats = group(points.rows, points.stats, starts)
    return Points(points.lo[starts], points.hi[ends], points.time[ends], rows, stats)


def _series(points: Points, t: int, cols: Sequence[tuple[str, int]]) -> dict[str, Any]:
    means = mean(points.stats)[:, t]
    return {
        "steps": points.hi.tolist(),
        "first_steps": points.lo.tolist(),
        "counts": [int(n) for n in points.rows[:, t]],
        "time": points.time.tolist(),
        "values": {s: means[:, c].tolist() for s, c in cols},
        "min": {s: points.stats[:, MIN, t, c].tolist() for s, c in cols},
        "max": {s: points.stats[:, MAX, t, c].tolist() for s, c in cols},
    }


def _only(points: Points, t: int) -> Points:
    """Tensor ``t``'s points: those in which it took part, of it alone."""
    keep = points.rows[:, t] > 0
    return Points(
        points.lo[keep],
        points.hi[keep],
        points.time[keep],
        points.rows[keep, t : t + 1],
        points.stats[keep, :, t : t + 1],
    )


def span(
    history: History,
    signals: Sequence[str] | None,
    tensors: Sequence[str] | None,
    first: int | None,
    last: int | None,
    max_points: int | None,
) -> dict[str, Any]:
    """The history of steps ``first..last`` (default: the whole run), at most
    ``max_points`` (default :data:`MAX_POINTS`) points per series; the same shape as
    :meth:`~.history.History.query`, each series with ``first_steps``, ``counts``, ``min``
    and ``max`` too. A bucket that reaches into the range is included whole."""
    lo = 0 if first is None else first
    hi = 2**63 - 1 if last is None else last
    n = MAX_POINTS if max_points is None else max_points
    store = history.store
    with history.lock:  # the store has its own lock: steps go on being recorded meanwhile
        cols = history._selected(signals)
        capacity, tensor_capacity = history.aggregate.capacity, history.tensor_capacity
    wanted = history.names if tensors is not None and "*" in tensors else list(tensors or [])
    agg = _grouped(store.span(AGGREGATE, lo, hi), n)
    per_tensor = store.span(TENSORS, lo, hi, [history.index[w] for w in wanted]) if wanted else None
    losses = _grouped(store.loss_span(lo, hi), n)
    out: dict[str, Any] = {
        "stepper": history.stepper,
        "capacity": capacity,
        "tensor_capacity": tensor_capacity,
        "first_step": store.first_step(),
        "signals": [s for s, _ in cols],
        "aggregate": _series(agg, 0, cols),
        "tensors": {},
    }
    for j, name in enumerate(wanted):
        assert per_tensor is not None
        out["tensors"][name] = _series(_grouped(_only(per_tensor, j), n), 0, cols)
    out["loss"] = {"steps": losses.hi.tolist(), "values": mean(losses.stats)[:, 0, 0].tolist()}
    return out


def span_csv(
    history: History,
    signals: Sequence[str] | None,
    tensors: Sequence[str] | None,
    first: int | None,
    last: int | None,
    max_points: int | None,
) -> str:
    """:func:`span` as CSV: ``step,first_step,count,time,tensor,loss``, then per signal its
    mean, ``min(<signal>)`` and ``max(<signal>)``; one row per point of the aggregate
    (``tensor`` empty) and of each tensor asked for, by step; ``loss`` is the mean loss of
    the aggregate point with the same last step."""
    q = span(history, signals, tensors, first, last, max_points)
    sigs = q["signals"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["step", "first_step", "count", "time", "tensor", "loss"]
        + [x for s in sigs for x in (s, f"min({s})", f"max({s})")]
    )
    loss = dict(zip(q["loss"]["steps"], q["loss"]["values"], strict=True))
    rows: list[tuple[int, int, list[str]]] = []
    blocks = [("", -1, q["aggregate"])] + [
        (name, history.index[name], series) for name, series in q["tensors"].items()
    ]
    for name, order, series in blocks:
        for k, step in enumerate(series["steps"]):
            cells = [str(step), str(series["first_steps"][k]), str(series["counts"][k])]
            cells += [repr(series["time"][k]), name]
            cells.append(repr(float(loss[step])) if not name and step in loss else "")
            for s in sigs:
                cells += [repr(float(series[key][s][k])) for key in ("values", "min", "max")]
            rows.append((step, order, cells))
    rows.sort(key=lambda r: (r[0], r[1]))
    w.writerows(r[2] for r in rows)
    return buf.getvalue()
