"""Downsampling arithmetic for the durable history: summaries of consecutive steps.

A :class:`Summary` is what a time-series store keeps per bucket of steps: for each of ``T``
rows (the aggregate is one row, per-tensor signals one row per tensor) and each of ``C``
signals, the minimum, maximum, sum and count of the values that were not NaN, and the last
value; plus how many steps each row took part in. Summaries merge exactly (min of mins,
sum of sums, ...), so a bucket of 1,000 steps built from ten buckets of 100 holds what it
would hold if built from the 1,000 steps, and a mean is always ``sum / count`` over the
steps themselves. Infinite values take part (a bucket with +inf has max and mean +inf).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LAST",
    "MAX",
    "MIN",
    "N",
    "STATS",
    "SUM",
    "Summary",
    "group",
    "mean",
    "merge",
    "of_rows",
    "summarize",
    "widen",
]

#: Rows of a summary's ``stats``: per signal min, max, sum, count (non-NaN values), last.
MIN, MAX, SUM, N, LAST = range(5)
STATS = 5


@dataclass
class Summary:
    """Steps ``lo`` to ``hi`` (the first and last seen), summarized."""

    lo: int
    hi: int
    time: float  # of the last step
    rows: np.ndarray  # (T,) steps each row took part in
    stats: np.ndarray  # (STATS, T, C)

    def encode(self) -> bytes:
        return self.rows.astype(np.float64).tobytes() + self.stats.astype(np.float64).tobytes()

    @classmethod
    def decode(
        cls, lo: int, hi: int, time: float, blob: bytes, t: int, stored: int, columns: int
    ) -> Summary:
        """The summary a row of ``stored`` signals encoded, widened to ``columns``."""
        flat = np.frombuffer(blob, np.float64)
        rows = flat[:t].copy()
        stats = flat[t:].reshape(STATS, t, stored)
        return cls(lo, hi, time, rows, widen(stats, columns))


def widen(stats: np.ndarray, columns: int) -> np.ndarray:
    """``stats`` with NaN (count 0) for the signals that appeared after it was written."""
    have = stats.shape[-1]
    if have >= columns:
        return stats[..., :columns].copy()
    out = np.full((*stats.shape[:-1], columns), np.nan)
    out[..., :have] = stats
    out[SUM, ..., have:] = 0.0
    out[N, ..., have:] = 0.0
    return out


def of_rows(values: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-step summaries of raw rows: ``values`` (S, T, C), ``present`` (S, T) ->
    ``rows`` (S, T) and ``stats`` (S, STATS, T, C)."""
    seen = ~np.isnan(values) & present[..., None]
    stats = np.empty((values.shape[0], STATS, *values.shape[1:]))
    stats[:, MIN] = np.where(seen, values, np.nan)
    stats[:, MAX] = stats[:, MIN]
    stats[:, SUM] = np.where(seen, values, 0.0)
    stats[:, N] = seen
    stats[:, LAST] = np.where(present[..., None], values, np.nan)
    return present.astype(np.float64), stats


def summarize(values: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One summary of raw rows ``values`` (S, T, C), ``present`` (S, T), oldest first:
    ``rows`` (T,) and ``stats`` (STATS, T, C)."""
    seen = ~np.isnan(values) & present[..., None]
    masked = np.where(seen, values, np.nan)
    stats = np.empty((STATS, *values.shape[1:]))
    with np.errstate(invalid="ignore"):
        stats[MIN] = np.fmin.reduce(masked, axis=0)
        stats[MAX] = np.fmax.reduce(masked, axis=0)
    stats[SUM] = np.where(seen, values, 0.0).sum(axis=0)
    stats[N] = seen.sum(axis=0)
    latest = len(present) - 1 - np.argmax(present[::-1], axis=0)  # (T,)
    t = np.arange(present.shape[1])
    stepped: np.ndarray = np.any(present, axis=0)
    stats[LAST] = np.where(stepped[:, None], values[latest, t], np.nan)
    return present.sum(axis=0).astype(np.float64), stats


def group(rows: np.ndarray, stats: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge consecutive summaries (``rows`` (P, T), ``stats`` (P, STATS, T, C)) into the
    groups that begin at the indices ``starts`` (increasing, the first 0)."""
    out = np.empty((len(starts), *stats.shape[1:]))
    with np.errstate(invalid="ignore"):
        out[:, MIN] = np.fmin.reduceat(stats[:, MIN], starts, axis=0)
        out[:, MAX] = np.fmax.reduceat(stats[:, MAX], starts, axis=0)
    out[:, SUM] = np.add.reduceat(stats[:, SUM], starts, axis=0)
    out[:, N] = np.add.reduceat(stats[:, N], starts, axis=0)
    merged_rows = np.add.reduceat(rows, starts, axis=0)
    # last: the value of the latest summary in the group in which the row took part
    index = np.where(rows > 0, np.arange(len(rows))[:, None], -1)
    latest = np.maximum.reduceat(index, starts, axis=0)  # (G, T)
    t = np.arange(rows.shape[1])
    last = stats[np.maximum(latest, 0), LAST, t[None, :], :]  # (G, T, C)
    out[:, LAST] = np.where((latest >= 0)[..., None], last, np.nan)
    return merged_rows, out


def merge(parts: Sequence[Summary]) -> Summary:
    """One summary of consecutive ``parts`` (oldest first)."""
    rows, stats = group(
        np.stack([p.rows for p in parts]), np.stack([p.stats for p in parts]), np.array([0])
    )
    return Summary(parts[0].lo, parts[-1].hi, parts[-1].time, rows[0], stats[0])


def mean(stats: np.ndarray) -> np.ndarray:
    """``sum / count`` per signal (NaN where nothing was counted)."""
    n = stats[..., N, :, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, stats[..., SUM, :, :] / np.where(n > 0, n, 1), np.nan)
