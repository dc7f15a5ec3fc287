"""Checkpoints and the data directory, without HTTP.

- The checkpoint format round-trips a stepper exactly (parameters, every state tensor, options,
  step, journal) and a restored stepper continues bit for bit like an uninterrupted
  ``torch.optim.Adam``/``AdamW`` (several implementations, dtypes, groups).
- The file is a standard safetensors file with the documented names and header.
- Damaged or foreign files are rejected with ``InvalidCheckpoint`` and change nothing.
- The store writes atomically, removes stale temporary files and interrupted deletions,
  and never lets a name become a path outside the data directory.
- :class:`Persistence` restores what it finds, skips and reports a corrupt checkpoint, and
  writes according to each policy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from adamscope.client import codec
from adamscope.client.protocol import META_CHECKPOINT, Durability
from adamscope.service.engine import GroupDef, Registry, Stepper
from adamscope.service.engine import checkpoint as ckpt
from adamscope.service.engine.errors import InvalidCheckpoint, StepperExists, StepperNotFound
from adamscope.service.persistence import CHECKPOINT_FILE, Persistence, PersistenceFailed, Store
from adamscope.service.persistence.store import atomic_write

CPU = torch.device("cpu")

#: name -> (optimizer, hyperparameters, second group's options, dtypes of w/b/h)
CONFIGS: dict[str, tuple[str, dict[str, Any], dict[str, Any], tuple[torch.dtype, ...]]] = {
    "adam-forloop": (
        "adam",
        {"lr": 0.01, "foreach": False},
        {"lr": 0.05, "amsgrad": True},
        (torch.float32, torch.float32, torch.bfloat16),
    ),
    "adamw-foreach": (
        "adamw",
        {"lr": 0.02, "foreach": True, "weight_decay": 0.1},
        {"maximize": True},
        (torch.float32, torch.float64, torch.float16),
    ),
    "adam-fused": (
        "adam",
        {"lr": 0.003, "fused": True, "weight_decay": 0.01},
        {"amsgrad": True, "betas": (0.8, 0.95)},
        (torch.float32, torch.float32, torch.float64),
    ),
    "adam-complex": (
        "adam",
        {"lr": 0.01, "foreach": False},
        {"eps": 1e-6},
        (torch.complex64, torch.float32, torch.float32),
    ),
}


def values(dtypes: tuple[torch.dtype, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (3, 4), "b": (4,), "h": (5,)}
    out = {}
    for (n, shape), dt in zip(shapes.items(), dtypes, strict=True):
        base = torch.randn(shape, generator=g, dtype=torch.float64)
        out[n] = torch.complex(base, -base).to(dt) if dt.is_complex else base.to(dt)
    return out


def grads(like: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return values(tuple(t.dtype for t in like.values()), seed=1000 + k)


def make(
    config: str, name: str = "run"
) -> tuple[Stepper, dict[str, torch.Tensor], torch.optim.Optimizer]:
    """A stepper and its local twin (``torch.optim`` on leaf copies of the same values)."""
    kind, hyper, second, dtypes = CONFIGS[config]
    init = values(dtypes)
    stepper = Stepper(
        name,
        kind,
        CPU,
        list(init.items()),
        hyper,
        [GroupDef(["w", "b"]), GroupDef(["h"], dict(second))],
    )
    local = {n: t.clone().requires_grad_(True) for n, t in init.items()}
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    opt = cls([{"params": [local["w"], local["b"]]}, {"params": [local["h"]], **second}], **hyper)
    return stepper, local, opt


def local_step(
    local: dict[str, torch.Tensor], opt: torch.optim.Optimizer, g: dict[str, torch.Tensor]
) -> None:
    for n, t in g.items():
        local[n].grad = t
    opt.step()


def assert_matches_local(
    stepper: Stepper, local: dict[str, torch.Tensor], opt: torch.optim.Optimizer
) -> None:
    _, params = stepper.get_params()
    _, state = stepper.get_state()
    for n, p in local.items():
        assert params[n].dtype == p.dtype and torch.equal(params[n], p.detach()), n
        expected = opt.state[p]
        assert set(state[n]) == set(expected), n
        for key, t in expected.items():
            assert state[n][key].dtype == t.dtype and torch.equal(state[n][key], t), (n, key)


def assert_same_stepper(a: Stepper, b: Stepper, *ignore: str) -> None:
    """Equal in everything a checkpoint holds (but the header fields ``ignore``)."""
    ea, eb = ckpt.encode(a), ckpt.encode(b)
    ta, ma = codec.decode(ea.data)
    tb, mb = codec.decode(eb.data)
    assert list(ta) == list(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ha, hb = dict(ea.header), dict(eb.header)
    for h in (ha, hb):
        for key in ("saved_at", *ignore):
            del h[key]
    assert ha == hb


# ---------------------------------------------------------------------- the format


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_restored_stepper_continues_bit_for_bit_like_uninterrupted_torch(config: str) -> None:
    stepper, local, opt = make(config)
    init = values(CONFIGS[config][3])
    for k in range(3):
        g = grads(init, k)
        stepper.step(g)
        local_step(local, opt, g)
    stepper.journal["recent"] = [{"key": "abc", "step": 3}]
    restored = ckpt.build(ckpt.decode(ckpt.encode(stepper).data), CPU)
    assert_same_stepper(stepper, restored)
    assert restored.step_count == 3 and restored.journal == stepper.journal
    assert restored.journal is not stepper.journal
    assert (restored.created_at, restored.updated_at) == (stepper.created_at, stepper.updated_at)
    for k in range(3, 7):
        g = grads(init, k)
        restored.step(g)
        local_step(local, opt, g)
    assert_matches_local(restored, local, opt)
    assert restored.step_count == 7


def test_untouched_state_options_and_partial_steps_round_trip() -> None:
    stepper, _, _ = make("adam-forloop")
    init = values(CONFIGS["adam-forloop"][3])
    stepper.step({"w": grads(init, 0)["w"]})  # only w has state
    stepper.set_hyperparameters({"lr": 0.123, "betas": (0.5, 0.6)}, group=1)
    restored = ckpt.build(ckpt.decode(ckpt.encode(stepper).data), CPU)
    assert_same_stepper(stepper, restored)
    _, state = restored.get_state()
    assert set(state["w"]) == {"step", "exp_avg", "exp_avg_sq"} and state["b"] == {}
    assert restored.optimizer.param_groups[1]["lr"] == 0.123
    assert restored.optimizer.param_groups[1]["betas"] == (0.5, 0.6)


def test_file_is_plain_safetensors_with_the_documented_layout(tmp_path: Path) -> None:
    stepper, _, _ = make("adam-forloop")
    stepper.step(grads(values(CONFIGS["adam-forloop"][3]), 0))
    enc = ckpt.encode(stepper, {"durability": {"mode": "manual"}})
    path = tmp_path / "c.safetensors"
    path.write_bytes(enc.data)
    tensors = safetensors.torch.load_file(path)  # the reference reader
    assert list(tensors)[:3] == ["param/w", "param/b", "param/h"]
    assert set(tensors) == {
        "param/w",
        "param/b",
        "param/h",
        *(f"state/{n}/{k}" for n in "wb" for k in ("step", "exp_avg", "exp_avg_sq")),
        *(f"state/h/{k}" for k in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    }
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
    header = json.loads(meta[META_CHECKPOINT])
    assert meta["adamscope.step"] == "1" and meta["adamscope.stepper"] == "run"
    assert header["format"] == "adamscope-checkpoint" and header["version"] == 1
    assert header["stepper"] == "run" and header["optimizer"] == "adam"
    assert header["device"] == "cpu" and header["params"] == ["w", "b", "h"]
    assert header["groups"][1]["params"] == ["h"]
    assert header["groups"][1]["options"]["amsgrad"] is True
    assert header["step"] == 1 and header["extra"] == {}
    assert header["durability"] == {"mode": "manual"}
    with open(path, "rb") as f:
        assert ckpt.header_from_prefix(f.read) == header


def test_load_into_rolls_back_exactly_and_rejects_another_layout() -> None:
    stepper, _, _ = make("adamw-foreach")
    init = values(CONFIGS["adamw-foreach"][3])
    stepper.step(grads(init, 0))
    saved = ckpt.decode(ckpt.encode(stepper).data)
    reference = ckpt.build(saved, CPU)
    for k in range(1, 4):
        stepper.step(grads(init, k))
    stepper.set_hyperparameters({"lr": 0.5})
    ckpt.load_into(stepper, saved)
    assert_same_stepper(stepper, reference, "updated_at")  # a roll back is a change

    other, _, _ = make("adam-forloop")  # different optimizer and dtypes
    before = ckpt.encode(other).data
    with pytest.raises(InvalidCheckpoint, match="does not fit"):
        ckpt.load_into(other, saved)
    after = ckpt.encode(other).data
    assert codec.decode(before)[0].keys() == codec.decode(after)[0].keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            codec.decode(before)[0].values(), codec.decode(after)[0].values(), strict=True
        )
    )


def _edit_header(data: bytes, change: Any) -> bytes:
    tensors, meta = codec.decode(data)
    header = json.loads(meta[META_CHECKPOINT])
    change(header, tensors)
    return codec.encode(tensors, {**meta, META_CHECKPOINT: json.dumps(header)})


def _set(key: str, value: Any) -> Any:
    return lambda h, t: h.__setitem__(key, value)


DAMAGE: dict[str, tuple[Any, str]] = {
    "truncated": (lambda d: d[: len(d) - 7], "not a valid safetensors"),
    "garbage": (lambda d: b"\x00" * 64, "not a valid safetensors"),
    "no header": (lambda d: codec.encode({"x": torch.zeros(1)}), "not an adamscope checkpoint"),
    "newer version": (lambda d: _edit_header(d, _set("version", 2)), "newer"),
    "other format": (lambda d: _edit_header(d, _set("format", "x")), "format"),
    "bad name": (lambda d: _edit_header(d, _set("stepper", "../x")), "invalid stepper"),
    "bad step": (lambda d: _edit_header(d, _set("step", -1)), "step"),
    "missing param": (lambda d: _edit_header(d, lambda h, t: t.pop("param/b")), "lacks"),
    "extra tensor": (
        lambda d: _edit_header(d, lambda h, t: t.__setitem__("other", torch.zeros(1))),
        "unexpected tensor",
    ),
    "bad state key": (
        lambda d: _edit_header(
            d, lambda h, t: t.__setitem__("state/w/momentum", torch.zeros(3, 4))
        ),
        "state/",
    ),
    "bad state shape": (
        lambda d: _edit_header(d, lambda h, t: t.__setitem__("state/w/exp_avg", torch.zeros(2))),
        "does not load",
    ),
    "bad option": (
        lambda d: _edit_header(d, lambda h, t: h["groups"][0]["options"].__setitem__("lr", -1.0)),
        "does not load",
    ),
    "betas not a pair": (
        lambda d: _edit_header(d, lambda h, t: h["groups"][0]["options"].__setitem__("betas", 5)),
        "wrong type",
    ),
    "lr a string": (
        lambda d: _edit_header(d, lambda h, t: h["groups"][0]["options"].__setitem__("lr", "x")),
        "wrong type",
    ),
    "unknown option": (
        lambda d: _edit_header(
            d, lambda h, t: h["groups"][0]["options"].__setitem__("nesterov", True)
        ),
        "unknown",
    ),
    "empty param name": (
        lambda d: _edit_header(d, lambda h, t: h.__setitem__("params", ["", "b", "h"])),
        "invalid parameter name",
    ),
    "groups miss a param": (
        lambda d: _edit_header(d, lambda h, t: h["groups"].pop()),
        "does not load",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoints_are_rejected(damage: str) -> None:
    stepper, _, _ = make("adam-forloop")
    stepper.step(grads(values(CONFIGS["adam-forloop"][3]), 0))
    good = ckpt.encode(stepper).data
    corrupt, fragment = DAMAGE[damage]
    with pytest.raises(InvalidCheckpoint, match=fragment):
        ckpt.build(ckpt.decode(corrupt(good)), CPU)


# ---------------------------------------------------------------------- the store


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "f.safetensors"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def test_scan_removes_stale_temporary_files_and_interrupted_deletions(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_checkpoint("a", b"data")
    stale = store.stepper_dir("a") / f".{CHECKPOINT_FILE}.deadbeef.tmp"
    stale.write_bytes(b"half a checkpoint")
    (store.stepper_dir("a") / "snapshots").mkdir()
    stale_snap = store.stepper_dir("a") / "snapshots" / ".s.safetensors.1234.tmp"
    stale_snap.write_bytes(b"half")
    tomb = store.root / ".b.deleted-0123"
    (tomb / "snapshots").mkdir(parents=True)
    (tomb / CHECKPOINT_FILE).write_bytes(b"old")
    (store.root / "empty").mkdir()  # a create killed before its first write
    assert store.scan() == ["a"]
    assert not stale.exists() and not stale_snap.exists() and not tomb.exists()
    assert store.read_checkpoint("a") == b"data"


@pytest.mark.parametrize("name", ["..", ".hidden", "a/b", "", "x" * 200, "a\n"])
def test_names_never_become_paths(tmp_path: Path, name: str) -> None:
    store = Store(tmp_path)
    with pytest.raises(PersistenceFailed, match="invalid"):
        store.stepper_dir(name)
    with pytest.raises(PersistenceFailed, match="invalid"):
        store.snapshot_path("ok", name)


def test_a_symlink_out_of_the_data_directory_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    store.open()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, store.root / "evil")
    with pytest.raises(PersistenceFailed, match="outside"):
        store.write_checkpoint("evil", b"x")
    assert list(outside.iterdir()) == []
    assert store.scan() == []


# ---------------------------------------------------------------------- Persistence


def _create(p: Persistence, name: str, policy: Durability | None = None) -> Stepper:
    def build() -> Stepper:
        return make("adam-forloop", name)[0]

    return p.create(name, build, policy)


def _on_disk_step(p: Persistence, name: str) -> int:
    with open(p.store.checkpoint_path(name), "rb") as f:
        return int(ckpt.header_from_prefix(f.read)["step"])


def test_restore_skips_and_reports_a_corrupt_checkpoint(tmp_path: Path) -> None:
    first = Persistence(tmp_path, Registry(), "cpu")
    first.restore_all()
    for name in ("good", "bad", "also-good"):
        s = _create(first, name)
        s.step(grads(values(CONFIGS["adam-forloop"][3]), 0))
        first.after_mutation(s, "step")
    bad = first.store.checkpoint_path("bad")
    damaged = bad.read_bytes()[:-100]
    bad.write_bytes(damaged)

    registry = Registry()
    second = Persistence(tmp_path, registry, "cpu")
    second.restore_all()
    assert [s.name for s in registry.list()] == ["also-good", "good"]
    assert sorted(second.restored) == ["also-good", "good"]
    assert list(second.failed) == ["bad"] and "not a valid safetensors" in second.failed["bad"]
    assert second.health()["failed"][0]["stepper"] == "bad"
    assert bad.read_bytes() == damaged  # kept for inspection, never overwritten
    for name in ("good", "also-good"):
        assert_same_stepper(registry.get(name), first.registry.get(name))
    with pytest.raises(StepperExists, match="could not be restored"):
        _create(second, "bad")
    assert bad.read_bytes() == damaged
    second.delete("bad")  # discards the stored files; the name is free again
    assert not bad.parent.exists()
    _create(second, "bad")
    assert registry.get("bad").step_count == 0


def test_every_n_writes_every_n_steps_only(tmp_path: Path) -> None:
    p = Persistence(tmp_path, Registry(), "cpu")
    s = _create(p, "n3", Durability(mode="every_n", n=3))
    init = values(CONFIGS["adam-forloop"][3])
    on_disk = []
    for k in range(8):
        s.step(grads(init, k))
        p.after_mutation(s, "step")
        on_disk.append(_on_disk_step(p, "n3"))
    assert on_disk == [0, 0, 3, 3, 3, 6, 6, 6]
    s.set_hyperparameters({"lr": 0.5})
    p.after_mutation(s, "change")  # a change alone waits for the next write
    assert p.describe(s)["dirty"] is True and _on_disk_step(p, "n3") == 6
    assert p.flush_all() == 1  # shutdown writes what is unwritten
    assert _on_disk_step(p, "n3") == 8 and p.describe(s)["dirty"] is False


def test_manual_writes_only_on_checkpoint_and_not_at_shutdown(tmp_path: Path) -> None:
    p = Persistence(tmp_path, Registry(), "cpu")
    s = _create(p, "m", Durability(mode="manual"))
    init = values(CONFIGS["adam-forloop"][3])
    for k in range(2):
        s.step(grads(init, k))
        p.after_mutation(s, "step")
    assert _on_disk_step(p, "m") == 0
    assert p.checkpoint(s)["step"] == 2 and _on_disk_step(p, "m") == 2
    s.step(grads(init, 2))
    p.after_mutation(s, "step")
    assert p.flush_all() == 0 and _on_disk_step(p, "m") == 2


def test_interval_writes_once_its_time_has_come(tmp_path: Path) -> None:
    p = Persistence(tmp_path, Registry(), "cpu")
    slow = _create(p, "slow", Durability(mode="interval", seconds=3600))
    quick = _create(p, "quick", Durability(mode="interval", seconds=0.01))
    init = values(CONFIGS["adam-forloop"][3])
    for s in (slow, quick):
        s.step(grads(init, 0))
    time.sleep(0.05)
    assert not p.due(slow, "step") and p.due(quick, "step")
    assert p.flush_due() == 1
    assert (_on_disk_step(p, "slow"), _on_disk_step(p, "quick")) == (0, 1)


def test_a_deleted_stepper_is_never_written_back(tmp_path: Path) -> None:
    p = Persistence(tmp_path, Registry(), "cpu")
    s = _create(p, "gone")
    p.delete("gone")
    s.step(grads(values(CONFIGS["adam-forloop"][3]), 0))  # a request still in flight
    assert p.persist(s) is None
    assert not p.store.stepper_dir("gone").exists()
    with pytest.raises(StepperNotFound):
        p.delete("gone")
