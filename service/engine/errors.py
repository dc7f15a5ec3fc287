"""Engine exceptions: each carries the stable problem ``code`` the API layer reports.

The engine knows nothing of HTTP; ``adamscope.service.errors`` maps codes to statuses.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointTooLarge",
    "DeviceOutOfMemory",
    "DeviceUnavailable",
    "DtypeMismatch",
    "DuplicateName",
    "EngineError",
    "InvalidCheckpoint",
    "InvalidHyperparameter",
    "InvalidSpec",
    "InvalidState",
    "ShapeMismatch",
    "StepConflict",
    "StepperFrozen",
    "StepperWatched",
    "StepperExists",
    "StepperNotFound",
    "UnknownParameter",
]


class EngineError(Exception):
    code = "internal_error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class StepperNotFound(EngineError):
    code = "stepper_not_found"


class StepConflict(EngineError):
    code = "step_conflict"


class StepperFrozen(EngineError):
    """A step sent to a frozen stepper (an imported checkpoint kept as evidence)."""

    code = "stepper_frozen"


class StepperWatched(EngineError):
    """A step or an edit sent to a watched stepper (the optimizer lives in a training job)."""

    code = "stepper_watched"


class StepperExists(EngineError):
    code = "stepper_exists"


class UnknownParameter(EngineError):
    code = "unknown_parameter"


class DuplicateName(EngineError):
    code = "duplicate_name"


class ShapeMismatch(EngineError):
    code = "shape_mismatch"


class DtypeMismatch(EngineError):
    code = "dtype_mismatch"


class InvalidHyperparameter(EngineError):
    code = "invalid_hyperparameter"


class InvalidState(EngineError):
    code = "invalid_state"


class InvalidSpec(EngineError):
    code = "invalid_spec"


class DeviceUnavailable(EngineError):
    code = "device_unavailable"


class InvalidCheckpoint(EngineError):
    code = "invalid_checkpoint"


class DeviceOutOfMemory(EngineError):
    """The device (or its pinned host memory) could not hold what the request needs; raised
    with nothing changed, or with ``partial=True`` when PyTorch's update had begun."""

    code = "device_out_of_memory"


class CheckpointTooLarge(EngineError):
    """A checkpoint that no safetensors reader would accept back (never written)."""

    code = "persistence_failed"
