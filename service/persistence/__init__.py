"""Durability: the on-disk layout of the data directory, checkpoints, policies, snapshots.

:class:`Store` is the filesystem side (layout, atomic writes); :class:`Persistence` decides
when a stepper is written and coordinates disk and registry (see ``manager``).
"""

from .manager import Persistence, Track
from .store import CHECKPOINT_FILE, PersistenceFailed, SnapshotExists, SnapshotNotFound, Store

__all__ = [
    "CHECKPOINT_FILE",
    "Persistence",
    "PersistenceFailed",
    "SnapshotExists",
    "SnapshotNotFound",
    "Store",
    "Track",
]
