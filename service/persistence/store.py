"""The data directory on disk: per-stepper directories, atomic files, snapshots.

Layout (format version 1), everything under ``<data_dir>/steppers/``::

    <stepper>/checkpoint.safetensors             the stepper's current checkpoint
    <stepper>/history.sqlite (-wal, -shm)        its signal history (SQLite, WAL mode;
                                                 written by adamscope.service.inspect)
    <stepper>/snapshots/<snapshot>.safetensors   its named snapshots (same file format)
    <stepper>/commands.json, commands/<id>.safetensors
                                                 a watched run's command queue (see
                                                 adamscope.service.persistence.commands;
                                                 a watched run has no checkpoint)
    <stepper>/.<file>.<random>.tmp               a write in progress (stale after a crash)
    .<stepper>.deleted-<random>/                 a deletion in progress

Every file is written atomically: a temporary file in the same directory, flushed and
fsynced, renamed over the target with ``os.replace``, then the directory fsynced. A crash
at any instant leaves either the old file or the new one, never a torn one; stale temporary
files and half-deleted directories are removed by :meth:`Store.scan` at start-up. Files are
created readable by the service's user only (mode 0600). The history database is the
exception: SQLite writes it in place, durable per transaction (see
``adamscope.service.inspect.history_store``); it goes with its stepper's directory.

Stepper and snapshot names match ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``: single path
components that never start with a dot, so they cannot collide with temporary files or
tombstones. Names are checked again here and every path is resolved and required to stay
inside the data directory (a symlink pointing elsewhere is refused).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO

from adamscope.client.constants import STEPPER_NAME_PATTERN

from ..engine.errors import EngineError

__all__ = [
    "CHECKPOINT_FILE",
    "HISTORY_FILE",
    "AtomicFile",
    "PersistenceFailed",
    "SnapshotExists",
    "SnapshotNotFound",
    "Store",
    "atomic_write",
    "failure_reason",
]

log = logging.getLogger("adamscope.persistence")

CHECKPOINT_FILE = "checkpoint.safetensors"
HISTORY_FILE = "history.sqlite"
#: A watched run's command queue (:mod:`.commands`): its directory has no checkpoint.
WATCHED_QUEUE = "commands.json"
#: Parts of a checkpoint smaller than this are gathered into one write.
COALESCE_BYTES = 1 << 20
SNAPSHOTS = "snapshots"
SUFFIX = ".safetensors"
STEPPERS = "steppers"
_NAME = re.compile(STEPPER_NAME_PATTERN)


class SnapshotNotFound(EngineError):
    code = "snapshot_not_found"


class SnapshotExists(EngineError):
    code = "snapshot_exists"


class PersistenceFailed(EngineError):
    code = "persistence_failed"


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class AtomicFile:
    """A two-phase :func:`atomic_write`: :meth:`write` the chunks (e.g. under a lock, while
    they are valid), then :meth:`commit` (fsync and rename, outside it) or :meth:`abort`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self._file = open(os.open(self.tmp, flags, 0o600), "wb", buffering=0)  # noqa: SIM115

    def write(self, parts: list[bytes | memoryview]) -> int:
        """Write ``parts`` in order; small ones are gathered first (a stepper of 700 small
        tensors is ~3,000 parts: one system call each would cost more than the bytes)."""
        size = 0
        pending = bytearray()
        for part in parts:
            view = memoryview(part).cast("B")
            if view.nbytes < COALESCE_BYTES:
                pending += view
                if len(pending) < COALESCE_BYTES:
                    continue
                view, pending = memoryview(pending), bytearray()
            elif pending:
                size += self._write_all(memoryview(pending))
                pending = bytearray()
            size += self._write_all(view)
        if pending:
            size += self._write_all(memoryview(pending))
        return size

    def _write_all(self, view: memoryview) -> int:
        size = view.nbytes
        while view.nbytes:
            n = self._file.write(view)
            assert n is not None
            view = view[n:]
        return size

    def commit(self) -> None:
        try:
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


