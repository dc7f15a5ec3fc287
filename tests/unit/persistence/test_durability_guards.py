"""Checkpoint and data-directory guards found by mutation testing (benchmarks/mutation.py):
each test here failed for a mutant of service/engine/checkpoint.py or service/persistence/
that the earlier tests let through.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from adamscope.client import codec
from adamscope.client.protocol import META_CHECKPOINT, Durability
from adamscope.service.engine import GroupDef, Registry, Stepper
from adamscope.service.engine import checkpoint as ckpt
from adamscope.service.engine.errors import (
    DeviceUnavailable,
    InvalidCheckpoint,
    StepperExists,
    StepperNotFound,
)
from adamscope.service.persistence import Persistence, PersistenceFailed, SnapshotNotFound, Store
from adamscope.service.persistence.store import AtomicFile

CPU = torch.device("cpu")


def make(name: str = "run", params: tuple[str, ...] = ("w", "b")) -> Stepper:
    return Stepper(
        name,
        "adam",
        CPU,
        [(n, torch.ones(2, 3) * (i + 1)) for i, n in enumerate(params)],
        {"lr": 0.1},
    )


def on_disk(p: Persistence, name: str) -> dict[str, Any]:
    with open(p.store.checkpoint_path(name), "rb") as f:
        return ckpt.header_from_prefix(f.read)


@pytest.fixture
def persistence(tmp_path: Path) -> Persistence:
    p = Persistence(tmp_path, Registry(), "cpu")
    p.restore_all()
    return p


# ---------------------------------------------------------------------- checkpoint format


def test_parameter_names_with_slashes_and_dots_round_trip() -> None:
    names = ("enc/layer.0/w", "b")
    stepper = make("run", names)
    stepper.step({n: torch.ones(2, 3) for n in names})
    back = ckpt.build(ckpt.decode(ckpt.encode(stepper).data), CPU)
    assert back.names == list(names)
    _, state = back.get_state()
    assert set(state["enc/layer.0/w"]) == {"step", "exp_avg", "exp_avg_sq"}


def test_two_steppers_built_from_one_checkpoint_share_no_journal() -> None:
    stepper = make()
    stepper.step({"w": torch.ones(2, 3)}, key="k0")
    saved = ckpt.decode(ckpt.encode(stepper).data)
    a, b = ckpt.build(saved, CPU, "a"), ckpt.build(saved, CPU, "b")
    assert not a.step({"w": torch.ones(2, 3)}, key="k1").replayed
    assert not b.step({"w": torch.ones(2, 3)}, key="k1").replayed  # a's key is a's
    assert b.step({"w": torch.ones(2, 3)}, key="k0").replayed  # the saved one is both's
    assert ckpt.build(saved, CPU, "c").step({"w": torch.ones(2, 3)}, key="k1").step == 2


def test_a_roll_back_drops_state_the_snapshot_did_not_have() -> None:
    stepper = make()
    stepper.step({"w": torch.ones(2, 3)})  # 'b' has no state yet
    saved = ckpt.decode(ckpt.encode(stepper).data)
    stepper.step({"w": torch.ones(2, 3), "b": torch.ones(2, 3)})
    created = stepper.created_at
    time.sleep(0.01)
    ckpt.load_into(stepper, saved)
    assert stepper.get_state(["b"])[1]["b"] == {}
    assert stepper.step_count == 1
    assert stepper.created_at == created  # a roll back keeps the stepper's own times
    assert stepper.updated_at > saved.header["updated_at"]


@pytest.mark.parametrize(
    ("other", "problem"),
    [
        (
            lambda: make("run", ("b", "w")),
            "different parameter names or order; different param groups",
        ),
        (
            lambda: Stepper(
                "run",
                "adam",
                CPU,
                [("w", torch.ones(2, 3)), ("b", torch.ones(2, 3))],
                {},
                [GroupDef(["w"]), GroupDef(["b"])],
            ),
            "different param groups",
        ),
        (
            lambda: Stepper(
                "run", "adamw", CPU, [("w", torch.ones(2, 3)), ("b", torch.ones(2, 3))], {}
            ),
            "optimizer 'adam' vs 'adamw'",
        ),
    ],
)
def test_a_roll_back_names_what_does_not_fit(other: Any, problem: str) -> None:
    saved = ckpt.decode(ckpt.encode(make()).data)
    with pytest.raises(InvalidCheckpoint) as info:
        ckpt.load_into(other(), saved)
    assert info.value.detail == f"checkpoint of 'run' does not fit stepper 'run': {problem}"


def _prefix_reader(data: bytes) -> Any:
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        chunk = data[pos : pos + n] if n >= 0 else data[pos:]
        pos += len(chunk)
        return chunk

    return read


def test_header_from_prefix_checks_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    good = ckpt.encode(make()).data
    (n,) = struct.unpack("<Q", good[:8])
    assert ckpt.header_from_prefix(_prefix_reader(good))["stepper"] == "run"
    cases = [
        (b"\x01\x02", "file too short for a safetensors header"),
        (struct.pack("<Q", 2**64 - 1), f"safetensors header of {2**64 - 1} bytes is too large"),
        (good[: 8 + n - 1], "file ends inside its safetensors header"),
        (struct.pack("<Q", 4) + b"[1] ", "safetensors header must be a JSON object"),
        (struct.pack("<Q", 4) + b"{}  ", "safetensors __metadata__ must map strings to strings"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "safetensors header is not valid JSON"),
    ]
    for data, message in cases:
        with pytest.raises(InvalidCheckpoint) as info:
            ckpt.header_from_prefix(_prefix_reader(data))
        assert info.value.detail.startswith(message), info.value.detail
    # The ceiling itself is allowed, one byte more is not.
    monkeypatch.setattr(codec, "MAX_HEADER_BYTES", n)
    assert ckpt.header_from_prefix(_prefix_reader(good))["stepper"] == "run"
    monkeypatch.setattr(codec, "MAX_HEADER_BYTES", n - 1)
    with pytest.raises(InvalidCheckpoint, match="too large"):
        ckpt.header_from_prefix(_prefix_reader(good))


def test_a_state_tensor_name_lists_the_keys_it_may_end_with() -> None:
    tensors, meta = codec.decode(ckpt.encode(make()).data)
    tensors["state/w/momentum"] = torch.zeros(2, 3)
    with pytest.raises(InvalidCheckpoint) as info:
        ckpt.decode(codec.encode(tensors, meta))
    assert info.value.detail == (
        "checkpoint tensor 'state/w/momentum' is not 'state/<parameter>/<key>' with key one "
        "of step, exp_avg, exp_avg_sq, max_exp_avg_sq"
    )


# ---------------------------------------------------------------------- persistence


def test_an_imported_checkpoint_keeps_its_durability_policy(persistence: Persistence) -> None:
    data = ckpt.encode(make("src"), {"durability": {"mode": "every_n", "n": 7}}).data
    s = persistence.import_checkpoint(ckpt.decode(data), "copy")
    assert persistence.describe(s)["durability"] == {"mode": "every_n", "n": 7, "seconds": None}
    assert on_disk(persistence, "copy")["durability"]["n"] == 7


def test_an_import_on_an_unavailable_device_is_refused(persistence: Persistence) -> None:
    data = ckpt.encode(make("src")).data
    with pytest.raises(DeviceUnavailable):
        persistence.import_checkpoint(ckpt.decode(data), "copy", device="cuda:99")
    assert len(persistence.registry) == 0


def test_restoring_logs_an_unusable_device_and_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(tmp_path)
    store.open()
    data = ckpt.encode(make("odd"), {"durability": {"mode": "every_n"}}).data  # n missing
    tensors, meta = codec.decode(data)
    header = json.loads(meta[META_CHECKPOINT])
    header["device"] = "cuda:99"
    store.write_checkpoint(
        "odd", codec.encode(tensors, {**meta, META_CHECKPOINT: json.dumps(header)})
    )
    p = Persistence(tmp_path, Registry(), "cpu", Durability(mode="manual"))
    with caplog.at_level(logging.WARNING, logger="adamscope.persistence"):
        p.restore_all()
    assert p.restored == ["odd"] and p.registry.get("odd").device == CPU
    assert p.describe(p.registry.get("odd"))["durability"]["mode"] == "manual"
    messages = [r.getMessage() for r in caplog.records]
    assert "device cuda:99 is not available here; restoring on cpu" in messages
    assert (
        "checkpoint of 'odd' has an invalid durability policy {'mode': 'every_n'}; using manual"
    ) in messages


@pytest.mark.parametrize(
    "policy", [Durability(mode="every_n", n=100), Durability(mode="interval", seconds=3600)]
)
def test_a_restored_snapshot_is_written_whatever_the_policy(
    persistence: Persistence, policy: Durability
) -> None:
    s = persistence.create("run", make, policy)
    persistence.take_snapshot(s, "zero")
    s.step({"w": torch.ones(2, 3)})
    persistence.checkpoint(s)
    assert on_disk(persistence, "run")["step"] == 1
    persistence.restore_snapshot(s, "zero")
    assert on_disk(persistence, "run")["step"] == 0


def test_snapshots_are_listed_by_time_with_unreadable_ones_last(
    persistence: Persistence,
) -> None:
    s = persistence.create("run", make)
    for snap in ("zz-first", "aa-second"):  # name order is not time order
        persistence.take_snapshot(s, snap)
        time.sleep(0.01)
    snaps = persistence.store.snapshot_dir("run")
    (snaps / "bb-broken.safetensors").write_bytes(b"\x01\x02")
    (snaps / "an-old-export.bin").write_text("not a snapshot")  # not *.safetensors
    (snaps / "dir.safetensors").mkdir()
    os.symlink(snaps / "zz-first.safetensors", snaps / "link.safetensors")
    listed = persistence.list_snapshots(s)
    assert [x["name"] for x in listed] == ["zz-first", "aa-second", "bb-broken"]
    broken = listed[-1]
    assert broken == {
        "name": "bb-broken",
        "stepper": "run",
        "size": 0,
        "error": "file too short for a safetensors header",
        "step": None,
        "created_at": None,
    }
    assert listed[0]["size"] == (snaps / "zz-first.safetensors").stat().st_size


def test_missing_snapshots_and_steppers_name_what_is_missing(
    persistence: Persistence,
) -> None:
    s = persistence.create("run", make)
    for call in (
        lambda: persistence.open_snapshot(s, "nope"),
        lambda: persistence.delete_snapshot(s, "nope"),
    ):
        with pytest.raises(SnapshotNotFound) as info:
            call()
        assert info.value.extra == {"stepper": "run", "snapshot": "nope"}
        assert info.value.detail == "stepper 'run' has no snapshot 'nope'"
    with pytest.raises(StepperNotFound) as gone:
        persistence.registry.delete("nope")
    assert gone.value.extra == {"stepper": "nope"}


def test_a_failed_removal_names_the_stepper(
    persistence: Persistence, monkeypatch: pytest.MonkeyPatch
) -> None:
    persistence.create("run", make)

    def refuse(name: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(persistence.store, "remove_stepper", refuse)
    with pytest.raises(PersistenceFailed) as info:
        persistence.delete("run")
    assert info.value.extra == {"stepper": "run"}
    assert "could not remove the files of 'run'" in info.value.detail
    assert persistence.registry.get("run").name == "run"  # still served


# ---------------------------------------------------------------------- the store


def test_scan_removes_only_temporary_files(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_checkpoint("run", ckpt.encode(make()).data)
    d = store.stepper_dir("run")
    (d / "snapshots").mkdir()
    keep = [d / "notes.tmp", d / ".keep", d / "snapshots" / "x.tmp", d / "snapshots" / ".keep"]
    drop = [d / ".checkpoint.safetensors.0a1b2c.tmp", d / "snapshots" / ".s.safetensors.9f.tmp"]
    for f in keep + drop:
        f.write_bytes(b"x")
    assert store.scan() == ["run"]
    assert all(f.exists() for f in keep) and not any(f.exists() for f in drop)


def test_an_aborted_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "c.safetensors"
    target.write_bytes(b"old")
    out = AtomicFile(target)
    out.write([b"new ", memoryview(b"bytes")])
    out.abort()
    assert target.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["c.safetensors"]


def test_a_replaced_stepper_is_never_overwritten_by_its_predecessor(
    persistence: Persistence,
) -> None:
    """A request still in flight on a deleted stepper must not write it over the new
    stepper of the same name (nor find it registered)."""
    old = persistence.create("run", make)
    persistence.delete("run")
    new = persistence.create("run", lambda: make("run", ("x",)))
    old.step({"w": torch.ones(2, 3)})
    assert persistence.persist(old) is None
    assert on_disk(persistence, "run")["params"] == ["x"]
    for call in (lambda: persistence.checkpoint(old), lambda: persistence.take_snapshot(old)):
        with pytest.raises(StepperNotFound) as info:
            call()
        assert info.value.extra == {"stepper": "run"}
    assert persistence.persist(new) is not None


def test_one_lock_per_stepper_name(persistence: Persistence) -> None:
    assert persistence._lock("a") is persistence._lock("a")
    assert persistence._lock("a") is not persistence._lock("b")


def test_a_failed_write_is_reported_and_logged(
    persistence: Persistence, caplog: pytest.LogCaptureFixture
) -> None:
    s = persistence.create("run", make)
    d = persistence.store.stepper_dir("run")
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    d.write_bytes(b"a file where the stepper's directory belongs")
    s.step({"w": torch.ones(2, 3)})
    with (
        caplog.at_level(logging.ERROR, logger="adamscope.persistence"),
        pytest.raises(PersistenceFailed) as info,
    ):
        persistence.checkpoint(s)
    assert info.value.detail == (
        "the change to 'run' was applied in memory but could not be written to the data "
        "directory: File exists; it is written with the next change"
    )
    assert info.value.extra == {"stepper": "run"}
    assert [r.getMessage() for r in caplog.records] == [
        f"could not write the checkpoint of 'run': [Errno 17] File exists: '{d}'"
    ]
    assert persistence.describe(s)["dirty"] is True


def test_restoring_reports_what_it_found(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = Persistence(tmp_path, Registry(), "cpu", Durability(mode="interval", seconds=3600))
    first.restore_all()
    for name in ("good", "refused"):
        first.create(name, lambda n=name: make(n))  # type: ignore[misc]
    saved_at = on_disk(first, "good")["saved_at"]
    registry = Registry()

    def quota(stepper: Stepper) -> None:
        if stepper.name == "refused":
            raise RuntimeError("over the limit")

    registry.hooks.append(quota)
    second = Persistence(tmp_path, registry, "cpu")
    with caplog.at_level(logging.INFO, logger="adamscope.persistence"):
        second.restore_all()
    assert second.restored == ["good"]
    assert second.failed == {"refused": "RuntimeError: over the limit"}
    path = second.store.checkpoint_path("refused")
    assert [r.getMessage() for r in caplog.records] == [
        f"could not restore stepper 'refused' from {path}: RuntimeError: over the limit",
        f"restored 1 stepper(s) from {second.store.root}; 1 failed: ['refused']",
    ]
    good = registry.get("good")
    assert second.describe(good) == {
        "durability": {"mode": "interval", "n": None, "seconds": 3600.0},
        "persisted_step": 0,
        "persisted_at": saved_at,
        "dirty": False,
    }
    good.step({"w": torch.ones(2, 3)})
    assert not second.due(good, "change")  # just restored: its hour has not passed
    with pytest.raises(StepperExists) as info:
        second.create("refused", lambda: make("refused"))
    assert info.value.extra == {"stepper": "refused"}


def test_writes_happen_only_when_something_is_unwritten(persistence: Persistence) -> None:
    s = persistence.create("run", make)
    path = persistence.store.checkpoint_path("run")
    before = path.stat().st_ino
    assert not persistence.due(s, "step") and not persistence.due(s, "restore")
    assert persistence.persist(s) is not None and path.stat().st_ino == before
    persistence.persist(s, force=True)
    assert path.stat().st_ino != before  # forced: written again


def test_flush_all_counts_and_logs(
    persistence: Persistence, caplog: pytest.LogCaptureFixture
) -> None:
    steppers = [
        persistence.create(
            n,
            lambda n=n: make(n),  # type: ignore[misc]
            Durability(mode="every_n", n=100),
        )
        for n in "abc"
    ]
    for s in steppers:
        s.step({"w": torch.ones(2, 3)})
    c = persistence.store.stepper_dir("c")
    for f in c.iterdir():
        f.unlink()
    c.rmdir()
    c.write_bytes(b"not a directory")
    with caplog.at_level(logging.ERROR, logger="adamscope.persistence"):
        assert persistence.flush_all() == 2
    assert caplog.records[-1].getMessage() == (
        "the change to 'c' was applied in memory but could not be written to the data "
        "directory: File exists; it is written with the next change"
    )


def test_unnamed_snapshots_are_named_by_step_and_utc_time(
    persistence: Persistence, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = persistence.create("run", make)
    s.step({"w": torch.ones(2, 3)})
    fixed = time.struct_time((2024, 6, 1, 12, 30, 5, 5, 153, 0))
    monkeypatch.setattr(time, "gmtime", lambda *a: fixed)  # the same second, every time
    names = [persistence.take_snapshot(s)["name"] for _ in range(3)]
    assert names == [
        "step1-20240601T123005Z",
        "step1-20240601T123005Z-2",
        "step1-20240601T123005Z-3",
    ]


def test_files_are_private_and_snapshots_say_what_they_are(persistence: Persistence) -> None:
    s = persistence.create("run", make, Durability(mode="every_n", n=3))
    persistence.take_snapshot(s, "first")
    snap = persistence.store.snapshot_path("run", "first")
    for path in (persistence.store.checkpoint_path("run"), snap):
        assert path.stat().st_mode & 0o777 == 0o600
    with open(snap, "rb") as f:
        header = ckpt.header_from_prefix(f.read)
    assert header["snapshot"] == "first"
    assert header["durability"] == {"mode": "every_n", "n": 3, "seconds": None}


def test_a_snapshot_that_cannot_be_written_is_reported(persistence: Persistence) -> None:
    s = persistence.create("run", make)
    (persistence.store.stepper_dir("run") / "snapshots").write_bytes(b"in the way")
    with pytest.raises(PersistenceFailed) as info:
        persistence.take_snapshot(s, "first")
    assert info.value.detail.startswith("could not write snapshot 'first' of 'run': ")
    assert info.value.extra == {"stepper": "run"}


def test_scan_removes_only_what_it_owns_and_skips_what_is_not_a_stepper(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(tmp_path / "data")
    data = ckpt.encode(make()).data
    for name in ("b-run", "z-run"):
        store.write_checkpoint(name, data)
    root = store.root
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "checkpoint.safetensors").write_bytes(data)
    (root / "a-link").symlink_to(outside)  # sorts first; must not be followed
    (root / "has space").mkdir()
    (root / "has space" / "checkpoint.safetensors").write_bytes(data)
    (root / "a-file").write_bytes(b"x")
    (root / ".hidden-dir").mkdir()
    (root / ".hidden-dir" / "keep").write_bytes(b"x")
    (root / ".notes").write_bytes(b"x")
    (root / ".old.deleted-0a1b").mkdir()
    (root / ".old.deleted-0a1b" / "checkpoint.safetensors").write_bytes(data)
    (root / ".gone.deleted-2c3d").symlink_to(outside)  # a link is never removed through
    (root / ".x.safetensors.9f.tmp").write_bytes(b"x")
    tmp = store.stepper_dir("z-run") / ".checkpoint.safetensors.0a.tmp"
    tmp.write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger="adamscope.persistence"):
        assert store.scan() == ["b-run", "z-run"]
    assert not (root / ".old.deleted-0a1b").exists() and not tmp.exists()
    assert not (root / ".x.safetensors.9f.tmp").exists()
    assert (outside / "checkpoint.safetensors").exists()
    assert (root / ".hidden-dir" / "keep").exists() and (root / ".notes").exists()
    assert sorted(r.getMessage() for r in caplog.records) == sorted(
        [
            f"ignoring {root / 'a-file'}: not a stepper directory",
            f"ignoring {root / 'a-link'}: not a stepper directory",
            f"ignoring {root / 'has space'}: not a stepper directory",
            f"removing interrupted deletion {root / '.old.deleted-0a1b'}",
            f"removing stale temporary file {tmp}",
        ]
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.stepper_dir("../up"), "invalid stepper name '../up'"),
        (lambda s: s.snapshot_path("run", ".hidden"), "invalid snapshot name '.hidden'"),
    ],
)
def test_names_that_are_not_one_path_component_are_refused(
    tmp_path: Path, call: Any, message: str
) -> None:
    with pytest.raises(PersistenceFailed) as info:
        call(Store(tmp_path))
    assert info.value.detail == message


def _with_header(change: Any) -> bytes:
    """A valid checkpoint of make() whose JSON header went through ``change(header)``
    (which may return a replacement, e.g. a non-object)."""
    tensors, meta = codec.decode(ckpt.encode(make()).data)
    header = json.loads(meta[META_CHECKPOINT])
    replaced = change(header)
    raw = (
        replaced
        if isinstance(replaced, str)
        else json.dumps(header if replaced is None else replaced)
    )
    return codec.encode(tensors, {**meta, META_CHECKPOINT: raw})


def _put(key: str, value: Any) -> Any:
    return lambda h: h.__setitem__(key, value)


def _group(key: str, value: Any) -> Any:
    return lambda h: h["groups"][0].__setitem__(key, value)


def _option(key: str, value: Any) -> Any:
    return lambda h: h["groups"][0]["options"].__setitem__(key, value)


HEADERS: list[tuple[str, Any, str]] = [
    ("not-json", lambda h: "{", "checkpoint header is not valid JSON: "),
    ("not-object", lambda h: [1], "checkpoint header must be a JSON object"),
    ("format", _put("format", "x"), "checkpoint format is 'x', not 'adamscope-checkpoint'"),
    ("version-bool", _put("version", True), "invalid checkpoint format version True"),
    ("version-0", _put("version", 0), "invalid checkpoint format version 0"),
    ("version-text", _put("version", "1"), "invalid checkpoint format version '1'"),
    ("name", _put("stepper", "a b"), "checkpoint names an invalid stepper 'a b'"),
    ("optimizer", _put("optimizer", "sgd"), "checkpoint has unknown optimizer 'sgd'"),
    ("device", _put("device", 0), "checkpoint lacks a device"),
    ("params-empty", _put("params", []), "checkpoint 'params' must list distinct parameter names"),
    (
        "params-twice",
        _put("params", ["w", "w"]),
        "checkpoint 'params' must list distinct parameter names",
    ),
    ("params-text", _put("params", "wb"), "checkpoint 'params' must list distinct parameter names"),
    (
        "params-numbers",
        _put("params", [1, 2]),
        "checkpoint 'params' must list distinct parameter names",
    ),
    ("param-name", _put("params", ["w", "b\x01"]), "invalid parameter name 'b\\x01'"),
    ("groups-empty", _put("groups", []), "checkpoint 'groups' must be a list"),
    ("groups-object", _put("groups", {"params": ["w"]}), "checkpoint 'groups' must be a list"),
    (
        "group-text",
        _put("groups", ["w"]),
        "each checkpoint group needs 'params' (names) and 'options' (an object)",
    ),
    ("group-params", _group("params", "wb"), "each checkpoint group needs 'params'"),
    ("group-options", _group("options", []), "each checkpoint group needs 'params'"),
    ("option-unknown", _option("nesterov", True), "checkpoint group has unknown option 'nesterov'"),
    ("option-betas", _option("betas", [0.9]), "checkpoint option betas=[0.9] has the wrong type"),
    ("option-betas-text", _option("betas", ["a", "b"]), "checkpoint option betas=['a', 'b']"),
    ("option-lr", _option("lr", "x"), "checkpoint option lr='x' has the wrong type"),
    ("option-lr-list", _option("lr", [1]), "checkpoint option lr=[1] has the wrong type"),
    ("step-negative", _put("step", -1), "checkpoint step must be an integer in 0..2**63-1, got -1"),
    ("step-float", _put("step", 1.5), "checkpoint step must be an integer in 0..2**63-1, got 1.5"),
    ("step-bool", _put("step", True), "checkpoint step must be an integer in 0..2**63-1, got True"),
    ("saved_at", _put("saved_at", "now"), "checkpoint 'saved_at' must be a finite number"),
    (
        "created_at-bool",
        _put("created_at", True),
        "checkpoint 'created_at' must be a finite number",
    ),
    ("extra", _put("extra", []), "checkpoint 'extra' must be an object"),
]


@pytest.mark.parametrize(
    ("change", "message"), [h[1:] for h in HEADERS], ids=[h[0] for h in HEADERS]
)
def test_every_header_field_is_checked(change: Any, message: str) -> None:
    with pytest.raises(InvalidCheckpoint) as info:
        ckpt.decode(_with_header(change))
    assert info.value.detail.startswith(message), info.value.detail


def test_a_header_without_extra_or_with_numbers_where_allowed_loads() -> None:
    def edit(h: dict[str, Any]) -> None:
        del h["extra"]
        h["groups"][0]["options"]["betas"] = [0, 1]  # ints are numbers
        h["created_at"] = 5

    loaded = ckpt.decode(_with_header(edit))
    assert loaded.header["extra"] == {} and loaded.header["created_at"] == 5


def test_the_written_header_is_compact_complete_and_guarded() -> None:
    stepper = make()
    chunks: list[bytes] = []
    enc = ckpt.write(stepper, lambda parts: chunks.append(b"".join(parts)) or len(chunks[0]))
    assert (
        enc.data == b"" and enc.size == len(chunks[0]) and enc.header["torch"] == torch.__version__
    )
    raw = codec.decode(chunks[0])[1][META_CHECKPOINT]
    assert ", " not in raw and '": ' not in raw  # compact: the header is read on restore
    with pytest.raises(ValueError) as info:
        ckpt.encode(stepper, {"step": 5, "durability": {}, "saved_at": 1})
    assert str(info.value) == "annotations may not replace ['saved_at', 'step']"


def test_registry_problems_name_the_stepper() -> None:
    registry = Registry()
    registry.create("a", lambda: make("a"))
    for call, error in (
        (lambda: registry.get("zz"), StepperNotFound),
        (lambda: registry.delete("zz"), StepperNotFound),
        (lambda: registry.create("a", lambda: make("a")), StepperExists),
    ):
        with pytest.raises(error) as info:
            call()
        assert info.value.extra["stepper"] in ("zz", "a")
        assert info.value.detail in ("no stepper named 'zz'", "a stepper named 'a' already exists")
