"""The idempotency journal, and the bound on a checkpoint's header.

- A key is answered with the step it applied and exactly which parameters stepped and
  skipped, in memory and after the journal travelled through a checkpoint.
- The journal's persisted form is bounded whatever the number of steps and however long
  or many the parameter names are: 4,096 keys at most, the stepped sets within their
  budget (the newest key always kept), and a checkpoint's size no longer grows per step.
- Journals as older versions wrote them (full name lists in ``extra``) are adopted.
- A damaged journal makes the checkpoint invalid (422), never a crash.
- ``header_bound`` really bounds a checkpoint's header, and ``check_header_room`` refuses
  a stepper whose checkpoint no safetensors reader could read back.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from adamscope.client import codec
from adamscope.client.protocol import META_CHECKPOINT
from adamscope.service.engine import Stepper
from adamscope.service.engine import checkpoint as ckpt
from adamscope.service.engine.errors import InvalidCheckpoint, InvalidSpec
from adamscope.service.engine.journal import JOURNAL_KEYS, SETS_BUDGET, JournalError, KeyJournal

CPU = torch.device("cpu")
NAMES = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(40)]


def test_lookup_answers_the_step_and_exactly_what_stepped_and_skipped() -> None:
    j = KeyJournal(NAMES)
    j.remember("all", 1, NAMES)
    j.remember("some", 2, [NAMES[3], NAMES[0], NAMES[39]])
    j.remember("none", 3, [])
    assert j.lookup("all") == (1, NAMES, [])
    step, stepped, skipped = j.lookup("some")  # type: ignore[misc]
    assert (step, stepped) == (2, [NAMES[0], NAMES[3], NAMES[39]])  # in stepper order
    assert skipped == [n for n in NAMES if n not in stepped]
    assert j.lookup("none") == (3, [], NAMES)
    assert j.lookup("unknown") is None and "some" in j and "unknown" not in j


def test_keys_are_forgotten_oldest_first_at_the_key_limit() -> None:
    j = KeyJournal(NAMES)
    for k in range(JOURNAL_KEYS + 10):
        j.remember(f"key-{k}", k + 1, NAMES)
    assert len(j) == JOURNAL_KEYS
    assert j.lookup("key-9") is None and j.lookup("key-10") == (11, NAMES, [])
    assert j.lookup(f"key-{JOURNAL_KEYS + 9}") == (JOURNAL_KEYS + 10, NAMES, [])


def test_persisted_journal_is_bounded_independently_of_steps_and_names() -> None:
    """A stepper of 723 long names whose every step stepped a different subset: the
    journal's JSON stays within its budget, after 10,000 steps as after 5,000."""
    names = [f"model.layers.{i // 9}.{'x' * 200}.{i}" for i in range(723)]
    j = KeyJournal(names)
    rng = random.Random(0)
    sizes = []
    for k in range(1, 5_001):
        bits = rng.getrandbits(len(names))
        stepped = [n for i, n in enumerate(names) if bits >> i & 1]
        j.remember(f"{k:0200d}", k, stepped)
        if k in (4_000, 5_000):
            sizes.append(len(json.dumps(j.to_json())))
    bound = JOURNAL_KEYS * 40 + 2 * (SETS_BUDGET + len(names) // 8 + 1)
    assert max(sizes) < bound < 1_000_000
    assert sizes[0] == sizes[1]
    # The newest key is kept, and answers exactly.
    assert j.lookup(f"{5_000:0200d}") == (5_000, stepped, [n for n in names if n not in stepped])
    assert j.lookup(f"{1:0200d}") is None


def test_one_set_larger_than_the_budget_keeps_the_newest_key() -> None:
    names = [f"p{i}" for i in range(8 * 64 + 8)]
    j = KeyJournal(names, sets_budget=64)
    j.remember("a", 1, names[:3])
    j.remember("b", 2, names[:4])
    assert j.lookup("a") is None
    assert j.lookup("b") == (2, names[:4], names[4:])


def test_json_round_trip_and_legacy_journals() -> None:
    j = KeyJournal(NAMES)
    for k in range(1, 30):
        j.remember(f"k{k}", k, NAMES[: k % 7 + 34])
    back = KeyJournal(NAMES)
    back.load_json(json.loads(json.dumps(j.to_json())))
    assert all(back.lookup(f"k{k}") == j.lookup(f"k{k}") for k in range(1, 30))
    legacy = KeyJournal(NAMES)
    legacy.load_legacy(
        {
            "old": {"step": 4, "stepped": NAMES[:2], "skipped": NAMES[2:]},
            "bad": {"step": "x"},
            "foreign": {"step": 5, "stepped": ["nope"]},
        }
    )
    assert legacy.lookup("old") == (4, NAMES[:2], NAMES[2:])
    assert legacy.lookup("bad") is None and legacy.lookup("foreign") is None


@pytest.mark.parametrize(
    "damage",
    [
        {"version": 2},
        {"digests": "!!"},
        {"steps": [1, 2]},
        {"sets": ["AAA="]},
        {"refs": [7]},
        {"steps": ["one"]},
    ],
)
def test_a_damaged_journal_is_an_invalid_checkpoint(damage: dict[str, object]) -> None:
    j = KeyJournal(NAMES)
    j.remember("k", 1, NAMES[:5])
    data = {**j.to_json(), **damage}
    with pytest.raises(JournalError):
        KeyJournal(NAMES).load_json(data)
    stepper = Stepper("s", "adam", CPU, [(n, torch.zeros(2)) for n in NAMES], {})
    stepper.step({n: torch.ones(2) for n in NAMES[:5]}, key="k")
    enc = ckpt.encode(stepper)
    tensors, meta = codec.decode(enc.data)
    header = json.loads(meta[META_CHECKPOINT])
    header["idempotency"] = {**header["idempotency"], **damage}
    bad = codec.encode(tensors, {**meta, META_CHECKPOINT: json.dumps(header)})
    with pytest.raises(InvalidCheckpoint, match="idempotency journal"):
        ckpt.build(ckpt.decode(bad), CPU)


def test_a_checkpoint_from_before_the_compact_journal_still_replays() -> None:
    stepper = Stepper("s", "adam", CPU, [(n, torch.zeros(2)) for n in NAMES[:3]], {})
    stepper.step({NAMES[0]: torch.ones(2)})
    enc = ckpt.encode(stepper)
    tensors, meta = codec.decode(enc.data)
    header = json.loads(meta[META_CHECKPOINT])
    del header["idempotency"]
    header["extra"] = {
        "keys": {"retry-me": {"step": 1, "stepped": [NAMES[0]], "skipped": NAMES[1:3]}},
        "alert_rules": [],
    }
    restored = ckpt.build(
        ckpt.decode(codec.encode(tensors, {**meta, META_CHECKPOINT: json.dumps(header)})), CPU
    )
    assert restored.journal == {"alert_rules": []}
    again = restored.step({NAMES[1]: torch.ones(2)}, key="retry-me")
    assert again.replayed and (again.step, again.stepped, again.skipped) == (
        1,
        [NAMES[0]],
        NAMES[1:3],
    )
    assert restored.step_count == 1


def test_checkpoint_size_does_not_grow_with_keyed_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    # saved_at is the write's time.time(): its repr's length varies (1765125049.1234567 vs
    # ...49.12345), which moves the 8-byte-padded header by 8 bytes; one fixed clock here.
    monkeypatch.setattr(ckpt.time, "time", lambda: 1_765_000_000.25)
    names = [f"model.layers.{i // 9}.self_attn.{'q' * 60}_{i}.weight" for i in range(200)]
    stepper = Stepper("s", "adam", CPU, [(n, torch.zeros(2)) for n in names], {"fused": True})
    grads = {n: torch.ones(2) for n in names}
    sizes = {}
    for k in range(1, 6):
        stepper.step(grads, key=f"key-{k}")
    for k in range(6, JOURNAL_KEYS + 501):  # what stepping records, without the stepping
        stepper.keys.remember(f"key-{k}", k, names)
        if k in (JOURNAL_KEYS, JOURNAL_KEYS + 500):
            sizes[k] = len(ckpt.encode(stepper).data)
    assert sizes[JOURNAL_KEYS] == sizes[JOURNAL_KEYS + 500]


def test_header_bound_bounds_a_full_checkpoint() -> None:
    """Every state tensor (amsgrad), a full journal of distinct sets, escaped names."""
    names = [f'layer "{i}" \\ é ☃ {"n" * (i % 50)}' for i in range(60)]
    shapes = [[i + 1, 3] for i in range(60)]
    stepper = Stepper(
        "s",
        "adam",
        CPU,
        [(n, torch.zeros(s)) for n, s in zip(names, shapes, strict=True)],
        {"amsgrad": True, "foreach": True},
    )
    stepper.step({n: torch.ones(s) for n, s in zip(names, shapes, strict=True)})
    rng = random.Random(1)
    for k in range(JOURNAL_KEYS + 5):
        stepper.keys.remember(f"{k:0200d}", k, [n for n in names if rng.random() < 0.7])
    data = ckpt.encode(stepper, {"durability": {"mode": "every_step"}}).data
    (header,) = struct.unpack("<Q", data[:8])
    assert header <= ckpt.header_bound(list(zip(names, shapes, strict=True)), 1)


def test_check_header_room_refuses_a_stepper_whose_checkpoint_could_not_be_read() -> None:
    ckpt.check_header_room([(f"p{i}", [4]) for i in range(1000)])  # fine
    long = [(f"{i:0500d}", [4]) for i in range(40_000)]
    assert ckpt.header_bound(long, 1) > codec.MAX_HEADER_BYTES
    with pytest.raises(InvalidSpec, match="safetensors readers accept"):
        ckpt.check_header_room(long)
