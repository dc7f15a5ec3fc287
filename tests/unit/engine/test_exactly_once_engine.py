"""Exactly-once stepping in the engine, without HTTP: idempotency keys and ``expected_step``.

A step carrying a key that was already applied is not applied again: its original outcome
comes back marked ``replayed``, and the stepper stays byte-identical. A step whose
``expected_step`` is not the stepper's step (older or newer) raises :class:`StepConflict`
saying where the stepper is, and changes nothing. Until now only the client tier (a real
server with dropped replies) checked either; these pin them where they are implemented.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_stepper import grad_for, make, snapshot

from adamscope.service.engine import StepOutcome, Stepper
from adamscope.service.engine import checkpoint as ckpt
from adamscope.service.engine.errors import EngineError, ShapeMismatch, StepConflict


def grads(stepper: Stepper, k: int, names: tuple[str, ...] = ("w", "b")) -> dict[str, Any]:
    return {n: grad_for(stepper.params[stepper.index[n]], k, i) for i, n in enumerate(names)}


def fresh() -> Stepper:
    return make("adam", foreach=False)[0]


def same_outcome(replay: StepOutcome, original: StepOutcome) -> None:
    assert replay.replayed and not original.replayed
    assert (replay.step, replay.stepped, replay.skipped) == (
        original.step,
        original.stepped,
        original.skipped,
    )


# ---------------------------------------------------------------------- idempotency keys


def test_a_retried_key_is_applied_once_and_replays_its_outcome() -> None:
    stepper = fresh()
    original = stepper.step(grads(stepper, 0), key="k1")
    assert (original.step, original.stepped, original.skipped) == (1, ["w", "b"], ["s"])
    after = snapshot(stepper)
    for _ in range(3):
        same_outcome(stepper.step(grads(stepper, 0), key="k1"), original)
        assert snapshot(stepper) == after
    assert stepper.step_count == 1


def test_the_retry_matches_one_local_step_bit_for_bit() -> None:
    stepper, optimizer, local = make("adam", foreach=False)
    g = {n: grad_for(p, 0, i) for i, (n, p) in enumerate(local.items())}
    stepper.step(g, key="k")
    stepper.step(g, key="k")
    for n, p in local.items():
        p.grad = g[n].clone()
    optimizer.step()
    _, params = stepper.get_params()
    _, state = stepper.get_state()
    for n, p in local.items():
        assert torch.equal(params[n], p.detach())
        assert all(torch.equal(state[n][k], v) for k, v in optimizer.state[p].items())


def test_an_old_key_replays_its_own_step_after_later_steps() -> None:
    stepper = fresh()
    first = stepper.step(grads(stepper, 0, ("w",)), key="k1")
    second = stepper.step(grads(stepper, 1), key="k2")
    assert (first.step, second.step) == (1, 2)
    after = snapshot(stepper)
    same_outcome(stepper.step(grads(stepper, 0, ("w",)), key="k1"), first)
    same_outcome(stepper.step(grads(stepper, 1), key="k2"), second)
    assert snapshot(stepper) == after and stepper.step_count == 2


def test_steps_without_a_key_or_with_new_keys_all_apply() -> None:
    stepper = fresh()
    g = grads(stepper, 0)
    assert [stepper.step(g).step for _ in range(2)] == [1, 2]
    assert [stepper.step(g, key=k).step for k in ("a", "b", "A")] == [3, 4, 5]
    assert stepper.step_count == 5


def test_a_reused_key_with_another_body_applies_nothing() -> None:
    """The key names the logical request: a different body under a spent key is not
    applied (the service answers with the original outcome; refusing outright would
    equally keep the stepper intact)."""
    stepper = fresh()
    original = stepper.step(grads(stepper, 0), key="k1")
    after = snapshot(stepper)
    try:
        outcome = stepper.step(grads(stepper, 7, ("s",)), key="k1")
    except EngineError:
        pass
    else:
        same_outcome(outcome, original)
    assert snapshot(stepper) == after


def test_a_refused_step_does_not_spend_its_key() -> None:
    stepper = fresh()
    bad = {**grads(stepper, 0), "b": torch.ones(2, 2)}
    with pytest.raises(ShapeMismatch):
        stepper.step(bad, key="k1")
    with pytest.raises(StepConflict):
        stepper.step(grads(stepper, 0), key="k1", expected_step=3)
    outcome = stepper.step(grads(stepper, 0), key="k1")
    assert not outcome.replayed and outcome.step == 1


def test_a_replay_wins_over_its_now_stale_expected_step() -> None:
    """A client retries with the same key *and* the same expected_step: once the first try
    was applied that step is stale, and the retry must still get the original outcome."""
    stepper = fresh()
    original = stepper.step(grads(stepper, 0), key="k1", expected_step=0)
    same_outcome(stepper.step(grads(stepper, 0), key="k1", expected_step=0), original)
    assert stepper.step_count == 1


def test_keys_survive_a_checkpoint_round_trip() -> None:
    stepper = fresh()
    original = stepper.step(grads(stepper, 0), key="k1")
    stepper.step(grads(stepper, 1), key="k2")
    restored = ckpt.build(ckpt.decode(ckpt.encode(stepper).data), torch.device("cpu"))
    after = snapshot(restored)
    same_outcome(restored.step(grads(restored, 0), key="k1"), original)
    assert snapshot(restored) == after and restored.step_count == 2
    assert not restored.step(grads(restored, 2), key="k3").replayed


def test_a_retried_contribution_counts_once() -> None:
    stepper = fresh()
    g0, g1 = grads(stepper, 0), grads(stepper, 1)
    assert stepper.contribute(0, 2, g0, key="w0") is None
    assert stepper.contribute(0, 2, g0, key="w0") is None  # the same contribution again
    assert stepper.pending_contributions() == [0]
    with pytest.raises(StepConflict, match="worker 0 already contributed to step 1"):
        stepper.contribute(0, 2, g1, key="w0-other")
    done = stepper.contribute(1, 2, g1, key="w1")
    assert done is not None and done.step == 1 and stepper.step_count == 1
    after = snapshot(stepper)
    for key, g in (("w0", g0), ("w1", g1)):  # both spent once the step is applied
        same_outcome(stepper.contribute(0, 2, g, key=key), done)  # type: ignore[arg-type]
        same_outcome(stepper.step(g, key=key), done)
    assert snapshot(stepper) == after and stepper.pending_contributions() == []


def test_a_retried_contribution_keeps_the_first_body_and_changes_nothing() -> None:
    """A retry (same worker, same key) is the first contribution again: whatever body it
    carries, the first one is what the step averages, and the retry changes nothing (not
    even the version readers cache on). Found by mutation testing: answering a retry by
    storing it again passed every other test."""
    stepper, twin = fresh(), fresh()
    g0, g1, other = grads(stepper, 0), grads(stepper, 1), grads(stepper, 7)
    assert stepper.contribute(0, 2, g0, key="w0") is None
    version = stepper.version
    assert stepper.contribute(0, 2, other, key="w0") is None  # a retry with another body
    assert stepper.version == version
    assert stepper.contribute(1, 2, g1, key="w1") is not None
    assert twin.contribute(0, 2, g0, key="w0") is None
    assert twin.contribute(1, 2, g1, key="w1") is not None
    assert snapshot(stepper) == snapshot(twin)


# ---------------------------------------------------------------------- expected_step


@pytest.mark.parametrize("expected", [0, 1, 3, 4, 1000])
def test_a_stale_or_future_expected_step_is_refused_and_changes_nothing(expected: int) -> None:
    stepper = fresh()
    for k in range(2):
        stepper.step(grads(stepper, k))
    before = snapshot(stepper)
    for call in (
        lambda: stepper.step(grads(stepper, 5), expected_step=expected),
        lambda: stepper.step(grads(stepper, 5), key="k", expected_step=expected),
        lambda: stepper.contribute(0, 2, grads(stepper, 5), expected_step=expected),
    ):
        with pytest.raises(StepConflict) as info:
            call()
        assert info.value.extra["current_step"] == 2
        assert f"built on step {expected}, but stepper 's' is at step 2" in info.value.detail
        assert snapshot(stepper) == before
    assert stepper.pending_contributions() == []


def test_the_current_expected_step_applies() -> None:
    stepper = fresh()
    assert stepper.step(grads(stepper, 0), expected_step=0).step == 1
    assert stepper.step(grads(stepper, 1), expected_step=1).step == 2
    assert stepper.contribute(0, 1, grads(stepper, 2), expected_step=2) is not None
    assert stepper.step_count == 3
