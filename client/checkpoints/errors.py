"""Exceptions raised while reading or writing optimizer checkpoints.

    CheckpointError (ValueError)
    ├── CheckpointFormatError     the files are not the format asked for, or are malformed
    ├── UnsafeCheckpointError     a pickle wanted to run code or load a class we do not allow
    ├── NameMappingError          parameter names cannot be tied to the optimizer's entries
    └── OptimizerKindError        Adam and AdamW cannot be told apart from what was saved

All subclass ``ValueError`` so that callers treating a bad file as bad input keep working,
and :class:`~adamscope.client.errors.AdamscopeError`, the base of every error the client
raises.
"""

from __future__ import annotations

from ..errors import AdamscopeError

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "NameMappingError",
    "OptimizerKindError",
    "UnsafeCheckpointError",
]


class CheckpointError(AdamscopeError, ValueError):
    """Base class: the checkpoint cannot be read or written as asked."""


class CheckpointFormatError(CheckpointError):
    """The path does not hold the expected format, or its content is malformed."""


class UnsafeCheckpointError(CheckpointError):
    """Loading would have needed unrestricted unpickling; nothing was executed."""


class NameMappingError(CheckpointError):
    """Parameter names could not be matched to the optimizer's parameters unambiguously."""


class OptimizerKindError(CheckpointError):
    """The saved options do not say whether the optimizer was Adam or AdamW."""
