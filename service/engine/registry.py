"""The registry: every stepper this process hosts, by name."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import StepperExists, StepperNotFound
from .stepper import Stepper

__all__ = ["Registry"]


class Registry:
    """Name -> :class:`Stepper`. Creation and deletion are serialized; lookups are cheap."""

    def __init__(self) -> None:
        self._steppers: dict[str, Stepper] = {}
        self._lock = threading.Lock()
        #: Called with every stepper about to be registered (created, imported or restored),
        #: under the registry lock; one that raises keeps the stepper out.
        self.hooks: list[Callable[[Stepper], object]] = []

    def get(self, name: str) -> Stepper:
        try:
            return self._steppers[name]
        except KeyError:
            raise StepperNotFound(f"no stepper named {name!r}", stepper=name) from None

    def list(self) -> list[Stepper]:
        return [self._steppers[k] for k in sorted(self._steppers)]

    def create(self, name: str, build: Callable[[], Stepper]) -> Stepper:
        """Register the stepper ``build()`` returns under ``name`` unless the name is taken.

        ``build`` runs under the registry lock so two racing creates cannot both succeed; it
        does all validation, so a failed build registers nothing. The hooks then see the
        stepper before anyone else can (the app factory installs the one that gives every
        stepper its signals and history: the engine itself knows nothing of inspection).
        """
        with self._lock:
            if name in self._steppers:
                raise StepperExists(f"a stepper named {name!r} already exists", stepper=name)
            stepper = build()
            for hook in self.hooks:
                hook(stepper)
            self._steppers[name] = stepper
            return stepper

    def delete(self, name: str) -> Stepper:
        with self._lock:
            try:
                return self._steppers.pop(name)
            except KeyError:
                raise StepperNotFound(f"no stepper named {name!r}", stepper=name) from None

    def __len__(self) -> int:
        return len(self._steppers)