class Store:
    """Files of the data directory. Not thread-safe per name: callers serialize the
    operations on one stepper (:class:`~adamscope.service.persistence.Persistence` does)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / STEPPERS

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ paths

    def _inside(self, path: Path, parent: Path) -> Path:
        resolved = path.resolve()
        if resolved.parent != parent.resolve():
            log.error("refusing %s: it resolves outside %s", path, parent)
            raise PersistenceFailed(
                f"refusing {path.name!r}: it resolves outside the data directory"
            )
        return path

    def _component(self, name: str, what: str) -> str:
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise PersistenceFailed(f"invalid {what} name {name!r}")
        return name

    def stepper_dir(self, name: str) -> Path:
        return self._inside(self.root / self._component(name, "stepper"), self.root)

    def checkpoint_path(self, name: str) -> Path:
        d = self.stepper_dir(name)
        return self._inside(d / CHECKPOINT_FILE, d)

    def snapshot_dir(self, name: str) -> Path:
        d = self.stepper_dir(name)
        return self._inside(d / SNAPSHOTS, d)

    def snapshot_path(self, name: str, snap: str) -> Path:
        d = self.snapshot_dir(name)
        return self._inside(d / (self._component(snap, "snapshot") + SUFFIX), d)

    def history_path(self, name: str) -> Path:
        """Where the stepper's history database lives; its directory is created (durably)
        if need be, since the history opens before the first checkpoint is written."""
        d = self.stepper_dir(name)
        if not d.is_dir():
            self.open()
            d.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root)
        path = self._inside(d / HISTORY_FILE, d)
        if not path.exists():  # readable by the service's user only, as every file here
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600))
        return path

    # ------------------------------------------------------------------ checkpoints

    def write_checkpoint(self, name: str, data: bytes) -> int:
        d = self.stepper_dir(name)
        if not d.is_dir():
            d.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root)
        atomic_write(self.checkpoint_path(name), data)
        return len(data)

    def begin_checkpoint(self, name: str) -> AtomicFile:
        """An :class:`AtomicFile` that becomes the stepper's checkpoint on commit."""
        d = self.stepper_dir(name)
        if not d.is_dir():
            d.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root)
        return AtomicFile(self.checkpoint_path(name))

    def read_checkpoint(self, name: str) -> bytes:
        return self.checkpoint_path(name).read_bytes()

    def remove_stepper(self, name: str) -> None:
        """Delete a stepper's directory: renamed away atomically first (so a crash never
        leaves a half-deleted stepper that would be restored), then removed."""
        d = self.stepper_dir(name)
        if not d.exists():
            return
        tomb = self.root / f".{name}.deleted-{secrets.token_hex(6)}"
        os.replace(d, tomb)
        fsync_dir(self.root)
        shutil.rmtree(tomb, ignore_errors=True)

    def scan(self) -> list[str]:
        """Names of the stored steppers (directories holding a checkpoint), after removing
        stale temporary files and interrupted deletions."""
        self.open()
        names = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                if ".deleted-" in entry.name and entry.is_dir() and not entry.is_symlink():
                    log.info("removing interrupted deletion %s", entry)
                    shutil.rmtree(entry, ignore_errors=True)
                elif _is_temp(entry.name):
                    entry.unlink(missing_ok=True)
                continue
            if _NAME.fullmatch(entry.name) is None or entry.is_symlink() or not entry.is_dir():
                log.warning("ignoring %s: not a stepper directory", entry)
                continue
            for sub in (entry, entry / SNAPSHOTS):
                if sub.is_dir():
                    for f in sub.iterdir():
                        if _is_temp(f.name):
                            log.info("removing stale temporary file %s", f)
                            f.unlink(missing_ok=True)
            if (entry / CHECKPOINT_FILE).is_file():
                names.append(entry.name)
            elif (entry / WATCHED_QUEUE).is_file():  # back when its trainer reports again
                log.info("%s holds a watched run's files (no checkpoint: not restored)", entry)
            else:
                log.warning("ignoring %s: no %s in it", entry, CHECKPOINT_FILE)
        return names

    # ------------------------------------------------------------------ snapshots

    def write_snapshot(self, name: str, snap: str, data: bytes) -> int:
        path = self.snapshot_path(name, snap)
        if path.exists():
            raise SnapshotExists(
                f"stepper {name!r} already has a snapshot {snap!r}", stepper=name, snapshot=snap
            )
        d = path.parent
        if not d.is_dir():
            d.mkdir(parents=True, exist_ok=True)
            fsync_dir(d.parent)
        atomic_write(path, data)
        return len(data)

    def has_snapshot(self, name: str, snap: str) -> bool:
        return self.snapshot_path(name, snap).is_file()

    def open_snapshot(self, name: str, snap: str) -> BinaryIO:
        try:
            return open(self.snapshot_path(name, snap), "rb")  # noqa: SIM115 - caller closes
        except FileNotFoundError:
            raise SnapshotNotFound(
                f"stepper {name!r} has no snapshot {snap!r}", stepper=name, snapshot=snap
            ) from None

    def read_snapshot(self, name: str, snap: str) -> bytes:
        with self.open_snapshot(name, snap) as f:
            return f.read()

    def delete_snapshot(self, name: str, snap: str) -> None:
        path = self.snapshot_path(name, snap)
        try:
            path.unlink()
        except FileNotFoundError:
            raise SnapshotNotFound(
                f"stepper {name!r} has no snapshot {snap!r}", stepper=name, snapshot=snap
            ) from None
        fsync_dir(path.parent)

    def snapshot_files(self, name: str) -> list[tuple[str, Path]]:
        d = self.snapshot_dir(name)
        if not d.is_dir():
            return []
        out = []
        for f in sorted(d.iterdir()):
            snap = f.name[: -len(SUFFIX)] if f.name.endswith(SUFFIX) else ""
            if _NAME.fullmatch(snap) and f.is_file() and not f.is_symlink():
                out.append((snap, f))
        return out


def failure_reason(e: BaseException) -> str:
    """Why a file operation failed, for clients: never the data directory's paths (an
    OSError's text names the file), never a stack trace."""
    if isinstance(e, EngineError):
        return e.detail
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    first = str(e).split("\n", 1)[0]
    return f"{type(e).__name__}: {first}"[:500]
