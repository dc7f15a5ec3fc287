"""A plain torch.save of an AdamW state_dict, with and without param_names, plus weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from checkpoint_local_job import TinyNet, make_optimizer, named_state, train
from checkpoint_support import assert_state_equal
from safetensors.torch import load_file, save_file

from adamscope.client.checkpoints import (
    CheckpointFormatError,
    NameMappingError,
    OptimizerKindError,
    UnsafeCheckpointError,
    read_checkpoint,
    write_torch,
)


def _job(
    tmp_path: Path, *, named: bool, layout: str = "decay", **net: object
) -> tuple[TinyNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyNet(**net)  # type: ignore[arg-type]
    optimizer = make_optimizer(model, named=named, layout=layout)
    train(model, optimizer, range(1, 4))
    torch.save(optimizer.state_dict(), tmp_path / "optim.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save_file(
        {k: v.clone() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors")
    )
    return model, optimizer


def _assert_matches_job(ckpt: object, model: TinyNet, optimizer: torch.optim.Optimizer) -> None:
    from adamscope.client.checkpoints import OptimizerCheckpoint

    assert isinstance(ckpt, OptimizerCheckpoint)
    assert assert_state_equal({p.name: p.state for p in ckpt}, named_state(model, optimizer)) > 0
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g.names for g in ckpt.groups] == [
        [names[id(p)] for p in g["params"]] for g in optimizer.param_groups
    ]
    for group, live in zip(ckpt.groups, optimizer.param_groups, strict=True):
        assert group.options == {
            k: v for k, v in live.items() if k not in ("params", "param_names")
        }
    assert ckpt.kind == "adamw" and ckpt.global_step == 3


def test_param_names_name_the_state(tmp_path: Path) -> None:
    model, optimizer = _job(tmp_path, named=True)
    ckpt = read_checkpoint(tmp_path / "optim.pt")
    _assert_matches_job(ckpt, model, optimizer)
    assert all(p.value is None for p in ckpt)
    assert "names: param_names saved in the param groups" in ckpt.provenance.inferred


def test_without_names_a_pt_state_dict_gives_the_model_order(tmp_path: Path) -> None:
    model, optimizer = _job(tmp_path, named=False, layout="prefix")
    ckpt = read_checkpoint(tmp_path / "optim.pt", weights=tmp_path / "model.pt")
    _assert_matches_job(ckpt, model, optimizer)
    for name, value in model.named_parameters():
        assert torch.equal(ckpt.params[name].value, value)
    assert any("matched by position" in n and "6 of 6" in n for n in ckpt.provenance.inferred)


def test_groups_that_reorder_the_model_are_refused_not_guessed(tmp_path: Path) -> None:
    _job(tmp_path, named=False, layout="decay")
    with pytest.raises(
        NameMappingError,
        match=r"optimizer parameter 2 has state of shape \(8, 8\).*'layers.0.bias'",
    ):
        read_checkpoint(tmp_path / "optim.pt", weights=tmp_path / "model.pt")


def test_explicit_names_are_checked_against_shapes(tmp_path: Path) -> None:
    model, optimizer = _job(tmp_path, named=False, layout="decay")
    decay_order = [
        n
        for g in (
            ["emb.weight", "layers.0.weight", "layers.1.weight", "head.weight"],
            ["layers.0.bias", "layers.1.bias"],
        )
        for n in g
    ]
    weights = tmp_path / "model.safetensors"
    ckpt = read_checkpoint(tmp_path / "optim.pt", names=decay_order, weights=weights)
    _assert_matches_job(ckpt, model, optimizer)
    model_order = [n for n, _ in model.named_parameters()]
    with pytest.raises(NameMappingError, match="did not get the parameters in this order"):
        read_checkpoint(tmp_path / "optim.pt", names=model_order, weights=weights)
    # Without weights nothing can check the order: accepted, and the provenance says so.
    unchecked = read_checkpoint(tmp_path / "optim.pt", names=model_order)
    assert any("verified for 0 of 6" in n for n in unchecked.provenance.inferred)


def test_safetensors_weights_match_by_shape_only_when_shapes_are_unique(tmp_path: Path) -> None:
    model, optimizer = _job(tmp_path, named=False, n_layers=1, out=12)
    ckpt = read_checkpoint(tmp_path / "optim.pt", weights=tmp_path / "model.safetensors")
    _assert_matches_job(ckpt, model, optimizer)
    assert any("matched by shape" in n for n in ckpt.provenance.inferred)

    _job(tmp_path, named=False)  # two (8, 8) linears: the sorted file cannot tell them apart
    with pytest.raises(NameMappingError, match=r"2 parameters share shape \((16|8), 8\)"):
        read_checkpoint(tmp_path / "optim.pt", weights=tmp_path / "model.safetensors")


def test_buffers_make_counts_differ_and_are_refused(tmp_path: Path) -> None:
    _job(tmp_path, named=False, layout="prefix", buffer=True)
    with pytest.raises(NameMappingError, match="gives 7 parameter names but the optimizer has 6"):
        read_checkpoint(tmp_path / "optim.pt", weights=tmp_path / "model.pt")


def test_tied_weights_are_folded_under_their_first_name(tmp_path: Path) -> None:
    model, optimizer = _job(tmp_path, named=False, layout="prefix", tied=True)
    assert "head.weight" in torch.load(tmp_path / "model.pt", weights_only=True)
    ckpt = read_checkpoint(tmp_path / "optim.pt", weights=tmp_path / "model.pt")
    _assert_matches_job(ckpt, model, optimizer)
    assert "head.weight" not in ckpt.params
    assert ckpt.provenance.details["tied_weights"] == {"head.weight": "emb.weight"}


class _Evil:
    """Pickles to a call of os.system; only an unrestricted load would run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("role", ["optimizer", "weights"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path, role: str) -> None:
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pt"
    torch.save({"state": {}, "param_groups": [{"params": [], "lr": _Evil(marker)}]}, evil)
    _job(tmp_path, named=True)
    with pytest.raises(
        UnsafeCheckpointError,
        match=r"refused to load .*evil\.pt.*nothing in it was executed.*system",
    ):
        if role == "optimizer":
            read_checkpoint(evil)
        else:
            read_checkpoint(tmp_path / "optim.pt", weights=evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


@pytest.mark.parametrize("layout,named", [("prefix", False), ("decay", True)])
def test_export_loads_into_the_training_job_and_continues_bit_exactly(
    tmp_path: Path, layout: str, named: bool
) -> None:
    reference, ref_opt = _job(tmp_path, named=named, layout=layout)
    ckpt = read_checkpoint(tmp_path / "optim.pt", weights=tmp_path / "model.pt")
    written = write_torch(ckpt, tmp_path / "export")
    train(reference, ref_opt, range(4, 9))

    torch.manual_seed(1)
    model = TinyNet()
    model.load_state_dict(load_file(str(written["weights"])))
    optimizer = make_optimizer(model, named=named, layout=layout)
    optimizer.load_state_dict(torch.load(written["optimizer"], weights_only=True))
    train(model, optimizer, range(4, 9))
    assert_state_equal(named_state(model, optimizer), named_state(reference, ref_opt))
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name


def _strip(path: Path, weight_decay: float) -> Path:
    saved = torch.load(path, weights_only=True)
    for group in saved["param_groups"]:
        group.pop("decoupled_weight_decay", None)
        group["weight_decay"] = weight_decay
    torch.save(saved, path)
    return path


def test_kind_rule(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    adam = make_optimizer(model, named=True, kind="adam")
    train(model, adam, range(1, 3))
    torch.save(adam.state_dict(), tmp_path / "adam.pt")
    assert read_checkpoint(tmp_path / "adam.pt").kind == "adam"
    with pytest.raises(OptimizerKindError, match="decoupled_weight_decay=False, which is adam"):
        read_checkpoint(tmp_path / "adam.pt", kind="adamw")

    _strip(tmp_path / "adam.pt", weight_decay=0.1)  # as saved before decoupled_weight_decay existed
    with pytest.raises(OptimizerKindError, match="pass kind='adam' or kind='adamw'"):
        read_checkpoint(tmp_path / "adam.pt")
    assert read_checkpoint(tmp_path / "adam.pt", kind="adamw").kind == "adamw"
    ckpt = read_checkpoint(_strip(tmp_path / "adam.pt", weight_decay=0.0))
    assert ckpt.kind == "adam" and any("identical steps" in n for n in ckpt.provenance.inferred)


def test_non_adam_state_and_non_checkpoints_are_refused(tmp_path: Path) -> None:
    model = TinyNet()
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    train(model, sgd, range(1, 2))
    torch.save(sgd.state_dict(), tmp_path / "sgd.pt")
    with pytest.raises(CheckpointFormatError, match="momentum_buffer.*not an Adam checkpoint"):
        read_checkpoint(tmp_path / "sgd.pt", kind="adam")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointFormatError, match="not an optimizer state_dict"):
        read_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointFormatError, match="no such file"):
        read_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointFormatError, match="neither DCP's .metadata nor optimizer.pt"):
        read_checkpoint(tmp_path)
    with pytest.raises(CheckpointFormatError, match="cannot be read as a file"):
        read_checkpoint(tmp_path, format="torch")
    with pytest.raises(CheckpointFormatError, match="not a DCP directory"):
        read_checkpoint(tmp_path / "other.pt", format="dcp")
    with pytest.raises(CheckpointFormatError, match="no optimizer.pt or optimizer.bin"):
        read_checkpoint(tmp_path, format="hf")
