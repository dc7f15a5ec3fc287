"""The idempotency journal: which keyed steps a stepper applied, kept small enough to travel
in every checkpoint however long the run and however many parameters the stepper has.

A retried step (same ``Idempotency-Key``) must be answered with its original outcome: the
step it applied and which parameters stepped or skipped. For each of the last
:data:`JOURNAL_KEYS` keys the journal keeps

* a 16-byte BLAKE2b digest of the key (keys may be 200 characters; digests are fixed),
* the step it applied,
* which parameters stepped: nothing when all of them did (a training loop's every step),
  else a reference into a table of distinct *stepped sets*, each a bitmask over the
  stepper's parameter order (one bit per parameter, shared by every key that stepped it).

The table holds at most :data:`SETS_BUDGET` bytes of bitmasks; a key whose set does not fit
pushes the oldest keys out (never the newest), so a stepper whose steps each stepped a
different subset of very many parameters remembers fewer keys, and the journal stays bounded
either way: at most ``JOURNAL_KEYS * ~40`` bytes of entries plus ``max(SETS_BUDGET, P/8)``
bytes of sets in its JSON form, independent of the step count.

Persisted form (the checkpoint header's ``idempotency`` field), compact JSON::

    {"version": 1, "digests": "<base64 of 16 bytes per key, oldest first>",
     "steps": [first key's step, then each key's step minus the one before],
     "sets": ["<base64 bitmask>", ...],
     "refs": [..per key: -1 (all stepped) or an index into sets..]}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["JOURNAL_KEYS", "SETS_BUDGET", "JournalError", "KeyJournal"]

#: Idempotency keys remembered per stepper (oldest forgotten first).
JOURNAL_KEYS = 4096
#: Bytes of distinct stepped-set bitmasks kept (a 100,000-parameter stepper: 20 sets).
SETS_BUDGET = 256 * 1024
DIGEST_BYTES = 16
FORMAT_VERSION = 1


class JournalError(ValueError):
    """A persisted journal that cannot be read (the checkpoint is invalid)."""


def digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=DIGEST_BYTES).digest()


class KeyJournal:
    """The journal of one stepper, over its parameter ``names`` (in the stepper's order).
    Not thread-safe: the stepper changes and reads it under its lock."""

    def __init__(self, names: Sequence[str], sets_budget: int = SETS_BUDGET) -> None:
        self._names = list(names)
        self._budget = sets_budget
        self._index = {n: i for i, n in enumerate(self._names)}
        #: digest -> (step, stepped-set bitmask or None for "every parameter")
        self._entries: OrderedDict[bytes, tuple[int, bytes | None]] = OrderedDict()
        #: bitmask -> number of entries that use it
        self._sets: dict[bytes, int] = {}
        self._set_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return digest(key) in self._entries

    # ------------------------------------------------------------------ changes

    def remember(self, key: str, step: int, stepped: Sequence[str]) -> None:
        """Record that ``key`` applied ``step``, stepping the parameters ``stepped``."""
        self._add(digest(key), step, self._mask(stepped))

    def _mask(self, stepped: Sequence[str]) -> bytes | None:
        if len(stepped) == len(self._names):
            return None
        bits = bytearray((len(self._names) + 7) // 8)
        for n in stepped:
            i = self._index[n]
            bits[i >> 3] |= 1 << (i & 7)
        return bytes(bits)

    def _add(self, d: bytes, step: int, mask: bytes | None) -> None:
        if d in self._entries:
            self._drop(d)
        self._entries[d] = (step, mask)
        if mask is not None:
            count = self._sets.get(mask, 0)
            if count == 0:
                self._set_bytes += len(mask)
            self._sets[mask] = count + 1
        while len(self._entries) > 1 and (
            len(self._entries) > JOURNAL_KEYS or self._set_bytes > self._budget
        ):
            self._drop(next(iter(self._entries)))

    def _drop(self, d: bytes) -> None:
        _, mask = self._entries.pop(d)
        if mask is not None:
            count = self._sets[mask] - 1
            if count:
                self._sets[mask] = count
            else:
                del self._sets[mask]
                self._set_bytes -= len(mask)

    # ------------------------------------------------------------------ reads

    def lookup(self, key: str) -> tuple[int, list[str], list[str]] | None:
        """``(step, stepped, skipped)`` of the step ``key`` applied, or None."""
        found = self._entries.get(digest(key))
        if found is None:
            return None
        step, mask = found
        if mask is None:
            return step, list(self._names), []
        stepped = [n for i, n in enumerate(self._names) if mask[i >> 3] >> (i & 7) & 1]
        taken = set(stepped)
        return step, stepped, [n for n in self._names if n not in taken]

    # ------------------------------------------------------------------ persisted form

    def to_json(self) -> dict[str, Any]:
        sets: dict[bytes, int] = {}
        refs = []
        steps = []
        last = 0
        for step, mask in self._entries.values():
            refs.append(-1 if mask is None else sets.setdefault(mask, len(sets)))
            steps.append(step - last)  # consecutive steps: 1s, whatever the step count
            last = step
        return {
            "version": FORMAT_VERSION,
            "digests": base64.b64encode(b"".join(self._entries)).decode("ascii"),
            "steps": steps,
            "sets": [base64.b64encode(m).decode("ascii") for m in sets],
            "refs": refs,
        }

    def load_json(self, data: Any) -> None:
        """Replace the journal with a persisted one (raises :class:`JournalError`)."""
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise JournalError(
                f"the idempotency journal must be an object of version {FORMAT_VERSION}"
            )
        try:
            raw = base64.b64decode(data.get("digests", ""), validate=True)
            sets = [base64.b64decode(s, validate=True) for s in data.get("sets", [])]
        except (binascii.Error, TypeError, ValueError):
            raise JournalError("the idempotency journal's digests or sets are not base64") from None
        steps, refs = data.get("steps"), data.get("refs")
        n = len(raw) // DIGEST_BYTES
        width = (len(self._names) + 7) // 8
        if (
            len(raw) % DIGEST_BYTES
            or not isinstance(steps, list)
            or not isinstance(refs, list)
            or len(steps) != n
            or len(refs) != n
            or any(len(s) != width for s in sets)
        ):
            raise JournalError(
                "the idempotency journal's digests, steps, refs and sets do "
                "not fit together or the stepper's parameters"
            )
        self._reset()
        step = 0
        for i in range(n):
            delta, ref = steps[i], refs[i]
            if not _is_int(delta) or not _is_int(ref) or not -1 <= ref < len(sets):
                raise JournalError(f"the idempotency journal's entry {i} is invalid")
            step += delta
            self._add(
                raw[i * DIGEST_BYTES : (i + 1) * DIGEST_BYTES],
                step,
                None if ref == -1 else sets[ref],
            )

    def load_legacy(self, keys: Mapping[str, Any]) -> None:
        """Adopt a journal as versions before this one kept it (``extra["keys"]``: key ->
        ``{"step", "stepped", "skipped"}``); entries that do not fit are dropped."""
        self._reset()
        for key, entry in keys.items():
            if not isinstance(entry, dict) or not _is_int(entry.get("step")):
                continue
            stepped = entry.get("stepped")
            if not isinstance(stepped, list) or not all(n in self._index for n in stepped):
                continue
            self.remember(str(key), entry["step"], stepped)

    def _reset(self) -> None:
        self._entries.clear()
        self._sets.clear()
        self._set_bytes = 0


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
