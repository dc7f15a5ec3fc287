"""Histograms over time, kept: each recorded step's per-tensor histograms
(:mod:`.kernels.histogram`) in a small SQLite database beside the history
(``steppers/<name>/histograms.sqlite``; in memory for a stepper whose history is).

Bounded by halving: when more than :data:`MAX_STEPS` steps are kept, every second one of
them (the first and the latest kept) is dropped, for every tensor. Columns are recorded
every ``HISTOGRAM_EVERY`` steps, so a run of any length keeps between ``MAX_STEPS / 2``
and ``MAX_STEPS`` columns per tensor and quantity from its start, older ones further
apart (every 50, 100, 200... steps), at about 1 KiB per column. A stepper that goes back
in time (a snapshot restored, a restart after SIGKILL) drops the columns after its step.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .kernels.histogram import EXTRA

__all__ = ["FILE", "MAX_STEPS", "HistogramStore"]

#: The database's name, beside the history's.
FILE = "histograms.sqlite"
#: Most recorded steps kept (per tensor and quantity: one column each).
MAX_STEPS = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS columns (
    tensor TEXT NOT NULL, key TEXT NOT NULL, step INTEGER NOT NULL,
    rank_error REAL NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (tensor, key, step)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS steps (step INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class HistogramStore:
    """One stepper's histograms over time (thread-safe: one lock per operation)."""

    def __init__(self, path: Path | None, at_step: int | None = None) -> None:
        if path is not None and not path.exists():  # the service's user only, as every file
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600))
        self.db = sqlite3.connect(
            ":memory:" if path is None else str(path), check_same_thread=False, isolation_level=None
        )
        if path is not None:
            self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self.lock = threading.Lock()
        if at_step is not None:
            self.truncate(at_step)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def truncate(self, step: int) -> None:
        """Forget the columns after ``step`` (the stepper is back there)."""
        with self.lock, self.db:
            self.db.execute("DELETE FROM columns WHERE step > ?", (step,))
            self.db.execute("DELETE FROM steps WHERE step > ?", (step,))

    def record(self, step: int, found: Mapping[str, Any]) -> None:
        """Keep one step's histograms (:func:`.kernels.histogram.histograms`' result)."""
        rows = [
            (name, key, step, found["rank_error"][name], json.dumps(h))
            for name, per_key in found["tensors"].items()
            for key, h in per_key.items()
        ]
        with self.lock, self.db:
            self.db.execute("DELETE FROM columns WHERE step >= ?", (step,))
            self.db.execute("DELETE FROM steps WHERE step >= ?", (step,))
            self.db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('edges', ?)", (json.dumps(found["edges"]),)
            )
            self.db.executemany("INSERT INTO columns VALUES (?, ?, ?, ?, ?)", rows)
            self.db.execute("INSERT INTO steps VALUES (?)", (step,))
            kept = [s for (s,) in self.db.execute("SELECT step FROM steps ORDER BY step")]
            if len(kept) > MAX_STEPS:
                drop = [(s,) for s in kept[1:-1:2]]
                self.db.executemany("DELETE FROM columns WHERE step = ?", drop)
                self.db.executemany("DELETE FROM steps WHERE step = ?", drop)

    def steps(self) -> list[int]:
        with self.lock:
            return [s for (s,) in self.db.execute("SELECT step FROM steps ORDER BY step")]

    def span(
        self, tensor: str, key: str, first: int, last: int, max_columns: int
    ) -> dict[str, Any]:
        """The columns of ``tensor``'s ``key`` at steps ``first..last``, at most
        ``max_columns`` of them (evenly picked, the latest always)."""
        with self.lock:
            found = self.db.execute(
                "SELECT step, rank_error, data FROM columns WHERE tensor = ? AND key = ? "
                "AND step BETWEEN ? AND ? ORDER BY step",
                (tensor, key, first, last),
            ).fetchall()
            edges = self.db.execute("SELECT value FROM meta WHERE name = 'edges'").fetchone()
        if len(found) > max_columns:
            n = len(found)
            found = (
                [
                    found[(n - 1) - ((max_columns - 1 - i) * (n - 1)) // (max_columns - 1)]
                    for i in range(max_columns)
                ]
                if max_columns > 1
                else [found[-1]]
            )
        data = [json.loads(d) for _, _, d in found]
        return {
            "edges": json.loads(edges[0]) if edges else [],
            "steps": [s for s, _, _ in found],
            "rank_error": [r for _, r, _ in found],
            "counts": [d["counts"] for d in data],
            **{x: [d[x] for d in data] for x in EXTRA},
        }
