"""Alert rules on the per-step signals, evaluated after every step.

A rule (:class:`adamscope.client.protocol.AlertRule`) is a condition on one signal of one tensor, of
every tensor (``"*"``) or of the stepper's aggregate (``None``). Alerts are edge-triggered:
an event is raised when a rule starts to hold for a tensor, and not again until it has
stopped holding, so a NaN that stays in a moment raises one event, not one per step.

The rules live in the stepper's journal (persisted with its checkpoints and snapshots); a
stepper that never had rules set uses :data:`DEFAULT_RULES`. The events (bounded) and the
rules' state live in memory only.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from adamscope.client.protocol import AlertRule

from .kernels.local import TOP_K
from .optimizer import OptimizerState

__all__ = [
    "DEFAULT_RULES",
    "JOURNAL_KEY",
    "Alerts",
    "RuleCache",
    "attach_tops",
    "parse_rules",
    "rules_of",
    "set_rules",
]

#: Where a stepper's rules are kept in ``Stepper.journal`` (a list of rule dicts).
JOURNAL_KEY = "alert_rules"

#: NaN/Inf appears in any tensor; the effective LR's p99 of a tensor changes by more than
#: 50% in one step beyond what the schedule explains (a swing of an ``lr_eff`` signal is
#: judged against the previous value times the ratio of ``lr_scale``, the step size times
#: sqrt(bc2), between the two steps: a scheduler's lr change or bias correction moves
#: every element's effective LR by exactly that when v and eps do not); the
#: second-moment shock p99 of a tensor exceeds 100; more than 0.1% of a tensor's elements
#: saw their effective LR fall by more than 2x beyond the schedule in one step (a v jump
#: in a few rows, which no quantile shows: see :mod:`.kernels.local`; the signal is NaN,
#: and the rule quiet, for tensors beyond the localized signals' budget). The swing and
#: the shock wait out a 10-step warm-up: bias correction alone moves the effective LR by up
#: to 47% at step 2, and early on v_hat averages so few squared gradients that g^2 / v_hat
#: is heavy-tailed (at step 2 it is a ratio of two squared normals, whose p99 is about
#: 4000). The localized rule waits 100 steps: an element's v_hat at step t averages about
#: t squared gradients, so its effective LR halves when one gradient is about sqrt(3t)
#: times its RMS; at steps 11 to 15 of the quick start's MLP that happened to 0.2-1.6% of
#: some tensors' elements (a benign run), from step 100 on it takes a 17-fold gradient.
DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule(kind="nonfinite", tensor="*"),
    AlertRule(kind="swing", signal="lr_eff_p99", tensor="*", threshold=0.5, after_step=10),
    AlertRule(kind="above", signal="shock_p99", tensor="*", threshold=100.0, after_step=10),
    AlertRule(kind="above", signal="lr_fell_frac", tensor="*", threshold=0.001, after_step=100),
)

#: The signal by which the schedule scales the effective LR (see :func:`_schedule_ratio`).
SCALE = "lr_scale"

#: Signals a ``nonfinite`` rule without a signal adds up.
FAULT_COUNTS = ("nan_count", "inf_count")


def parse_rules(raw: Sequence[Any]) -> list[AlertRule]:
    """Rules as a journal keeps them (dicts); one an older version wrote that no longer
    validates is ignored."""
    rules = []
    for r in raw:
        try:
            rules.append(AlertRule.model_validate(r))
        except ValueError:
            continue
    return rules


class RuleCache:
    """One optimizer's rules, parsed once per change of its journal entry (a change
    replaces the entry's list whole, so the list object says whether it changed)."""

    def __init__(self) -> None:
        self._raw: object = None
        self._rules: list[AlertRule] = []

    def of(self, journal: Mapping[str, Any]) -> tuple[list[AlertRule], bool]:
        """The rules and whether they are the defaults."""
        raw = journal.get(JOURNAL_KEY)
        if raw is None:
            return list(DEFAULT_RULES), True
        if raw is not self._raw:
            self._rules, self._raw = parse_rules(raw), raw
        return self._rules, False


def set_rules(opt: OptimizerState, rules: Sequence[AlertRule] | None) -> None:
    """Replace the optimizer's rules (None: back to the defaults): a change of it, written
    with its next checkpoint; its last step is judged by the rules it was taken under."""
    opt.set_journal(
        JOURNAL_KEY, None if rules is None else [r.model_dump(mode="json") for r in rules]
    )


