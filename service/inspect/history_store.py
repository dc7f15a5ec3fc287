"""The whole run's history of one stepper in SQLite: recent steps raw, older ones in tiers.

:class:`HistoryStore` holds two series, the aggregate (one row of signals a step) and the
per-tensor signals (one row per tensor a step), each as a cascade: the latest steps raw,
then tiers of buckets of ``tier_widths`` steps (default 10, 100, 1,000, 10,000), each bucket
a :class:`~.tiers.Summary` (min, max, sum, count and last of every signal). When a level
holds more than its cap, its oldest complete group of rows is folded into one row of the
next tier, in the same transaction that writes the step (at most one fold per level and
step: compaction is amortized, a fold reads at most ``width ratio`` rows). The last tier
never drops anything: over its cap, it merges the two adjacent buckets that span the fewest
steps (the older pair on a tie), so it always reaches back to step 1 with buckets of about
equal width. The training losses are folded into the aggregate buckets alongside (a loss
reported for a step already folded is not kept).

Bound on size (rows are never more than, each level one more while a step is written):
aggregate ``steps + L x max(tier_buckets, ratio)``; per tensor ``raw + L x max(cap,
ratio)`` where ``raw = min(steps, tensor_values // (T x C))`` and ``cap = min(tier_buckets,
tier_tensor_values // (T x C))`` (T tensors; C signals, for the tensors only those tensors
have: the aggregate's own take no room in their rows; L tiers; ratio the largest width
ratio between consecutive levels, the first level's being its width). In bytes that
is about ``8 (C + 1) steps + 40 C L tier_buckets`` for the aggregate and ``8 tensor_values +
40 L tier_tensor_values`` for the tensors (a bucket cell holds 5 float64), plus SQLite's
page overhead and a WAL truncated to 8 MiB; whatever the number of steps. A cap that
shrinks (new signals appear, so C grows) is met again within a few steps.

Durability: WAL mode with ``synchronous=NORMAL``; every step is its own transaction,
committed when it is written, so a row survives the process being killed (SIGKILL) once its
step is recorded; a power loss may lose the transactions since SQLite's last WAL checkpoint.
With ``path=None`` the database is in memory (same tiers, nothing survives the process).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .tiers import LAST, STATS, SUM, N, Summary, group, merge, of_rows, summarize

__all__ = ["AGGREGATE", "TENSORS", "HistoryConfig", "HistoryStore", "Points"]

log = logging.getLogger("adamscope.history")

AGGREGATE, TENSORS = 0, 1
FORMAT = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS columns(idx INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS points(
    kind INTEGER NOT NULL, tier INTEGER NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL,
    time REAL NOT NULL, ncols INTEGER NOT NULL, data BLOB NOT NULL, present BLOB, loss BLOB,
    cols BLOB, UNIQUE(kind, tier, lo));
CREATE TABLE IF NOT EXISTS losses(step INTEGER PRIMARY KEY, time REAL NOT NULL, value REAL);
"""


@dataclass(frozen=True)
class HistoryConfig:
    #: Steps of aggregate signals (and losses) kept raw per stepper (and in memory).
    steps: int = 10_000
    #: Cells (tensor x signal x step) of raw per-tensor signals kept per stepper.
    tensor_values: int = 2_000_000
    #: Alert events kept per stepper.
    alert_events: int = 1_000
    #: Steps per bucket of each tier, increasing, each a multiple of the one before.
    tier_widths: tuple[int, ...] = (10, 100, 1_000, 10_000)
    #: Buckets of aggregate signals per tier.
    tier_buckets: int = 1_000
    #: Cells (tensor x signal x bucket) of per-tensor buckets per tier.
    tier_tensor_values: int = 200_000

    def __post_init__(self) -> None:
        w = self.tier_widths
        if not w or w[0] < 2 or any(b <= a or b % a for a, b in zip(w, w[1:], strict=False)):
            raise ValueError(f"tier widths must increase, each a multiple of the one before: {w}")


@dataclass
class Points:
    """Consecutive summaries, oldest first: ``rows`` (P, T), ``stats`` (P, STATS, T, C)."""

    lo: np.ndarray
    hi: np.ndarray
    time: np.ndarray
    rows: np.ndarray
    stats: np.ndarray


def _cols_blob(keep: np.ndarray) -> bytes | None:
    """Which signals a row holds, when not all of them (None)."""
    return None if keep.all() else np.flatnonzero(keep).astype(np.int32).tobytes()


