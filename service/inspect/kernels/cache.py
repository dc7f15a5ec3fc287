"""The effective LR each tensor's sample had after the last step, kept for the next one
(gamma compares the two): valid while the state is the one that step left."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adamscope.client.numerics import Factors

from .sampling import Layout

__all__ = ["SignalCache", "Token", "cache_key"]


@dataclass(frozen=True)
class Token:
    """Identifies a state as a step left it: the same tensors, ``step`` not advanced."""

    v: weakref.ref[torch.Tensor]
    step: weakref.ref[torch.Tensor]
    version: int

    @staticmethod
    def of(state: Mapping[str, Any]) -> Token | None:
        v, step = state.get("exp_avg_sq"), state.get("step")
        if v is None or step is None:
            return None
        return Token(weakref.ref(v), weakref.ref(step), step._version)

    def holds(self, state: Mapping[str, Any]) -> bool:
        step = state.get("step")
        return (
            self.v() is state.get("exp_avg_sq")
            and self.step() is step
            and step is not None
            and step._version == self.version
        )


def cache_key(layout: Layout) -> tuple[Any, ...]:
    return (layout.key, tuple(layout.plans))


@dataclass
class SignalCache:
    """The effective LR each tensor's sample had after the last observed step, valid while
    its state is the one that step left (same tensors, step not advanced)."""

    layout_key: tuple[Any, ...] | None = None
    lr_eff: torch.Tensor | None = None
    tokens: list[Token | None] = field(default_factory=list)
    #: The previous v (and the factors it had) of the tensors the localized signals cover,
    #: by name, each valid while its token holds (whatever else stepped with it).
    local: dict[str, tuple[torch.Tensor, Factors]] = field(default_factory=dict)
    local_tokens: dict[str, Token | None] = field(default_factory=dict)

    def carried(self, stepping: set[str]) -> SignalCache:
        """A cache holding only the kept v of tensors not in ``stepping`` (they keep it
        through a step they skip: their state does not change)."""
        names = [n for n in self.local if n not in stepping]
        return SignalCache(
            local={n: self.local[n] for n in names},
            local_tokens={n: self.local_tokens.get(n) for n in names},
        )

    def local_for(self, entries: Sequence[Any]) -> dict[str, tuple[torch.Tensor, Factors]]:
        """The kept previous v of those of ``entries`` (name, state) still valid."""
        out = {}
        for e in entries:
            tok = self.local_tokens.get(e.name)
            if tok is not None and e.name in self.local and tok.holds(e.state):
                out[e.name] = self.local[e.name]
        return out

    def valid(self, layout: Layout, states: Sequence[Mapping[str, Any]]) -> list[bool]:
        if self.layout_key != cache_key(layout) or self.lr_eff is None:
            return [False] * len(states)
        return [
            tok is not None and tok.holds(s) for s, tok in zip(states, self.tokens, strict=True)
        ]