class Alerts:
    """One stepper's alert state: the previous value of every signal (for swings), the
    (rule, tensor) pairs that hold, and the latest ``max_events`` events."""

    def __init__(self, max_events: int = 1000) -> None:
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self.count = 0
        #: (rule label, tensor) -> step since which it holds
        self.active: dict[tuple[str, str | None], int] = {}
        self._previous: dict[str | None, dict[str, float]] = {}
        self._rules_seen: list[AlertRule] | None = None

    def reset(self) -> None:
        """Forget previous values and which rules hold (the stepper went back in time)."""
        self._previous.clear()
        self.active.clear()

    def evaluate(
        self,
        rules: Sequence[AlertRule],
        stepper: str,
        step: int,
        seq: int,
        when: float,
        aggregate: Mapping[str, float],
        tensors: Mapping[str, Mapping[str, float]],
    ) -> list[dict[str, Any]]:
        """The events ``rules`` raise at this step; then remember this step's values."""
        if self._rules_seen != list(rules):  # new rules start from a clean slate
            self.active.clear()
            self._rules_seen = list(rules)
        raised: list[dict[str, Any]] = []
        for rule in rules:
            if step <= rule.after_step:
                continue
            targets: list[tuple[str | None, Mapping[str, float]]]
            if rule.tensor is None:
                targets = [(None, aggregate)]
            elif rule.tensor == "*":
                targets = list(tensors.items())
            elif rule.tensor in tensors:
                targets = [(rule.tensor, tensors[rule.tensor])]
            else:
                targets = []  # that tensor did not step
            label = rule.label()
            for tensor, values in targets:
                hit = self._check(rule, tensor, values)
                key = (label, tensor)
                if hit is None:
                    self.active.pop(key, None)
                    continue
                if key in self.active:
                    continue
                self.active[key] = step
                value, previous = hit
                event = {
                    "seq": seq,
                    "stepper": stepper,
                    "step": step,
                    "time": when,
                    "rule": label,
                    "kind": rule.kind,
                    "signal": rule.signal,
                    "tensor": tensor,
                    "value": value,
                    "previous": previous,
                    "threshold": rule.threshold,
                    "top": None,  # the elements: see attach_tops
                }
                raised.append(event)
        for tensor, values in [(None, aggregate), *tensors.items()]:
            self._previous.setdefault(tensor, {}).update(values)
        self.events.extend(raised)
        self.count += len(raised)
        return raised

    def _check(
        self, rule: AlertRule, tensor: str | None, values: Mapping[str, float]
    ) -> tuple[float, float | None] | None:
        """``(value, previous)`` when the rule holds for these values, else None."""
        if rule.kind == "nonfinite":
            if rule.signal is not None:
                v = values.get(rule.signal)
                return (float(v), None) if v is not None and not math.isfinite(v) else None
            faults = sum(float(values.get(k, 0.0)) for k in FAULT_COUNTS)
            return (faults, None) if faults > 0 else None
        assert rule.signal is not None and rule.threshold is not None
        v = values.get(rule.signal)
        if v is None or math.isnan(v):
            return None
        if rule.kind == "above":
            return (v, None) if v > rule.threshold else None
        if rule.kind == "below":
            return (v, None) if v < rule.threshold else None
        before = self._previous.get(tensor, {})
        prev = before.get(rule.signal)
        if prev is None or not (math.isfinite(prev) and math.isfinite(v)):
            return None
        ratio = _schedule_ratio(rule.signal, values, before)
        if ratio is None:
            return None  # the schedule took the effective LR to or from 0: nothing to judge
        # The part of the change the schedule does not explain.
        expected = prev * ratio
        change = (
            abs(v - expected) / abs(expected) if expected != 0 else (math.inf if v != 0 else 0.0)
        )
        return (v, prev) if change > rule.threshold else None

    def at(self, seq: int) -> list[dict[str, Any]]:
        """The events raised by the step with sequence number ``seq`` (if still kept)."""
        out = []
        for e in reversed(self.events):
            if e["seq"] < seq:
                break
            if e["seq"] == seq:
                out.append(e)
        out.reverse()
        return out

    def brief(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "active": len(self.active),
            "latest": dict(self.events[-1]) if self.events else None,
        }

    def active_list(self) -> list[dict[str, Any]]:
        return [
            {"rule": r, "tensor": t, "since_step": s}
            for (r, t), s in sorted(self.active.items(), key=lambda kv: (kv[1], kv[0][0]))
        ]


def _schedule_ratio(
    signal: str, values: Mapping[str, float], before: Mapping[str, float]
) -> float | None:
    """How much the schedule alone moved ``signal`` since the previous step: for the
    effective LR's signals the ratio of ``lr_scale`` (step size x sqrt(bc2): lr and bias
    correction), 1.0 for any other signal or where the scale is unknown; None where the
    scale is 0 at either step (lr 0)."""
    if not signal.startswith("lr_eff"):
        return 1.0
    now, then = values.get(SCALE), before.get(SCALE)
    if now is None or then is None or not (math.isfinite(now) and math.isfinite(then)):
        return 1.0
    if now == 0 or then == 0:
        return None
    return now / then


def attach_tops(
    events: Sequence[dict[str, Any]], tops: Mapping[str, Mapping[str, Mapping[str, Any]]]
) -> None:
    """Keep with each event on a tensor that tensor's top elements at the step (the
    localized signals' ``local.top``, :data:`.kernels.local.TOP_K` per kind), so that the
    event still names the elements once later steps have replaced the signals. Bounded:
    at most ``2 * TOP_K`` indices and values per event, and the events are bounded."""
    for e in events:
        found = tops.get(e["tensor"]) if e["tensor"] is not None else None
        if not found:
            continue
        e["top"] = {
            kind: {"index": list(v["index"][:TOP_K]), "value": list(v["value"][:TOP_K])}
            for kind, v in found.items()
        }


def rules_of(opt: OptimizerState) -> tuple[list[AlertRule], bool]:
    """The optimizer's alert rules and whether they are the defaults (parsed now; the
    recorder keeps them parsed between changes)."""
    return RuleCache().of(opt.journal)
