"""The engine: steppers and their registry (torch only; no HTTP, no pydantic, no inspection).

A :class:`Stepper` owns named parameters and a real ``torch.optim.Adam``/``AdamW``; the
:class:`Registry` holds a process's steppers by name. What observes a step (signals,
history) is installed from outside, as :class:`StepObserver` objects.
"""

from .errors import EngineError
from .observers import StepObserver
from .registry import Registry
from .spec import GroupDef
from .state import STATE_KEYS
from .stepper import StepOutcome, Stepper

__all__ = [
    "STATE_KEYS",
    "EngineError",
    "GroupDef",
    "Registry",
    "StepObserver",
    "StepOutcome",
    "Stepper",
]
