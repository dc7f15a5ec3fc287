"""The durable history (SQLite, tiers of buckets), driven directly through its API.

A long synthetic run checks the bound on rows and that a query from step 1 answers
buckets whose min, max and mean are those of an independent float64 computation over
exactly the steps each bucket covers; then rollback, new signals mid-run, reopening a file
and a file that cannot be read.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from nan_equal import same

from adamscope.service.engine import Stepper
from adamscope.service.inspect.history import History, HistoryConfig
from adamscope.service.inspect.history_store import AGGREGATE, TENSORS, HistoryStore, Points
from adamscope.service.inspect.recorder import attach_history, open_store
from adamscope.service.inspect.tiers import MAX, MIN, mean

COLUMNS = ["a", "b", "c", "d"]
LATE = 150_001  # column "d" appears at this step


def make_stepper() -> Stepper:
    return Stepper("s", "adam", torch.device("cpu"), [("w", torch.ones(3))], {"lr": 0.1})


def grads(k: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), float(k + 1))}


def value(step: np.ndarray, column: str) -> np.ndarray:
    """Hand-made signals: a ramp, a pseudo-random one, one NaN every 13 steps, a late one."""
    s = step.astype(np.float64)
    if column == "a":
        return s
    if column == "b":
        return np.sin(s * 0.37) * 100 + (s * 7919 % 101)
    if column == "c":
        return np.where(step % 13 == 0, np.nan, -s / 3)
    return np.where(step >= LATE, s % 17, np.nan)


def bound(store: HistoryStore, kind: int) -> list[int]:
    """Most rows per level (module docstring): max(cap, width ratio into the next level)."""
    widths = (1, *store.config.tier_widths)
    ratios = [b // a for a, b in zip(widths, widths[1:], strict=False)] + [1]
    return [max(cap, r) + 1 for cap, r in zip(store.caps(kind), ratios, strict=True)]


def check_points(points: Points, columns: list[str], first: int, last: int) -> None:
    """Points partition ``first..last`` and each holds exactly its steps' statistics."""
    assert points.lo[0] == first and points.hi[-1] == last
    assert (points.lo[1:] == points.hi[:-1] + 1).all()
    means = mean(points.stats)[:, 0]
    for i in range(len(points.lo)):
        steps = np.arange(points.lo[i], points.hi[i] + 1)
        assert points.rows[i, 0] == len(steps)
        for c, name in enumerate(columns):
            v = value(steps, name)
            kept = v[~np.isnan(v)]
            got = (means[i, c], points.stats[i, MIN, 0, c], points.stats[i, MAX, 0, c])
            want = (
                (math.fsum(kept) / len(kept), kept.min(), kept.max())
                if len(kept)
                else (math.nan,) * 3
            )
            for g, w in zip(got, want, strict=True):
                assert (math.isnan(g) and math.isnan(w)) or math.isclose(g, w, rel_tol=1e-12), (
                    name,
                    steps[0],
                    steps[-1],
                    got,
                    want,
                )


def test_a_long_run_stays_within_its_bound_and_reaches_step_one() -> None:
    config = HistoryConfig(steps=500, tier_widths=(10, 100, 1_000), tier_buckets=40)
    store = HistoryStore(None, ["w"], config)  # in memory: the same database, faster
    steps = 200_000
    table = {c: value(np.arange(1, steps + 1), c) for c in COLUMNS}
    limits = bound(store, AGGREGATE)
    for s in range(1, steps + 1):
        columns = COLUMNS if s >= LATE else COLUMNS[:3]
        row = np.array([table[c][s - 1] for c in columns])
        store.append(s, float(s), columns, row, None, None)
        if s % 997 == 0:
            counts = [store.counts()[(AGGREGATE, level)] for level in range(4)]
            assert all(n <= m for n, m in zip(counts, limits, strict=True)), (s, counts)
    counts = store.counts()
    assert counts[(AGGREGATE, 0)] <= 500 and counts[(AGGREGATE, 3)] <= 40
    rows = sum(counts.values())
    assert rows <= 500 + 3 * 41  # a bounded database whatever the length of the run
    pages, page = (
        store.db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "page_size")
    )
    assert pages * page < 2**20, pages * page  # ~620 rows of 5 x 4 float64: under 1 MiB
    check_points(store.span(AGGREGATE, 1, steps), COLUMNS, 1, steps)
    late = store.span(AGGREGATE, LATE + 1000, steps)
    assert late.lo[0] <= LATE + 1000 <= late.hi[0]  # the bucket reaching into the range
    store.close()


