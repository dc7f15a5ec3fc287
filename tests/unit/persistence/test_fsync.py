"""Durability reaches the disk: the data directory's writes are fsynced in the order that
survives a power loss (tests/disk_log.py records them; the real calls still run).

A checkpoint is written to a temporary file whose bytes are fsynced *before* it is renamed
over the checkpoint, and the directory is fsynced *after* the rename (else a power loss
can leave the old file, or a renamed file whose bytes never reached the disk). Under the
``every_step`` policy all of that happens before :meth:`Persistence.after_mutation`
returns, i.e. before the service acknowledges the change. The SIGKILL tests of
tests/e2e/test_durability.py cannot see any of this: the page cache outlives the process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from disk_log import inode_of, recording

from adamscope.client.protocol import Durability
from adamscope.service.engine import Registry, Stepper
from adamscope.service.engine import checkpoint as ckpt
from adamscope.service.persistence import Persistence, Store
from adamscope.service.persistence.store import atomic_write


def make(name: str) -> Stepper:
    return Stepper(name, "adam", torch.device("cpu"), [("w", torch.ones(3, 2))], {"lr": 0.1})


def on_disk_step(path: Path) -> int:
    with open(path, "rb") as f:
        return int(ckpt.header_from_prefix(f.read)["step"])


@pytest.fixture
def persistence(tmp_path: Path) -> Persistence:
    p = Persistence(tmp_path, Registry(), "cpu")
    p.restore_all()
    return p


def test_every_step_syncs_file_then_directory_before_it_returns(
    persistence: Persistence, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = persistence.create("run", lambda: make("run"), Durability(mode="every_step"))
    path = persistence.store.checkpoint_path("run")
    for k in range(3):
        with recording(monkeypatch) as log:
            s.step({"w": torch.full((3, 2), float(k))})
            persistence.after_mutation(s, "step")
            log.note("ack")
        log.synced_before(path, log.index("ack"))
        assert on_disk_step(path) == k + 1


def test_a_new_stepper_directory_is_synced_into_its_parent(
    persistence: Persistence, monkeypatch: pytest.MonkeyPatch
) -> None:
    with recording(monkeypatch) as log:
        persistence.create("fresh", lambda: make("fresh"))
        log.note("ack")
    ack = log.index("ack")
    path = persistence.store.checkpoint_path("fresh")
    log.synced_before(path, ack)
    root = inode_of(persistence.store.root)
    assert any(e.kind == "fsync" and e.is_dir and e.inode == root for e in log.events[:ack]), (
        log.events
    )


@pytest.mark.parametrize(
    "policy",
    [
        Durability(mode="manual"),
        Durability(mode="every_n", n=5),
        Durability(mode="interval", seconds=3600),
    ],
)
def test_other_policies_sync_on_an_explicit_checkpoint(
    persistence: Persistence, monkeypatch: pytest.MonkeyPatch, policy: Durability
) -> None:
    s = persistence.create("run", lambda: make("run"), policy)
    path = persistence.store.checkpoint_path("run")
    s.step({"w": torch.ones(3, 2)})
    with recording(monkeypatch) as log:
        persistence.after_mutation(s, "step")
    assert log.events == []  # not due: nothing written
    with recording(monkeypatch) as log:
        assert persistence.checkpoint(s)["step"] == 1
        log.note("ack")
    log.synced_before(path, log.index("ack"))


def test_snapshots_are_synced_into_a_synced_directory(
    persistence: Persistence, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = persistence.create("run", lambda: make("run"))
    with recording(monkeypatch) as log:
        persistence.take_snapshot(s, "first")
        log.note("ack")
    ack = log.index("ack")
    path = persistence.store.snapshot_path("run", "first")
    log.synced_before(path, ack)
    stepper_dir = inode_of(persistence.store.stepper_dir("run"))
    made = [
        i
        for i, e in enumerate(log.events[:ack])
        if e.kind == "fsync" and e.is_dir and e.inode == stepper_dir
    ]
    assert made, "the new snapshots/ directory was not synced into the stepper's directory"


def test_atomic_write_syncs_before_and_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with recording(monkeypatch) as log:
        atomic_write(target, b"new bytes")
        log.note("done")
    log.synced_before(target, log.index("done"))
    assert target.read_bytes() == b"new bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_removals_are_synced(persistence: Persistence, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting a snapshot or a stepper syncs the directory the entry left."""
    s = persistence.create("run", lambda: make("run"))
    persistence.take_snapshot(s, "first")
    snapshots = inode_of(persistence.store.snapshot_dir("run"))
    root = persistence.store.root
    with recording(monkeypatch) as log:
        persistence.delete_snapshot(s, "first")
        log.note("snapshot deleted")
        persistence.delete("run")
        log.note("stepper deleted")
    gone = log.index("unlink")
    assert log.index("fsync", snapshots, gone) < log.index("snapshot deleted")
    moved = log.index("replace", start=log.index("snapshot deleted"))
    assert Path(log.events[moved].paths[0]) == root / "run"
    assert log.index("fsync", inode_of(root), moved) < log.index("stepper deleted")


def test_the_store_alone_writes_checkpoints_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    store.open()
    data = ckpt.encode(make("run")).data
    with recording(monkeypatch) as log:
        store.write_checkpoint("run", data)
        log.note("done")
        out = store.begin_checkpoint("run")
        out.write([data])
        out.commit()
        log.note("committed")
    path = store.checkpoint_path("run")
    log.synced_before(path, log.index("done"))
    log.synced_before(path, log.index("committed"))
    assert path.read_bytes() == data
