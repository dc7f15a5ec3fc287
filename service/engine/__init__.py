"""The framework-free engine: steppers and their registry (torch only; no HTTP)."""

from .errors import EngineError
from .registry import Registry
from .stepper import STATE_KEYS, GroupDef, StepObserver, StepOutcome, Stepper

__all__ = [
    "STATE_KEYS",
    "EngineError",
    "GroupDef",
    "Registry",
    "StepObserver",
    "StepOutcome",
    "Stepper",
]
