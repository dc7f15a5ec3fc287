"""A record of what reaches the disk, in order: each ``os.fsync`` (of which file or
directory, by inode), each ``os.replace`` and ``os.unlink`` (shared by the unit and API
tests of durability).

A process killed with SIGKILL cannot tell a synced write from one still in the page cache
(the kernel outlives the process), so crash tests cannot see a missing ``fsync``; a power
loss can. This spy wraps the real calls (everything still happens) and notes them, so a
test can say: this file's bytes were synced, then it was renamed into place, then its
directory was synced, and only then did the reply go out.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class Event:
    """``kind``: "fsync", "replace", "unlink" or a label a test adds (e.g. "reply").
    ``inode``: (st_dev, st_ino) of the synced file or directory, or of the file being
    renamed; ``is_dir``: whether an fsync was of a directory; ``paths``: the arguments."""

    kind: str
    inode: tuple[int, int] | None = None
    is_dir: bool = False
    paths: tuple[str, ...] = ()


def inode_of(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


@dataclass
class DiskLog:
    events: list[Event] = field(default_factory=list)

    def note(self, kind: str) -> None:
        self.events.append(Event(kind))

    def clear(self) -> None:
        self.events.clear()

    def index(self, kind: str, inode: tuple[int, int] | None = None, start: int = 0) -> int:
        """Position of the first event of ``kind`` (on ``inode``) at or after ``start``."""
        for i, e in enumerate(self.events[start:], start):
            if e.kind == kind and (inode is None or e.inode == inode):
                return i
        raise AssertionError(f"no {kind} of {inode} after event {start}: {self.events}")

    def synced_before(self, path: Path, reply: int) -> None:
        """``path`` was last written atomically and durably before event ``reply``: the
        file renamed onto it had its bytes fsynced before the rename, and the directory
        was fsynced between the rename and ``reply``."""
        dir_inode = inode_of(path.parent)
        renames = [
            i
            for i, e in enumerate(self.events[:reply])
            if e.kind == "replace" and Path(e.paths[1]) == path
        ]
        assert renames, f"{path} was not renamed into place before event {reply}: {self.events}"
        rename = renames[-1]
        file_inode = self.events[rename].inode
        if not any(
            e.kind == "replace" and Path(e.paths[1]) == path for e in self.events[rename + 1 :]
        ):
            assert file_inode == inode_of(path), f"{path} is not the file renamed onto it"
        synced = [
            i
            for i, e in enumerate(self.events[:rename])
            if e.kind == "fsync" and e.inode == file_inode and not e.is_dir
        ]
        assert synced, f"{path}'s bytes were not fsynced before the rename: {self.events}"
        dir_synced = [
            i
            for i, e in enumerate(self.events[rename:reply], rename)
            if e.kind == "fsync" and e.inode == dir_inode and e.is_dir
        ]
        assert dir_synced, (
            f"{path.parent} was not fsynced between the rename and event {reply}: {self.events}"
        )


@contextmanager
def recording(monkeypatch: pytest.MonkeyPatch) -> Iterator[DiskLog]:
    """Record fsync/replace/unlink calls made through the ``os`` module while the block
    runs (the real calls still run)."""
    log = DiskLog()
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink

    def fsync(fd: Any) -> None:
        fileno = fd if isinstance(fd, int) else fd.fileno()
        st = os.fstat(fileno)
        log.events.append(Event("fsync", (st.st_dev, st.st_ino), stat.S_ISDIR(st.st_mode)))
        real_fsync(fd)

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        inode = inode_of(src) if os.path.exists(src) else None
        real_replace(src, dst, *args, **kwargs)
        log.events.append(Event("replace", inode, False, (os.fspath(src), os.fspath(dst))))

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        real_unlink(path, *args, **kwargs)
        log.events.append(Event("unlink", None, False, (os.fspath(path),)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    try:
        yield log
    finally:
        monkeypatch.setattr(os, "fsync", real_fsync)
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.setattr(os, "unlink", real_unlink)