def test_per_tensor_tiers_have_their_own_cell_budget() -> None:
    # 3 tensors x 2 signals = 6 cells: a raw window of 60 // 6 = 10 steps, 24 // 6 = 4
    # buckets per tier (the aggregate keeps 100 raw steps and 50 buckets). The aggregate's
    # own signals (a group's lr) take no room in the per-tensor rows.
    config = HistoryConfig(
        steps=100, tensor_values=60, tier_widths=(5, 25), tier_buckets=50, tier_tensor_values=24
    )
    history = History("s", ["w", "b", "h"], config)
    for s in range(1, 1_001):
        skip = "b" if s % 4 == 0 else None  # b has no gradient every 4th step
        tensors = {t: {"x": float(s), "y": -float(s)} for t in ("w", "b", "h") if t != skip}
        aggregate = {"x": float(s), "group0.lr": 0.1, "y": 1.0, "group0.beta1": 0.9}
        history.record(s, s, float(s), aggregate, tensors)
    store = history.store
    assert store.caps(TENSORS) == [10, 4, 4]
    sizes = store.db.execute("SELECT tier, length(data) FROM points WHERE kind=1").fetchall()
    assert {n for tier, n in sizes if tier == 0} == {3 * 2 * 8}
    assert {n for tier, n in sizes if tier > 0} == {(3 + 5 * 3 * 2) * 8}
    lr = history.span(tensors=["w"], signals=["group0.lr", "x"])["tensors"]["w"]
    assert all(math.isnan(v) for v in lr["values"]["group0.lr"]) and lr["steps"][-1] == 1_000
    counts = [store.counts()[(TENSORS, level)] for level in range(3)]
    limits = bound(store, TENSORS)
    assert all(n <= m for n, m in zip(counts, limits, strict=True)), counts
    q = history.span(tensors=["w", "b"], signals=["x"])
    for name, missing, last in (("w", 0, 1_000), ("b", 250, 999)):
        series = q["tensors"][name]
        assert series["first_steps"][0] == 1 and series["steps"][-1] == last
        assert sum(series["counts"]) == 1_000 - missing
        for i, (lo, hi) in enumerate(zip(series["first_steps"], series["steps"], strict=True)):
            stepped = [k for k in range(lo, hi + 1) if name != "b" or k % 4]
            assert series["values"]["x"][i] == pytest.approx(sum(stepped) / len(stepped))
            assert (series["min"]["x"][i], series["max"]["x"][i]) == (stepped[0], stepped[-1])


def test_max_points_merges_on_a_grid_of_equal_spans() -> None:
    history = History("s", ["w"], HistoryConfig(steps=50, tier_widths=(10, 100), tier_buckets=5))
    for s in range(1, 2_001):
        history.record(s, s, float(s), {"x": float(s)}, {})
    q = history.span(max_points=7)
    agg = q["aggregate"]
    assert len(agg["steps"]) <= 7 and sum(agg["counts"]) == 2_000
    assert agg["first_steps"][0] == 1 and agg["steps"][-1] == 2_000
    for i, (lo, hi) in enumerate(zip(agg["first_steps"], agg["steps"], strict=True)):
        assert agg["values"]["x"][i] == pytest.approx((lo + hi) / 2)
    assert q["first_step"] == 1


