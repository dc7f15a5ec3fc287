"""Durability: which stepper is written to disk when, and snapshots.

:class:`Persistence` owns the data directory for one service process. It restores every
stored stepper at start-up, writes a stepper's checkpoint after a mutation when its
:class:`~adamscope.client.protocol.Durability` policy says so, takes, lists, restores and deletes
named snapshots, imports checkpoint files, and flushes unwritten changes at shutdown.

Consistency: every disk operation on a stepper name, and the registry changes that go with
it (create, delete, import), run under one lock per name, and the checkpoint bytes are taken
under the stepper's own lock. So a checkpoint is always one step (never a mix of two), a
deleted stepper is never written back by a request still in flight on it, and writes of one
stepper happen in order, each at least as new as the one before. A write that finds the
stepper's ``version`` already on disk is skipped, so concurrent steps share writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from pydantic import ValidationError

from adamscope.client.protocol import Durability

from ..engine import Registry, Stepper
from ..engine import checkpoint as checkpoints
from ..engine.errors import (
    DeviceUnavailable,
    EngineError,
    InvalidCheckpoint,
    StepperExists,
    StepperNotFound,
    StepperWatched,
)
from ..engine.options import resolve_device
from ..engine.stepper import WATCHED
from .store import PersistenceFailed, SnapshotExists, Store, failure_reason

__all__ = ["Persistence", "Track"]

log = logging.getLogger("adamscope.persistence")

#: Mutation kinds :meth:`Persistence.due` distinguishes.
STEP, CHANGE, RESTORE = "step", "change", "restore"


@dataclass
class Track:
    """What is on disk for one hosted stepper."""

    stepper: Stepper
    policy: Durability
    persisted_version: int = -1
    persisted_step: int | None = None
    persisted_at: float | None = None  # wall clock, for people
    written_mono: float = 0.0  # monotonic, for the interval policy
    size: int = 0

    @property
    def dirty(self) -> bool:
        return self.stepper.version != self.persisted_version


class Persistence:
    """The data directory of one service process (see the module docstring)."""

    def __init__(
        self,
        data_dir: Any,
        registry: Registry,
        default_device: str,
        default_policy: Durability | None = None,
    ) -> None:
        self.store = Store(data_dir)
        self.registry = registry
        self.default_device = default_device
        self.default_policy = default_policy or Durability()
        self._tracks: dict[str, Track] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self.restored: list[str] = []
        #: Stored steppers that could not be restored: name -> reason. Their files stay
        #: untouched; the name cannot be re-created until DELETE discards them.
        self.failed: dict[str, str] = {}

    # ------------------------------------------------------------------ helpers

    def _lock(self, name: str) -> threading.RLock:
        with self._locks_guard:
            lock = self._locks.get(name)
            if lock is None:
                lock = self._locks[name] = threading.RLock()
            return lock

    def _track(self, stepper: Stepper) -> Track | None:
        """The stepper's track while it is the registered stepper of its name."""
        track = self._tracks.get(stepper.name)
        return track if track is not None and track.stepper is stepper else None

    def _require(self, stepper: Stepper) -> Track:
        track = self._track(stepper)
        if track is None:
            _refuse_watched(stepper)
            raise StepperNotFound(f"no stepper named {stepper.name!r}", stepper=stepper.name)
        return track

    def _require_files(self, stepper: Stepper) -> None:
        """The stepper owns its files here: it is tracked, or a registered watched run
        (which has snapshots, not checkpoints: :mod:`.watched`)."""
        if self._track(stepper) is not None:
            return
        try:
            registered = self.registry.get(stepper.name)
        except StepperNotFound:
            registered = None
        if registered is not stepper or stepper.hosting != WATCHED:
            raise StepperNotFound(f"no stepper named {stepper.name!r}", stepper=stepper.name)

    def restore_device(self, stored: str) -> torch.device:
        """Where a checkpoint saved on ``stored`` is restored or imported here."""
        return self._device(stored)

    def _device(self, stored: str) -> torch.device:
        try:
            return resolve_device(stored, self.default_device)
        except DeviceUnavailable:
            fallback = resolve_device(None, self.default_device)
            log.warning("device %s is not available here; restoring on %s", stored, fallback)
            return fallback

    def _policy(self, header: dict[str, Any]) -> Durability:
        raw = header.get("durability")
        if raw is None:
            return self.default_policy
        try:
            return Durability.model_validate(raw)
        except ValidationError:
            log.warning(
                "checkpoint of %r has an invalid durability policy %r; using %s",
                header.get("stepper"),
                raw,
                self.default_policy.mode,
            )
            return self.default_policy

    def _write(self, track: Track) -> None:
        """Write the stepper's checkpoint now (caller holds the name lock)."""
        stepper = track.stepper
        try:
            out = self.store.begin_checkpoint(stepper.name)
            try:
                # The tensors go to the file straight from their memory under the stepper's
                # lock; the fsync and rename happen after it is released.
                enc = checkpoints.write(
                    stepper, out.write, {"durability": track.policy.model_dump()}
                )
            except BaseException:
                out.abort()
                raise
            out.commit()
        except OSError as e:
            log.error("could not write the checkpoint of %r: %s", stepper.name, e)
            raise PersistenceFailed(
                f"the change to {stepper.name!r} was applied in memory but could not be written "
                f"to the data directory: {failure_reason(e)}; it is written with the next change",
                stepper=stepper.name,
            ) from None
        track.persisted_version = enc.version
        track.persisted_step = enc.step
        track.persisted_at = float(enc.header["saved_at"])
        track.written_mono = time.monotonic()
        track.size = enc.size

    # ------------------------------------------------------------------ lifecycle

    def restore_all(self) -> None:
        """Register every stepper stored in the data directory. A checkpoint that does not
        load is logged and reported (``failed``), never fatal."""
        for name in self.store.scan():
            path = self.store.checkpoint_path(name)
            try:
                ckpt = checkpoints.decode(path.read_bytes())
                if ckpt.name != name:
                    raise InvalidCheckpoint(
                        f"the checkpoint names stepper {ckpt.name!r}, not {name!r}"
                    )
                stepper = checkpoints.build(ckpt, self._device(ckpt.device))
                self.registry.create(name, lambda s=stepper: s)  # type: ignore[misc]
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
                detail = failure_reason(e)
                log.error("could not restore stepper %r from %s: %s", name, path, detail)
                self.failed[name] = detail
                continue
            self._tracks[name] = Track(
                stepper,
                self._policy(ckpt.header),
                stepper.version,
                ckpt.step,
                float(ckpt.header["saved_at"]),
                time.monotonic(),
                path.stat().st_size,
            )
            self.restored.append(name)
        if self.restored or self.failed:
            log.info(
                "restored %d stepper(s) from %s%s",
                len(self.restored),
                self.store.root,
                f"; {len(self.failed)} failed: {sorted(self.failed)}" if self.failed else "",
            )

    def create(
        self, name: str, build: Callable[[], Stepper], policy: Durability | None = None
    ) -> Stepper:
        """Register ``build()`` under ``name`` and write its first checkpoint; a failed
        write unregisters it again."""
        with self._lock(name):
            if name in self.failed:
                raise StepperExists(
                    f"stepper {name!r} is stored in the data directory but could not be "
                    f"restored ({self.failed[name]}); DELETE it to discard the stored files",
                    stepper=name,
                )
            stepper = self.registry.create(name, build)
            track = self._tracks[name] = Track(stepper, policy or self.default_policy)
            try:
                self._write(track)
            except PersistenceFailed:
                self.registry.delete(name)
                del self._tracks[name]
                raise
            return stepper

    def delete(self, name: str) -> None:
        """Unregister a stepper and remove its directory (checkpoint and snapshots)."""
        with self._lock(name):
            try:
                self.registry.get(name)
            except StepperNotFound:
                if name not in self.failed:
                    raise
            try:
                self.store.remove_stepper(name)
            except OSError as e:
                raise PersistenceFailed(
                    f"could not remove the files of {name!r}: {failure_reason(e)}", stepper=name
                ) from None
            self.failed.pop(name, None)
            self._tracks.pop(name, None)
            with contextlib.suppress(StepperNotFound):  # registered untracked: a watched run
                self.registry.delete(name)

    def import_checkpoint(
        self,
        ckpt: checkpoints.Checkpoint,
        name: str | None = None,
        device: str | None = None,
        admit: Callable[[str], None] | None = None,
    ) -> Stepper:
        """A new stepper from a checkpoint file's contents (under ``name`` if given), with
        the file's durability policy; ``admit(name)`` runs under the registry lock."""
        new_name = name or ckpt.name
        target = (
            resolve_device(device, self.default_device) if device else self._device(ckpt.device)
        )

        def build() -> Stepper:
            if admit is not None:
                admit(new_name)
            return checkpoints.build(ckpt, target, new_name)

        return self.create(new_name, build, self._policy(ckpt.header))

    # ------------------------------------------------------------------ policy

    def due(self, stepper: Stepper, kind: str = CHANGE) -> bool:
        """Whether the stepper's policy wants a write after a mutation of ``kind``."""
        track = self._track(stepper)
        if track is None or not track.dirty:
            return False
        p = track.policy
        if p.mode == "manual":
            return False
        if p.mode == "every_step" or kind == RESTORE:
            return True
        if p.mode == "every_n":
            assert p.n is not None
            done = stepper.step_count - (track.persisted_step or 0)
            return kind == STEP and done >= p.n
        assert p.seconds is not None
        return time.monotonic() - track.written_mono >= p.seconds

    def persist(self, stepper: Stepper, *, force: bool = False) -> Track | None:
        """Write the stepper's checkpoint unless it is already on disk (or, with ``force``,
        always). None if the stepper is no longer registered."""
        with self._lock(stepper.name):
            track = self._track(stepper)
            if track is None:
                return None
            if force or track.dirty:
                self._write(track)
            return track

    def after_mutation(self, stepper: Stepper, kind: str = CHANGE) -> None:
        if self.due(stepper, kind):
            self.persist(stepper)

    def checkpoint(self, stepper: Stepper) -> dict[str, Any]:
        """Write the stepper's checkpoint now, whatever its policy."""
        with self._lock(stepper.name):
            track = self._require(stepper)
            self._write(track)
            return {
                "stepper": stepper.name,
                "step": track.persisted_step,
                "persisted_at": track.persisted_at,
                "size": track.size,
            }

    def set_policy(self, stepper: Stepper, policy: Durability) -> None:
        """Change the policy; the checkpoint (which records it) is written at once."""
        with self._lock(stepper.name):
            track = self._require(stepper)
            track.policy = policy
            self._write(track)

    def flush_due(self) -> int:
        """Write the ``interval`` steppers whose time has come (the background flusher)."""
        return self._flush(lambda t: t.policy.mode == "interval" and self.due(t.stepper, CHANGE))

    def flush_all(self) -> int:
        """At shutdown: write every stepper with unwritten changes, except ``manual`` ones
        (whose disk state only an explicit checkpoint changes)."""
        return self._flush(lambda t: t.policy.mode != "manual" and t.dirty)

    def _flush(self, wanted: Callable[[Track], bool]) -> int:
        """Write the steppers ``wanted`` picks; a failed write is logged, not raised. The
        number written."""
        written = 0
        for track in list(self._tracks.values()):
            if wanted(track):
                try:
                    if self.persist(track.stepper) is not None:
                        written += 1
                except PersistenceFailed as e:
                    log.error("%s", e.detail)
        return written

    def describe(self, stepper: Stepper) -> dict[str, Any]:
        """The summary fields about durability."""
        track = self._track(stepper)
        if track is None:
            return {}
        return {
            "durability": track.policy.model_dump(),
            "persisted_step": track.persisted_step,
            "persisted_at": track.persisted_at,
            "dirty": track.dirty,
        }

    def health(self) -> dict[str, Any]:
        return {
            "restored": len(self.restored),
            "failed": [{"stepper": n, "error": e} for n, e in sorted(self.failed.items())],
        }

    # ------------------------------------------------------------------ snapshots

    def _snapshot_info(
        self,
        name: str,
        snap: str,
        header: dict[str, Any] | None,
        size: int,
        error: str | None = None,
    ) -> dict[str, Any]:
        return {
            "name": snap,
            "stepper": name,
            "size": size,
            "error": error,
            "step": header["step"] if header else None,
            "created_at": header["saved_at"] if header else None,
        }

    def take_snapshot(self, stepper: Stepper, snap: str | None = None) -> dict[str, Any]:
        """Write the stepper's current state as snapshot ``snap`` (default
        ``step<N>-<UTC time>``); 409 if that name is taken."""
        name = stepper.name
        with self._lock(name):
            track = self._require(stepper)
            with stepper.lock:
                if snap is None:
                    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                    base = snap = f"step{stepper.step_count}-{stamp}"
                    i = 1
                    while self.store.has_snapshot(name, snap):
                        i += 1
                        snap = f"{base}-{i}"
                elif self.store.has_snapshot(name, snap):
                    raise SnapshotExists(
                        f"stepper {name!r} already has a snapshot {snap!r}",
                        stepper=name,
                        snapshot=snap,
                    )
                enc = checkpoints.encode(
                    stepper, {"durability": track.policy.model_dump(), "snapshot": snap}
                )
            return self._write_snapshot(name, snap, enc)

    def _write_snapshot(self, name: str, snap: str, enc: checkpoints.Encoded) -> dict[str, Any]:
        """Write an encoded snapshot (the caller holds the name lock); its listing entry."""
        try:
            size = self.store.write_snapshot(name, snap, enc.data)
        except OSError as e:
            raise PersistenceFailed(
                f"could not write snapshot {snap!r} of {name!r}: {failure_reason(e)}",
                stepper=name,
            ) from None
        return self._snapshot_info(name, snap, enc.header, size)

    def keep_snapshot(
        self, stepper: Stepper, snap: str, enc: checkpoints.Encoded
    ) -> dict[str, Any]:
        """Write a snapshot encoded elsewhere (a watched run's: :mod:`.watched`)."""
        with self._lock(stepper.name):
            self._require_files(stepper)
            return self._write_snapshot(stepper.name, snap, enc)

    def list_snapshots(self, stepper: Stepper) -> list[dict[str, Any]]:
        """Every snapshot of the stepper, oldest first (unreadable ones with ``error``)."""
        name = stepper.name
        with self._lock(name):
            self._require_files(stepper)
            out = []
            for snap, path in self.store.snapshot_files(name):
                try:
                    with open(path, "rb") as f:
                        header = checkpoints.header_from_prefix(f.read)
                        size = path.stat().st_size
                    out.append(self._snapshot_info(name, snap, header, size))
                except (OSError, EngineError) as e:
                    detail = failure_reason(e)
                    out.append(self._snapshot_info(name, snap, None, 0, detail))
        out.sort(key=lambda s: (s["created_at"] is None, s["created_at"] or 0, s["name"]))
        return out

    def restore_snapshot(self, stepper: Stepper, snap: str) -> None:
        """Roll the stepper back to the snapshot (then write it, unless ``manual``)."""
        with self._lock(stepper.name):
            self._require(stepper)
            ckpt = checkpoints.decode(self.store.read_snapshot(stepper.name, snap))
            checkpoints.load_into(stepper, ckpt)
            if self.due(stepper, RESTORE):
                self.persist(stepper)

    def open_snapshot(self, stepper: Stepper, snap: str) -> tuple[BinaryIO, int]:
        """The snapshot file opened for reading (it stays readable if deleted meanwhile)."""
        with self._lock(stepper.name):
            self._require_files(stepper)
            f = self.store.open_snapshot(stepper.name, snap)
            return f, os.fstat(f.fileno()).st_size

    def delete_snapshot(self, stepper: Stepper, snap: str) -> None:
        with self._lock(stepper.name):
            self._require_files(stepper)
            self.store.delete_snapshot(stepper.name, snap)


def _refuse_watched(stepper: Stepper) -> None:
    """409 ``stepper_watched`` for what a watched run's trainer must do (take or restore a
    snapshot: a command) or that it has none of (a checkpoint, a durability policy)."""
    if stepper.hosting == WATCHED:
        raise StepperWatched(
            f"stepper {stepper.name!r} is watched: its state lives in the training job, so "
            "it has no checkpoint here; snapshots are taken and restored by its trainer "
            f'(POST /v1/watch/{stepper.name}/commands {{"op": "snapshot"}} or "restore"); '
            "they are listed, downloaded and deleted here",
            kind=WATCHED,
        )
