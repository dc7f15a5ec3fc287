"""The recorder: after every step, the step's signals into the history, its alerts, its
step metrics, and the news to whoever listens.

:class:`HistoryObserver` is a step observer that runs after the
:class:`~.signals.SignalObserver` (:func:`attach_history` attaches both, in that order).
After every step it copies the scalar signals that observer computed into the stepper's
:class:`~.history.History`, evaluates the stepper's alert rules on them, counts the step
and its latency, and tells a ``sink`` (the service's live event stream) that a step event
is ready. It never raises: a failure here must not fail a step that PyTorch has already
applied. Given a ``path``, the history is kept in that SQLite file for the whole run
(:mod:`.history_store`) and found there again when the service restarts, less any step
after the one the stepper was restored at; without one it lives in memory. If a stepper
goes back in time (a snapshot is restored), the rows from the step it returns to onwards
are dropped.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from adamscope.client.protocol import AlertRule

from .alerts import Alerts, RuleCache, attach_tops
from .histogram_store import FILE as HISTOGRAM_FILE
from .histogram_store import HistogramStore
from .history import LATENCY_BUCKETS, History, HistoryConfig, json_safe
from .history_store import HistoryStore
from .optimizer import ObservedOptimizer
from .signals import attach_signals, signals_of

__all__ = [
    "HistoryObserver",
    "Sink",
    "attach_history",
    "close_history",
    "open_histograms",
    "history_of",
    "open_store",
    "summary_fields",
]

log = logging.getLogger("adamscope.history")

#: ``sink(observer, seq)``: a step event is ready (called under the stepper's lock, in
#: whatever thread stepped; it must only hand the news on).
Sink = Callable[["HistoryObserver", int], None]

_sequence = itertools.count(1)


class HistoryObserver:
    """Records each step's signals, raises alerts, and counts steps and their latency."""

    def __init__(
        self,
        stepper: ObservedOptimizer,
        config: HistoryConfig | None = None,
        sink: Sink | None = None,
        sequence: Callable[[], int] | None = None,
        path: Path | None = None,
    ) -> None:
        self.config = config or HistoryConfig()
        self.name = stepper.name
        self.stepper = stepper
        store = open_store(path, stepper.names, self.config)
        try:
            self.history = History(
                stepper.name, stepper.names, self.config, store, at_step=stepper.step_count
            )
        except Exception:  # noqa: BLE001 - the stepper must load whatever its history holds
            log.exception("history of %r: %s could not be read; kept in memory", self.name, path)
            store.close()
            self.history = History(stepper.name, stepper.names, self.config)
        self.histograms = open_histograms(path, stepper.step_count)
        self.alerts = Alerts(self.config.alert_events)
        self._rules = RuleCache()
        self.sink = sink
        self.sequence = sequence or _sequence.__next__
        self.steps_total = 0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.failures = 0

    def before_step(self, stepper: ObservedOptimizer, grads: Mapping[str, torch.Tensor]) -> None:
        pass

    def after_step(self, stepper: ObservedOptimizer, grads: Mapping[str, torch.Tensor]) -> None:
        try:
            self._after_step(stepper)
        except Exception:  # noqa: BLE001 - the step is applied; never fail it from here
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                log.exception(
                    "history of %r: recording step failed (%d so far)", stepper.name, self.failures
                )

    def _after_step(self, stepper: ObservedOptimizer) -> None:
        elapsed = stepper.engine_seconds()
        step = stepper.observed_step
        found = signals_of(stepper)
        # The SignalObserver ran first; signals of another step mean it could not compute
        # this one's: the step is recorded without signals.
        signals: Mapping[str, Any] = found if found.get("step") == step else {}
        aggregate: Mapping[str, float] = signals.get("aggregate", {})
        tensors: Mapping[str, Mapping[str, float]] = signals.get("tensors", {})
        when = float(signals.get("time") or time.time())
        seq = self.sequence()
        h = self.history
        if h.record(step, seq, when, aggregate, tensors):
            self.alerts.reset()
            self.histograms.truncate(step - 1)  # the stepper went back in time
        if signals.get("histograms"):
            self.histograms.record(step, signals["histograms"])
        rules, _ = self.rules()
        with h.lock:  # the metrics and alert state are read under the same lock
            raised = self.alerts.evaluate(rules, stepper.name, step, seq, when, aggregate, tensors)
            attach_tops(raised, signals.get("local", {}).get("top", {}))
            self.steps_total += 1
            self.latency_sum += elapsed
            # Prometheus buckets count values <= their bound: the first bound >= elapsed
            self.latency_buckets[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        if self.sink is not None:
            self.sink(self, seq)

    # ---------------------------------------------------------------- reads

    def rules(self) -> tuple[list[AlertRule], bool]:
        """The stepper's alert rules and whether they are the defaults (parsed once per
        change of its journal; no lock: the journal entry is replaced whole)."""
        return self._rules.of(self.stepper.journal)

    def event(
        self, seq: int, max_tensors: int | None = None, only: Sequence[str] | None = None
    ) -> dict[str, Any] | None:
        """The step event ``seq`` with its alerts (None once it left the history)."""
        event = self.history.event(seq, max_tensors, only)
        if event is not None:
            with self.history.lock:
                event["alerts"] = self.alerts.at(seq)
        return event

    def events(
        self,
        after_seq: int | None = None,
        last: int | None = None,
        max_tensors: int | None = None,
        only: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        out = self.history.events(after_seq, last, max_tensors, only)
        with self.history.lock:
            for e in out:
                e["alerts"] = self.alerts.at(e["seq"])
        return out

    def alerts_brief(self) -> dict[str, Any]:
        with self.history.lock:
            return self.alerts.brief()

    def metrics(self) -> dict[str, Any]:
        """Step count and latency histogram (cumulative buckets), read consistently."""
        with self.history.lock:
            cumulative = list(itertools.accumulate(self.latency_buckets))
            return {
                "steps_total": self.steps_total,
                "latency_sum": self.latency_sum,
                "latency_cumulative": cumulative,  # per LATENCY_BUCKETS bound, then +Inf
                "alerts_total": self.alerts.count,
                "alerts_active": len(self.alerts.active),
            }


def open_store(path: Path | None, names: Sequence[str], config: HistoryConfig) -> HistoryStore:
    """The history database at ``path`` (in memory if None). One that cannot be opened is
    moved aside (``<name>.unreadable-<time>``) and a fresh one started; if that fails too,
    the history is kept in memory. Never raises: a stepper must not fail to load over it."""
    if path is None:
        return HistoryStore(None, names, config)
    try:
        return HistoryStore(path, names, config)
    except (sqlite3.Error, OSError) as e:
        log.error("history %s cannot be opened (%s); starting a new one", path, e)
    try:
        aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
        path.replace(aside)
        for suffix in ("-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        return HistoryStore(path, names, config)
    except (sqlite3.Error, OSError) as e:
        log.error("history %s: %s; keeping this stepper's history in memory", path, e)
        return HistoryStore(None, names, config)


def open_histograms(path: Path | None, at_step: int) -> HistogramStore:
    """The histograms' database beside the history's (in memory without one, or if it
    cannot be opened: never raises), without columns after ``at_step``."""
    if path is not None:
        try:
            return HistogramStore(path.with_name(HISTOGRAM_FILE), at_step)
        except (sqlite3.Error, OSError) as e:
            log.error("histograms beside %s cannot be kept (%s); kept in memory", path, e)
    return HistogramStore(None)


def close_history(stepper: ObservedOptimizer) -> None:
    """Close the stepper's history database (it is being deleted): its file is released
    now rather than whenever the stepper is garbage-collected."""
    found = history_of(stepper)
    if found is not None:
        found.history.store.close()
        found.histograms.close()


def summary_fields(stepper: ObservedOptimizer) -> dict[str, Any]:
    """What the history adds to a stepper's summary: ``{"alerts": {count, active,
    latest}}`` (JSON-safe), or nothing for a stepper without a history."""
    found = history_of(stepper)
    return {} if found is None else {"alerts": json_safe(found.alerts_brief())}


def history_of(stepper: ObservedOptimizer) -> HistoryObserver | None:
    """The stepper's HistoryObserver, if it has one."""
    for o in stepper.observers:
        if isinstance(o, HistoryObserver):
            return o
    return None


def attach_history(
    stepper: ObservedOptimizer,
    config: HistoryConfig | None = None,
    *,
    sink: Sink | None = None,
    sequence: Callable[[], int] | None = None,
    path: Path | None = None,
) -> HistoryObserver:
    """Give ``stepper`` its signals (S1's SignalObserver) and then a HistoryObserver, in
    that order, once: a second call returns the existing observer (with ``sink`` and
    ``sequence`` updated when given). ``path``: the history's database file (None: in
    memory)."""
    with stepper.lock:
        attach_signals(stepper)  # idempotent; first in the observer list
        found = history_of(stepper)
        if found is not None:
            if sink is not None:
                found.sink = sink
            if sequence is not None:
                found.sequence = sequence
            return found
        observer = HistoryObserver(stepper, config, sink, sequence, path)
        stepper.observers.append(observer)
        return observer
