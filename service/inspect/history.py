"""The history of one stepper's per-step signals and losses, as time series.

:class:`History` keeps the scalar signals of each step (the aggregate, and per tensor) in
ring buffers and answers queries over them (JSON, CSV, step events); the recorder
(:mod:`.recorder`) writes a row after every step. Memory is bounded by
:class:`HistoryConfig`: ``steps`` rows of aggregate signals, and per-tensor signals for as
many of the latest steps as ``tensor_values`` cells allow (``tensor_values // (tensors x
signals)``, at most ``steps``), so a model with many tensors keeps a shorter per-tensor
window. Every row also goes to the history's :class:`~.history_store.HistoryStore`
(SQLite: a file in the data directory, or in memory), which keeps the whole run within a
stated bound, old steps downsampled into tiers of min/max/mean buckets; :meth:`History.span`
queries it from step 1. At start the latest stored rows fill the rings again. If a stepper
goes back in time (a snapshot is restored), the rows from the step it returns to onwards
are dropped, in memory and in the store.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from adamscope.client.codec import json_float

from .history_store import AGGREGATE, TENSORS, HistoryConfig, HistoryStore
from .span import span, span_csv

__all__ = ["LATENCY_BUCKETS", "History", "HistoryConfig", "json_safe"]

log = logging.getLogger("adamscope.history")

#: Upper bounds (seconds) of the step latency histogram's buckets (+Inf implied).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_INITIAL_ROWS = 64


class _Ring:
    """Rows of float64 cells (each with a step, a sequence number and a time), at most
    ``capacity`` of them, oldest overwritten first. Storage doubles as rows arrive, up to
    ``capacity``; ``row_shape`` ends with the column axis, which can grow."""

    def __init__(self, capacity: int, row_shape: tuple[int, ...]) -> None:
        self.capacity = max(1, capacity)
        alloc = min(self.capacity, _INITIAL_ROWS)
        self.steps = np.zeros(alloc, np.int64)
        self.seqs = np.zeros(alloc, np.int64)
        self.times = np.zeros(alloc, np.float64)
        self.values = np.full((alloc, *row_shape), np.nan)
        self.present = np.zeros((alloc, *row_shape[:-1]), bool)
        self.start = 0
        self.size = 0

    def _resize(self, alloc: int) -> None:
        # Only called before the ring wraps (start == 0), so rows are in place.
        assert self.start == 0
        n = self.size
        for attr in ("steps", "seqs", "times", "values", "present"):
            old = getattr(self, attr)
            new = (
                np.full((alloc, *old.shape[1:]), np.nan)
                if attr == "values"
                else np.zeros((alloc, *old.shape[1:]), old.dtype)
            )
            new[:n] = old[:n]
            setattr(self, attr, new)

    def add_columns(self, n: int) -> None:
        pad = np.full((*self.values.shape[:-1], n), np.nan)
        self.values = np.concatenate([self.values, pad], axis=-1)

    def append(self, step: int, seq: int, when: float) -> int:
        """A fresh (all-NaN) row for this step; returns its physical index."""
        alloc = len(self.steps)
        if self.size == alloc and alloc < self.capacity:
            self._resize(min(self.capacity, alloc * 2))
            alloc = len(self.steps)
        if self.size < alloc:
            i = (self.start + self.size) % alloc
            self.size += 1
        else:
            i = self.start
            self.start = (self.start + 1) % alloc
        self.steps[i], self.seqs[i], self.times[i] = step, seq, when
        self.values[i] = np.nan
        self.present[i] = False
        return i

    def order(self) -> np.ndarray:
        """Physical indices of the rows, oldest first."""
        return (self.start + np.arange(self.size)) % len(self.steps)

    def truncate_from(self, step: int) -> None:
        """Drop the rows of ``step`` and later (rows are in step order)."""
        keep = int(np.count_nonzero(self.steps[self.order()] < step))
        self.size = keep

    def find(self, seq: int) -> int | None:
        idx = self.order()
        pos = int(np.searchsorted(self.seqs[idx], seq))
        if pos < len(idx) and self.seqs[idx[pos]] == seq:
            return int(idx[pos])
        return None


def _floats(row: np.ndarray, columns: Sequence[tuple[str, int]]) -> dict[str, float]:
    """Every known signal of a row (NaN where undefined, or not yet computed then)."""
    return {name: float(row[c]) for name, c in columns}


class History:
    """The retained signals of one stepper (thread-safe: one short lock per operation)."""

    def __init__(
        self,
        stepper: str,
        tensors: Sequence[str],
        config: HistoryConfig,
        store: HistoryStore | None = None,
        at_step: int | None = None,
    ) -> None:
        """``store``: where the whole run is kept (default: a database in memory); its rows
        past ``at_step`` (the stepper's step now) are dropped, the latest loaded."""
        self.stepper = stepper
        self.config = config
        self.names = list(tensors)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.lock = threading.Lock()
        self.store = store if store is not None else HistoryStore(None, self.names, config)
        self.columns: dict[str, int] = {n: i for i, n in enumerate(self.store.columns)}
        self.aggregate = _Ring(config.steps, (len(self.columns),))
        self.tensors: _Ring | None = None  # sized at the first row, when signals are known
        self.losses: OrderedDict[int, tuple[float, float]] = OrderedDict()  # step -> (t, loss)
        if at_step is not None:
            self.store.truncate_from(at_step + 1)
        self._load()

    def _load(self) -> None:
        """The latest stored rows into memory (seq 0: they are not this process's events)."""
        steps, times, values, _ = self.store.raw(AGGREGATE, self.config.steps)
        for k, step in enumerate(steps):
            i = self.aggregate.append(step, 0, times[k])  # may grow (replace) the arrays
            self.aggregate.values[i] = values[k, 0]
        if self.columns:
            cap = self._tensor_capacity(len(self.columns))
            steps, times, values, present = self.store.raw(TENSORS, cap)
            if steps:
                self.tensors = _Ring(cap, (len(self.names), len(self.columns)))
                for k, step in enumerate(steps):
                    j = self.tensors.append(step, 0, times[k])
                    self.tensors.values[j], self.tensors.present[j] = values[k], present[k]
        for step, when, loss in self.store.losses()[-self.config.steps :]:
            self.losses[step] = (when, loss)

    @property
    def tensor_capacity(self) -> int:
        if self.tensors is not None:
            return self.tensors.capacity
        return self._tensor_capacity(max(len(self.columns), 1))

    def _tensor_capacity(self, signals: int) -> int:
        cells = max(1, len(self.names) * signals)
        return max(1, min(self.config.steps, self.config.tensor_values // cells))

    def _column(self, name: str) -> int:
        c = self.columns.get(name)
        if c is None:
            c = self.columns[name] = len(self.columns)
            self.aggregate.add_columns(1)
            if self.tensors is not None:
                self.tensors.add_columns(1)
        return c

    def record(
        self,
        step: int,
        seq: int,
        when: float,
        aggregate: Mapping[str, float],
        tensors: Mapping[str, Mapping[str, float]],
    ) -> bool:
        """Add the row of ``step``; True if the stepper went back in time first (the rows
        from ``step`` on were dropped)."""
        with self.lock:
            rolled_back = False
            last = self._last_step()
            if last is not None and step <= last:
                self.aggregate.truncate_from(step)
                if self.tensors is not None:
                    self.tensors.truncate_from(step)
                for s in [s for s in self.losses if s >= step]:
                    del self.losses[s]
                self.store.truncate_from(step)
                rolled_back = True
            known = self.columns.keys()
            for values in itertools.chain((aggregate,), tensors.values()):
                if not known >= values.keys():  # a set comparison: no loop per cell
                    for name in values:
                        self._column(name)
            if self.tensors is None and tensors:
                self.tensors = _Ring(
                    self._tensor_capacity(len(self.columns)), (len(self.names), len(self.columns))
                )
            i = self.aggregate.append(step, seq, when)
            row = self.aggregate.values[i]
            for name, v in aggregate.items():
                row[self.columns[name]] = v
            block = present = None
            if self.tensors is not None:
                j = self.tensors.append(step, seq, when)
                block, present = self.tensors.values[j], self.tensors.present[j]
                self._fill(block, present, tensors)
            self.store.append(step, when, list(self.columns), row, block, present)
            return rolled_back

    def _fill(
        self, block: np.ndarray, present: np.ndarray, tensors: Mapping[str, Mapping[str, float]]
    ) -> None:
        """Write the per-tensor values into ``block``: tensors whose signals come in the
        same order are written as one array (700 tensors x 8 signals is 5,600 cells: one
        numpy write each would cost milliseconds)."""
        batches: dict[tuple[str, ...], tuple[list[int], list[tuple[float, ...]]]] = {}
        for tname, values in tensors.items():
            t = self.index.get(tname)
            if t is None:
                continue
            present[t] = True
            key = tuple(values)
            batch = batches.get(key)
            if batch is None:
                batch = batches[key] = ([], [])
            batch[0].append(t)
            batch[1].append(tuple(values.values()))
        for key, (rows, cells) in batches.items():
            if key:
                block[np.ix_(rows, [self.columns[n] for n in key])] = cells

    def _last_step(self) -> int | None:
        a = self.aggregate
        if not a.size:
            return None
        return int(a.steps[(a.start + a.size - 1) % len(a.steps)])

    def record_loss(self, step: int, loss: float, when: float) -> None:
        with self.lock:
            self.store.record_loss(step, loss, when)
            self.losses.pop(step, None)
            self.losses[step] = (when, loss)
            while len(self.losses) > self.config.steps:
                self.losses.popitem(last=False)

    def loss_at(self, step: int) -> float | None:
        with self.lock:
            hit = self.losses.get(step)
            return hit[1] if hit is not None else None

    def signal_names(self) -> list[str]:
        with self.lock:
            return list(self.columns)

    # ---------------------------------------------------------------- time series

    def _selected(self, signals: Iterable[str] | None) -> list[tuple[str, int]]:
        if signals is None:
            return list(self.columns.items())
        return [(s, self.columns[s]) for s in signals if s in self.columns]

    @staticmethod
    def _window(ring: _Ring, rows: np.ndarray, since: int | None, limit: int | None) -> np.ndarray:
        if since is not None:
            rows = rows[ring.steps[rows] > since]
        if limit is not None:
            rows = rows[len(rows) - min(limit, len(rows)) :]
        return rows

    def query(
        self,
        signals: Sequence[str] | None = None,
        tensors: Sequence[str] | None = None,
        since: int | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """Time series: the aggregate's, and those of ``tensors`` (names, or ``["*"]`` for
        all), of ``signals`` (default all), for steps after ``since``, the last ``limit``.
        Floats may be NaN/Inf (render with :func:`adamscope.service.api.http.reply.render_json`)."""
        with self.lock:
            cols = self._selected(signals)
            a = self.aggregate
            rows = self._window(a, a.order(), since, limit)
            out: dict[str, Any] = {
                "stepper": self.stepper,
                "capacity": a.capacity,
                "tensor_capacity": self.tensor_capacity,
                "signals": [s for s, _ in cols],
                "aggregate": {
                    "steps": a.steps[rows].tolist(),
                    "time": a.times[rows].tolist(),
                    "values": {s: a.values[rows, c].tolist() for s, c in cols},
                },
                "tensors": {},
            }
            wanted = self.names if tensors is not None and "*" in tensors else (tensors or [])
            tr = self.tensors
            for name in wanted:
                t = self.index[name]
                if tr is None:
                    out["tensors"][name] = {
                        "steps": [],
                        "time": [],
                        "values": {s: [] for s, _ in cols},
                    }
                    continue
                trows = tr.order()
                trows = self._window(tr, trows[tr.present[trows, t]], since, limit)
                out["tensors"][name] = {
                    "steps": tr.steps[trows].tolist(),
                    "time": tr.times[trows].tolist(),
                    "values": {s: tr.values[trows, t, c].tolist() for s, c in cols},
                }
            losses = [(s, v) for s, (_, v) in self.losses.items() if since is None or s > since]
            if limit is not None:
                losses = losses[len(losses) - min(limit, len(losses)) :]
            out["loss"] = {"steps": [s for s, _ in losses], "values": [v for _, v in losses]}
            return out

    def csv(
        self,
        signals: Sequence[str] | None = None,
        tensors: Sequence[str] | None = None,
        since: int | None = None,
        limit: int | None = None,
    ) -> str:
        """The same as :meth:`query`, as CSV: ``step,time,tensor,loss,<signal>...``, one row
        per step for the aggregate (``tensor`` empty) and one per step and tensor asked for;
        NaN/Inf written as ``nan``/``inf``, a missing value as an empty cell."""
        q = self.query(signals, tensors, since, limit)
        sigs = q["signals"]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["step", "time", "tensor", "loss", *sigs])

        def cell(v: float | None) -> str:
            return "" if v is None else repr(float(v))

        loss = dict(zip(q["loss"]["steps"], q["loss"]["values"], strict=True))
        rows: list[tuple[int, int, list[str]]] = []
        agg = q["aggregate"]
        steps_seen = set()
        for k, step in enumerate(agg["steps"]):
            steps_seen.add(step)
            rows.append(
                (
                    step,
                    -1,
                    [
                        str(step),
                        repr(agg["time"][k]),
                        "",
                        cell(loss.get(step)),
                        *(cell(agg["values"][s][k]) for s in sigs),
                    ],
                )
            )
        for step, v in loss.items():
            if step not in steps_seen:
                rows.append((step, -1, [str(step), "", "", cell(v), *("" for _ in sigs)]))
        for name, series in q["tensors"].items():
            order = self.index[name]
            for k, step in enumerate(series["steps"]):
                rows.append(
                    (
                        step,
                        order,
                        [
                            str(step),
                            repr(series["time"][k]),
                            name,
                            "",
                            *(cell(series["values"][s][k]) for s in sigs),
                        ],
                    )
                )
        rows.sort(key=lambda r: (r[0], r[1]))
        w.writerows(r[2] for r in rows)
        return buf.getvalue()

    def span(
        self,
        signals: Sequence[str] | None = None,
        tensors: Sequence[str] | None = None,
        first: int | None = None,
        last: int | None = None,
        max_points: int | None = None,
        *,
        as_csv: bool = False,
    ) -> Any:
        """The whole run (or steps ``first..last``) in at most ``max_points`` points per
        series, from the store's raw rows and tiers (:func:`.span.span`); CSV text with
        ``as_csv`` (:func:`.span.span_csv`)."""
        build = span_csv if as_csv else span
        return build(self, signals, tensors, first, last, max_points)

    # ---------------------------------------------------------------- step events

    def _event_at(
        self, i: int, max_tensors: int | None, only: Sequence[str] | None
    ) -> dict[str, Any]:
        a = self.aggregate
        cols = list(self.columns.items())
        step = int(a.steps[i])
        seq = int(a.seqs[i])
        event: dict[str, Any] = {
            "stepper": self.stepper,
            "step": step,
            "seq": seq,
            "time": float(a.times[i]),
            "aggregate": _floats(a.values[i], cols),
            "tensors": {},
        }
        tr = self.tensors
        j = tr.find(seq) if tr is not None else None
        if tr is not None and j is not None:
            names = [n for n in (only if only is not None else self.names) if n in self.index]
            shown = 0
            for name in names:
                t = self.index[name]
                if not tr.present[j, t]:
                    continue
                if max_tensors is not None and shown >= max_tensors:
                    event["tensors_omitted"] = event.get("tensors_omitted", 0) + 1
                    continue
                event["tensors"][name] = _floats(tr.values[j, t], cols)
                shown += 1
        elif tr is not None:
            event["tensors_retained"] = False  # older than the per-tensor history
        hit = self.losses.get(step)
        if hit is not None:
            event["loss"] = hit[1]
        return event

    def event(
        self, seq: int, max_tensors: int | None = None, only: Sequence[str] | None = None
    ) -> dict[str, Any] | None:
        """The step event with sequence number ``seq`` (None once it left the history)."""
        with self.lock:
            i = self.aggregate.find(seq)
            return None if i is None else self._event_at(i, max_tensors, only)

    def events(
        self,
        after_seq: int | None = None,
        last: int | None = None,
        max_tensors: int | None = None,
        only: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Retained step events with a sequence number above ``after_seq`` (all if None),
        at most the ``last`` ones, oldest first."""
        with self.lock:
            a = self.aggregate
            rows = a.order()
            if after_seq is not None:
                rows = rows[a.seqs[rows] > after_seq]
            if last is not None:
                rows = rows[len(rows) - min(last, len(rows)) :]
            return [self._event_at(int(i), max_tensors, only) for i in rows]

    def latest(self) -> dict[str, Any] | None:
        """The newest row: step and aggregate signals (for gauges)."""
        with self.lock:
            a = self.aggregate
            if not a.size:
                return None
            i = (a.start + a.size - 1) % len(a.steps)
            return {
                "step": int(a.steps[i]),
                "time": float(a.times[i]),
                "aggregate": _floats(a.values[i], list(self.columns.items())),
            }

    def latest_loss(self) -> tuple[int, float] | None:
        with self.lock:
            if not self.losses:
                return None
            step = next(reversed(self.losses))
            return step, self.losses[step][1]


def json_safe(value: Any) -> Any:
    """NaN/Inf floats as "NaN"/"Infinity"/"-Infinity", for renderers that refuse them."""
    if isinstance(value, float):
        return json_float(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value