def _columns_of(ncols: int, held: bytes | None) -> np.ndarray:
    """The signals a row holds: all ``ncols`` of its time, or those listed."""
    if held is None:
        return np.arange(ncols)
    return np.frombuffer(held, np.int32).astype(np.intp)


def _connect(path: Path | None) -> sqlite3.Connection:
    db = sqlite3.connect(
        ":memory:" if path is None else str(path), check_same_thread=False, isolation_level=None
    )
    if path is not None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA journal_size_limit=8388608")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)
    return db


class HistoryStore:
    """One stepper's history database (thread-safe: one lock per operation)."""

    def __init__(self, path: Path | None, tensors: Sequence[str], config: HistoryConfig) -> None:
        self.path = path
        self.config = config
        self.t = len(tensors)
        self.lock = threading.Lock()
        self.db = _connect(path)
        self.closed = False
        self._check_format(list(tensors))
        self.columns = [n for (n,) in self.db.execute("SELECT name FROM columns ORDER BY idx")]
        levels = len(config.tier_widths) + 1
        self.index: list[list[list[tuple[int, int]]]] = [
            [[] for _ in range(levels)] for _ in (AGGREGATE, TENSORS)
        ]
        for kind, tier, lo, hi in self.db.execute(
            "SELECT kind, tier, lo, hi FROM points ORDER BY kind, tier, lo"
        ):
            if tier < levels:
                self.index[kind][tier].append((lo, hi))
        #: Signals the per-tensor rows hold (the others are the aggregate's alone).
        self.tensor_columns: set[int] = set()
        latest = self.db.execute(
            "SELECT ncols, cols FROM points WHERE kind=1 ORDER BY lo DESC LIMIT 1"
        ).fetchone()
        if latest is not None:
            self.tensor_columns = set(_columns_of(latest[0], latest[1]).tolist())

    def _check_format(self, tensors: list[str]) -> None:
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        want = {"format": FORMAT, "tensors": json.dumps(tensors)}
        if meta == want:
            return
        if meta:
            log.warning("history %s is of another format or stepper; starting afresh", self.path)
        self.db.executescript(
            "BEGIN; DELETE FROM meta; DELETE FROM columns; DELETE FROM points; "
            "DELETE FROM losses; COMMIT;"
        )
        self.db.executemany("INSERT INTO meta VALUES (?, ?)", want.items())

    def close(self) -> None:
        """Close the database; later writes are ignored (a deleted stepper's last deferred
        step may still arrive)."""
        with self.lock:
            self.closed = True
            self.db.close()

    # ------------------------------------------------------------------ writes

    def append(
        self,
        step: int,
        when: float,
        columns: Sequence[str],
        aggregate: np.ndarray,
        tensors: np.ndarray | None,
        present: np.ndarray | None,
    ) -> None:
        """Write a step: ``aggregate`` (C,) and, if it has per-tensor rows, ``tensors``
        (T, C) with ``present`` (T,) saying which tensors stepped; then compact."""
        c = len(columns)
        with self.lock:
            if self.closed:
                return
            self.db.execute("BEGIN")
            try:
                if len(columns) > len(self.columns):
                    new = list(columns[len(self.columns) :])
                    self.db.executemany(
                        "INSERT INTO columns VALUES (?, ?)",
                        [(len(self.columns) + i, n) for i, n in enumerate(new)],
                    )
                    self.columns.extend(new)
                rows: list[tuple[Any, ...]] = [
                    (
                        AGGREGATE,
                        step,
                        when,
                        c,
                        np.ascontiguousarray(aggregate, np.float64).tobytes(),
                        None,
                        None,
                    )
                ]
                if tensors is not None and present is not None:
                    # signals no tensor has this step (the aggregate's own) take no room
                    keep = ~np.isnan(tensors).all(axis=0)
                    self.tensor_columns.update(np.flatnonzero(keep).tolist())
                    blob = np.ascontiguousarray(tensors[:, keep], np.float64).tobytes()
                    mask = present.astype(np.uint8).tobytes()
                    rows.append((TENSORS, step, when, c, blob, mask, _cols_blob(keep)))
                self.db.executemany(
                    "INSERT OR REPLACE INTO points(kind, tier, lo, hi, time, ncols, data, present, "
                    "cols) VALUES (?, 0, ?, ?2, ?, ?, ?, ?, ?)",
                    rows,
                )
                for kind, *_ in rows:
                    raw = self.index[kind][0]
                    if raw and raw[-1][0] >= step:  # a replayed step replaces its row
                        raw[:] = [r for r in raw if r[0] < step]
                    raw.append((step, step))
                for kind, *_ in rows:
                    self._compact(kind)
            except BaseException:
                self.db.execute("ROLLBACK")
                self._reindex()
                raise
            self.db.execute("COMMIT")

    def record_loss(self, step: int, loss: float, when: float) -> None:
        with self.lock:
            if self.closed:
                return
            self.db.execute("INSERT OR REPLACE INTO losses VALUES (?, ?, ?)", (step, when, loss))

    def truncate_from(self, step: int) -> None:
        """Forget ``step`` and later: raw rows, losses, and every bucket reaching it (a bucket
        that also holds earlier steps goes too: history never shows a step the stepper no
        longer has)."""
        with self.lock:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM points WHERE hi >= ?", (step,))
            self.db.execute("DELETE FROM losses WHERE step >= ?", (step,))
            self.db.execute("COMMIT")
            for kind in self.index:
                for level in kind:
                    level[:] = [r for r in level if r[1] < step]

    def _reindex(self) -> None:
        for kind in self.index:
            for level in kind:
                level.clear()
        for kind, tier, lo, hi in self.db.execute("SELECT kind, tier, lo, hi FROM points"):
            if tier < len(self.index[kind]):
                self.index[kind][tier].append((lo, hi))
        for kind in self.index:
            for level in kind:
                level.sort()

    # ------------------------------------------------------------------ compaction

    def caps(self, kind: int) -> list[int]:
        """Most rows per level of ``kind``: raw, then each tier."""
        cfg = self.config
        tiers = len(cfg.tier_widths)
        if kind == AGGREGATE:
            return [cfg.steps] + [cfg.tier_buckets] * tiers
        cells = max(1, self.t * len(self.tensor_columns))
        raw = max(1, min(cfg.steps, cfg.tensor_values // cells))
        return [raw] + [max(1, min(cfg.tier_buckets, cfg.tier_tensor_values // cells))] * tiers

    def _compact(self, kind: int) -> None:
        caps = self.caps(kind)
        widths = self.config.tier_widths
        for tier, width in enumerate(widths):
            self._fold(kind, tier, caps[tier], width)
        self._merge_last(kind, caps[-1])

    def _fold(self, kind: int, tier: int, cap: int, width: int) -> None:
        level = self.index[kind][tier]
        if len(level) <= cap:
            return
        key = (level[0][0] - 1) // width
        n = 1
        while n < len(level) and (level[n][0] - 1) // width == key:
            n += 1
        if n == len(level):
            return  # the oldest group is still filling
        lo, hi = level[0][0], level[n - 1][1]
        summary = self._read(kind, tier, lo, level[n - 1][0])
        loss = self._loss_summary(kind, tier, lo, hi)
        self.db.execute(
            "DELETE FROM points WHERE kind=? AND tier=? AND lo BETWEEN ? AND ?",
            (kind, tier, lo, level[n - 1][0]),
        )
        if kind == AGGREGATE and tier == 0:
            self.db.execute("DELETE FROM losses WHERE step <= ?", (hi,))
        self._insert(kind, tier + 1, summary, loss)
        del level[:n]
        self.index[kind][tier + 1].append((summary.lo, summary.hi))

    def _merge_last(self, kind: int, cap: int) -> None:
        level = self.index[kind][-1]
        if len(level) <= max(cap, 1):
            return
        spans = [level[i + 1][1] - level[i][0] for i in range(len(level) - 1)]
        i = int(np.argmin(spans))
        tier = len(self.index[kind]) - 1
        (lo, _), (lo2, hi) = level[i], level[i + 1]
        summary = self._read(kind, tier, lo, lo2)
        loss = self._loss_summary(kind, tier, lo, hi)
        self.db.execute(
            "DELETE FROM points WHERE kind=? AND tier=? AND lo IN (?, ?)", (kind, tier, lo, lo2)
        )
        self._insert(kind, tier, summary, loss)
        level[i : i + 2] = [(summary.lo, summary.hi)]

    def _insert(self, kind: int, tier: int, s: Summary, loss: Summary | None) -> None:
        keep = np.ones(s.stats.shape[-1], bool)
        if kind == TENSORS:  # signals no tensor had in these steps take no room
            keep = (s.stats[N] > 0).any(axis=0) | ~np.isnan(s.stats[LAST]).all(axis=0)
        data = (
            s.rows.astype(np.float64).tobytes()
            + np.ascontiguousarray(s.stats[:, :, keep], np.float64).tobytes()
        )
        self.db.execute(
            "INSERT OR REPLACE INTO points(kind, tier, lo, hi, time, ncols, data, loss, cols) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                kind,
                tier,
                s.lo,
                s.hi,
                s.time,
                s.stats.shape[-1],
                data,
                None if loss is None else loss.encode(),
                _cols_blob(keep),
            ),
        )

    def _loss_summary(self, kind: int, tier: int, lo: int, hi: int) -> Summary | None:
        """The losses of steps ``lo`` to ``hi``, summarized (aggregate buckets only)."""
        if kind != AGGREGATE:
            return None
        if tier == 0:
            found = self.db.execute(
                "SELECT step, time, value FROM losses WHERE step BETWEEN ? AND ? ORDER BY step",
                (lo, hi),
            ).fetchall()
            if not found:
                return None
            values = np.array([[[v]] for _, _, v in found], np.float64)
            rows, stats = of_rows(values, np.ones((len(found), 1), bool))
            merged_rows, merged = group(rows, stats, np.array([0]))
            return Summary(found[0][0], found[-1][0], found[-1][1], merged_rows[0], merged[0])
        parts = [
            Summary.decode(a, b, t, blob, 1, 1, 1)
            for a, b, t, blob in self.db.execute(
                "SELECT lo, hi, time, loss FROM points WHERE kind=0 AND tier=? AND lo BETWEEN ? "
                "AND ? AND loss IS NOT NULL ORDER BY lo",
                (tier, lo, hi),
            )
        ]
        return merge(parts) if parts else None

    # ------------------------------------------------------------------ reads

    def _t(self, kind: int) -> int:
        return 1 if kind == AGGREGATE else self.t

    def _read(self, kind: int, tier: int, lo: int, last_lo: int) -> Summary:
        """The rows of one level with ``lo`` in ``[lo, last_lo]``, merged into one."""
        if tier == 0:  # raw rows: summarized in one pass, without a summary per row
            steps, times, values, present = self._raw_rows(
                "kind=? AND tier=0 AND lo BETWEEN ? AND ? ORDER BY lo", (kind, lo, last_lo), kind
            )
            rows_seen, stats = summarize(values, present)
            return Summary(steps[0], steps[-1], times[-1], rows_seen, stats)
        p = self._points(kind, tier, lo, last_lo, by="lo")
        rows, stats = group(p.rows, p.stats, np.zeros(1, np.intp))
        return Summary(int(p.lo[0]), int(p.hi[-1]), float(p.time[-1]), rows[0], stats[0])

    def _points(
        self,
        kind: int,
        tier: int | None,
        first: int,
        last: int,
        by: str = "hi",
        select: Sequence[int] | None = None,
    ) -> Points:
        """Rows as summaries, of the tensors ``select`` (all if None); rows written with the
        same number of signals are decoded as one array."""
        t, c = self._t(kind), len(self.columns)
        where = "lo BETWEEN ? AND ?" if by == "lo" else "hi >= ? AND lo <= ?"
        level = "" if tier is None else f" AND tier={int(tier)}"
        found = self.db.execute(
            "SELECT tier, lo, hi, time, ncols, data, present, cols FROM points "
            f"WHERE kind=?{level} AND {where} ORDER BY lo",
            (kind, first, last),
        ).fetchall()
        pick = np.arange(t) if select is None else np.asarray(select, np.intp)
        rows = np.zeros((len(found), len(pick)))
        stats = np.empty((len(found), 5, len(pick), c))
        batches: dict[tuple[bool, int, bytes | None], list[int]] = {}
        for i, f in enumerate(found):
            batches.setdefault((f[0] == 0, f[4], f[7]), []).append(i)
        for (raw, ncols, held), idx in batches.items():
            flat = np.frombuffer(b"".join(found[i][5] for i in idx), np.float64)
            cols = _columns_of(ncols, held)
            k = len(cols)
            if raw:
                values = np.full((len(idx), len(pick), c), np.nan)
                values[..., cols] = flat.reshape(len(idx), t, k)[:, pick, :]
                present = np.ones((len(idx), t), bool)
                for j, i in enumerate(idx):
                    if found[i][6] is not None:
                        present[j] = np.frombuffer(found[i][6], np.uint8) > 0
                rows[idx], stats[idx] = of_rows(values, present[:, pick])
                continue
            block = flat.reshape(len(idx), t + STATS * t * k)
            rows[idx] = block[:, :t][:, pick]
            part = np.full((len(idx), STATS, len(pick), c), np.nan)
            part[:, SUM] = 0.0
            part[:, N] = 0.0
            part[..., cols] = block[:, t:].reshape(len(idx), STATS, t, k)[:, :, pick, :]
            stats[idx] = part
        return Points(
            np.array([f[1] for f in found], np.int64),
            np.array([f[2] for f in found], np.int64),
            np.array([f[3] for f in found], np.float64),
            rows,
            stats,
        )

    def span(self, kind: int, first: int, last: int, select: Sequence[int] | None = None) -> Points:
        """Every row of ``kind`` (raw or bucket) that reaches into steps ``first..last``, of
        the tensors ``select`` (indices; all if None)."""
        with self.lock:
            return self._points(kind, None, first, last, select=select)

    def loss_span(self, first: int, last: int) -> Points:
        """The losses of steps ``first..last``: folded ones by bucket, then raw ones."""
        with self.lock:
            found = self.db.execute(
                "SELECT lo, hi, time, loss FROM points WHERE kind=0 AND tier>0 AND "
                "loss IS NOT NULL AND hi >= ? AND lo <= ? ORDER BY lo",
                (first, last),
            ).fetchall()
            raw = self.db.execute(
                "SELECT step, time, value FROM losses WHERE step BETWEEN ? AND ? ORDER BY step",
                (first, last),
            ).fetchall()
        parts = [Summary.decode(a, b, t, blob, 1, 1, 1) for a, b, t, blob in found]
        values = np.array([[[v]] for _, _, v in raw], np.float64).reshape(len(raw), 1, 1)
        r, s = of_rows(values, np.ones((len(raw), 1), bool))
        return Points(
            np.array([p.lo for p in parts] + [x[0] for x in raw], np.int64),
            np.array([p.hi for p in parts] + [x[0] for x in raw], np.int64),
            np.array([p.time for p in parts] + [x[1] for x in raw], np.float64),
            np.concatenate([np.array([p.rows for p in parts]).reshape(-1, 1), r]),
            np.concatenate([np.array([p.stats for p in parts]).reshape(-1, 5, 1, 1), s]),
        )

    def raw(self, kind: int, last: int) -> tuple[list[int], list[float], np.ndarray, np.ndarray]:
        """The latest ``last`` raw rows of ``kind``: steps, times, values (N, T, C) and
        present (N, T) (to fill the in-memory window again at start)."""
        with self.lock:
            return self._raw_rows(
                "kind=? AND tier=0 AND lo > (SELECT coalesce(max(lo), 0) FROM points WHERE "
                "kind=?1 AND tier=0) - ? ORDER BY lo",
                (kind, last),
                kind,
            )

    def _raw_rows(
        self, where: str, args: tuple[int, ...], kind: int
    ) -> tuple[list[int], list[float], np.ndarray, np.ndarray]:
        found = self.db.execute(
            f"SELECT lo, time, ncols, data, present, cols FROM points WHERE {where}", args
        ).fetchall()
        t, c = self._t(kind), len(self.columns)
        values = np.full((len(found), t, c), np.nan)
        present = np.ones((len(found), t), bool)
        for i, (_, _, ncols, data, p, held) in enumerate(found):
            cols = _columns_of(ncols, held)
            values[i][:, cols] = np.frombuffer(data, np.float64).reshape(t, len(cols))
            if p is not None:
                present[i] = np.frombuffer(p, np.uint8) > 0
        return [f[0] for f in found], [f[1] for f in found], values, present

    def losses(self) -> list[tuple[int, float, float]]:
        """The raw losses: (step, time, loss), by step."""
        with self.lock:
            return self.db.execute("SELECT step, time, value FROM losses ORDER BY step").fetchall()

    def counts(self) -> dict[tuple[int, int], int]:
        """Rows per (kind, level): level 0 raw, then the tiers."""
        with self.lock:
            return {
                (k, t): len(level)
                for k, kind in enumerate(self.index)
                for t, level in enumerate(kind)
            }

    def first_step(self) -> int | None:
        with self.lock:
            (lo,) = self.db.execute("SELECT min(lo) FROM points WHERE kind=0").fetchone()
            return None if lo is None else int(lo)
