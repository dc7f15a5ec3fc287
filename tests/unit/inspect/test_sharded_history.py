"""A sharded stepper's whole-run history (the Ray ingress merges each shard's reply,
adamscope.service.distributed.merge.history): its points keep their extents, counts and
extremes, combined from two real histories by each signal's rule, and say what a merged
bucket is."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from adamscope.service.distributed.merge import BUCKETS_NOTE, history
from adamscope.service.distributed.records import Shard, ShardedRecord
from adamscope.service.inspect.history import History
from adamscope.service.inspect.history_store import HistoryConfig, HistoryStore
from adamscope.service.inspect.span import span

RECORD = ShardedRecord(
    name="net",
    params=["w", "b"],
    shapes={"w": [3, 4], "b": [4]},
    dtypes={"w": "float32", "b": "float32"},
    shards=[Shard(slot=0, params=["w"]), Shard(slot=1, params=["b"])],
)


def grad_norm(tensor: str, step: int) -> float:
    return (1.0 + step % 7) * (2.0 if tensor == "w" else 0.5)


def count(tensor: str, step: int) -> float:
    return float(step % 3 == 0) * (1 if tensor == "w" else 2)


def shard_history(tmp_path: Path, tensor: str, steps: int) -> History:
    """Shard ``tensor``'s history, on disk as the service keeps it, 20 raw steps and
    buckets of 10 before them, with ``steps`` steps recorded."""
    config = HistoryConfig(steps=20, tier_widths=(10, 100))
    store = HistoryStore(tmp_path / f"{tensor}.sqlite", [tensor], config)
    h = History("net", [tensor], config, store)
    for st in range(1, steps + 1):
        values = {"grad_norm": grad_norm(tensor, st), "nan_count": count(tensor, st)}
        h.record(st, st, float(st), values, {tensor: values})
    return h


def test_whole_run_points_keep_counts_and_extremes(tmp_path: Path) -> None:
    parts = []
    for tensor in ("w", "b"):
        h = shard_history(tmp_path, tensor, 100)
        parts.append(span(h, None, None, None, None, None))
    merged = history(RECORD, [0, 1], parts)["aggregate"]
    steps, counts, firsts = merged["steps"], merged["counts"], merged["first_steps"]
    assert steps[-1] == 100 and len(steps) == len(counts) == len(firsts)
    assert sum(counts) == 100  # every step, once
    for k, (lo, hi, n) in enumerate(zip(firsts, steps, counts, strict=True)):
        assert n == hi - lo + 1
        span_steps = range(lo, hi + 1)
        truth = [math.hypot(grad_norm("w", s), grad_norm("b", s)) for s in span_steps]
        nans = [count("w", s) + count("b", s) for s in span_steps]
        if n == 1:  # a raw step: exact, its min and max its value
            assert merged["values"]["grad_norm"][k] == pytest.approx(truth[0], rel=1e-6)
            assert merged["min"]["grad_norm"][k] == merged["max"]["grad_norm"][k]
            assert merged["min"]["grad_norm"][k] == pytest.approx(truth[0], rel=1e-6)
        else:  # a bucket: outer bounds of the merged steps, sums' means exact
            assert merged["min"]["grad_norm"][k] <= min(truth) * (1 + 1e-6)
            assert merged["max"]["grad_norm"][k] >= max(truth) * (1 - 1e-6)
            assert merged["values"]["nan_count"][k] == pytest.approx(sum(nans) / n, rel=1e-6)
            assert merged["max"]["nan_count"][k] >= max(nans)
    assert any(n > 1 for n in counts) and merged["note"] == BUCKETS_NOTE


def test_raw_only_history_has_no_bucket_note(tmp_path: Path) -> None:
    parts = []
    for tensor in ("w", "b"):
        h = shard_history(tmp_path, tensor, 5)
        parts.append(span(h, None, None, None, None, None))
    merged = history(RECORD, [0, 1], parts)["aggregate"]
    assert merged["counts"] == [1] * 5 and "note" not in merged
    assert (
        merged["min"]["nan_count"]
        == merged["max"]["nan_count"]
        == [count("w", s) + count("b", s) for s in range(1, 6)]
    )