def test_going_back_in_time_forgets_every_bucket_reaching_the_abandoned_steps() -> None:
    history = History("s", ["w"], HistoryConfig(steps=20, tier_widths=(10, 100), tier_buckets=3))
    for s in range(1, 301):
        history.record(s, s, float(s), {"x": float(s)}, {"w": {"x": 1.0}})
        history.record_loss(s, s / 10, float(s))
    assert history.record(255, 999, 0.0, {"x": -1.0}, {"w": {"x": -1.0}}) is True
    for kind in (AGGREGATE, TENSORS):
        points = history.store.span(kind, 1, 10**9)
        assert points.hi.max() == 255
        assert ((points.hi < 255) | (points.lo == 255)).all()  # nothing straddles the restore
    q = history.span(signals=["x"])
    assert q["aggregate"]["values"]["x"][-1] == -1.0
    assert max(q["loss"]["steps"]) < 255
    assert all(s < 255 for s in history.query()["loss"]["steps"])
    for s in range(256, 400):
        history.record(s, s, float(s), {"x": float(s)}, {})
    assert history.span()["aggregate"]["steps"][-1] == 399


def test_a_file_is_found_again_and_cut_back_to_the_restored_step(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    # more than the rings' first storage block (64 rows) comes back from the file
    config = HistoryConfig(steps=100, tier_widths=(5, 25), tier_buckets=4)
    first = History("s", ["w", "b"], config, HistoryStore(path, ["w", "b"], config))
    for s in range(1, 201):
        extra = {"late": 2.0 * s} if s > 150 else {}
        first.record(s, s, float(s), {"x": float(s), **extra}, {"w": {"x": float(s), **extra}})
        first.record_loss(s, 1.0 / s, float(s))
    whole, recent = first.span(tensors=["*"]), first.query(tensors=["*"])
    first.store.close()

    again = History("s", ["w", "b"], config, HistoryStore(path, ["w", "b"], config), at_step=200)
    assert same(again.span(tensors=["*"]), whole)
    reloaded = again.query(tensors=["*"])
    assert same(reloaded["aggregate"], recent["aggregate"])
    assert same(reloaded["tensors"]["w"], recent["tensors"]["w"])
    assert reloaded["loss"] == recent["loss"]
    assert again.latest() is not None and again.latest()["step"] == 200
    again.store.close()

    # a stepper restored at step 180 (its checkpoint) never shows the history after it
    cut = History("s", ["w", "b"], config, HistoryStore(path, ["w", "b"], config), at_step=180)
    assert cut.query()["aggregate"]["steps"][-1] == 180
    assert cut.span()["aggregate"]["steps"][-1] == 180
    assert max(cut.query()["loss"]["steps"]) == 180
    cut.record(181, 1, 1.0, {"x": 0.5}, {"w": {"x": 0.5}})
    assert cut.query(since=179)["aggregate"]["values"]["x"] == [179.0, 180.0, 0.5][1:]
    assert cut.span(signals=["late"], first=160)["signals"] == ["late"]
    cut.store.close()

    other = HistoryStore(path, ["v"], config)  # another stepper's tensors: start afresh
    assert other.columns == [] and sum(other.counts().values()) == 0
    other.close()


def test_an_unreadable_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    store = open_store(path, ["w"], HistoryConfig())
    store.append(1, 1.0, ["x"], np.array([1.0]), None, None)
    assert store.path == path and store.counts()[(AGGREGATE, 0)] == 1
    assert [p.name.split("-")[0] for p in tmp_path.glob("*.unreadable-*")] == [
        "history.sqlite.unreadable"
    ]
    store.close()


def test_a_history_that_fails_to_load_never_stops_its_stepper_from_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    load = History._load

    def broken(self: History) -> None:
        if self.store.path is not None:
            raise RuntimeError("unexpected")
        load(self)

    monkeypatch.setattr(History, "_load", broken)
    stepper = make_stepper()
    observer = attach_history(stepper, path=tmp_path / "history.sqlite")
    assert observer.history.store.path is None  # in memory this time
    assert "could not be read" in caplog.text
    stepper.step(grads(0))
    assert observer.history.query()["aggregate"]["steps"] == [1]
