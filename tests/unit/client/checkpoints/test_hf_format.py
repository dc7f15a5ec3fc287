"""Hugging Face Trainer checkpoint directories from a real Trainer run of a tiny random model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_support import HFRun, assert_state_equal, train_hf

from adamscope.client.checkpoints import NameMappingError, read_checkpoint, write_torch

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("step", [2, 4])
def test_reads_trainer_checkpoints_bit_exactly(hf_run: HFRun, step: int) -> None:
    source = hf_run.saved[step]
    ckpt = read_checkpoint(hf_run.out / f"checkpoint-{step}")
    assert ckpt.provenance.format == "hf" and ckpt.kind == "adamw" and ckpt.global_step == step
    assert (
        assert_state_equal({p.name: p.state for p in ckpt}, source.state) == 20 * 3
    )  # 20 trainable tensors: lm_head is the embedding
    for name, value in source.values.items():
        assert torch.equal(ckpt.params[name].value, value), name
    assert [(g.names, g.options) for g in ckpt.groups] == source.groups
    assert (
        "lm_head.weight" not in ckpt.params
    )  # tied to the embedding, as named_parameters() has it
    assert ckpt.provenance.details["scheduler_last_lr"] == [g.options["lr"] for g in ckpt.groups]


def test_trainer_resumes_from_an_export_bit_exactly(hf_run: HFRun, tmp_path: Path) -> None:
    ckpt = read_checkpoint(hf_run.out / "checkpoint-2")
    resume = tmp_path / "checkpoint-2"
    shutil.copytree(hf_run.out / "checkpoint-2", resume)
    (resume / "optimizer.pt").unlink()
    (resume / "model.safetensors").unlink()
    write_torch(ckpt, resume)
    trainer, _ = train_hf(tmp_path / "out", seed=1, resume=resume)

    final = hf_run.saved[4]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    state = {names[id(p)]: s for p, s in trainer.optimizer.state.items()}
    assert_state_equal(state, final.state)
    for name, value in trainer.model.named_parameters():
        assert torch.equal(value, final.values[name]), name


def test_a_grouping_the_trainer_would_not_make_is_refused(hf_run: HFRun, tmp_path: Path) -> None:
    odd = tmp_path / "checkpoint-2"
    shutil.copytree(hf_run.out / "checkpoint-2", odd)
    saved = torch.load(odd / "optimizer.pt", weights_only=True)
    first, second = saved["param_groups"]
    first["params"] += second["params"]
    saved["param_groups"] = [first]
    torch.save(saved, odd / "optimizer.pt")
    with pytest.raises(NameMappingError, match=r"groups of \[20\] parameters.*\[15, 5\]"):
        read_checkpoint(odd)
    names = [n for g in hf_run.saved[2].groups for n in g[0]]
    assert read_checkpoint(odd, names=names).names == names


def test_sharded_safetensors_weights_are_read(hf_run: HFRun, tmp_path: Path) -> None:
    sharded = tmp_path / "checkpoint-2"
    shutil.copytree(hf_run.out / "checkpoint-2", sharded)
    (sharded / "model.safetensors").unlink()
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf_run.out / "checkpoint-2"))
    model.save_pretrained(str(sharded), max_shard_size="20KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    ckpt = read_checkpoint(sharded)
    assert ckpt.provenance.details["weights"].endswith("model.safetensors.index.json")
    for name, value in hf_run.saved[2].values.items():
        assert torch.equal(ckpt.params[name].value, value), name


@pytest.mark.parametrize("named", [True, False])
def test_accelerate_save_state_directory(tmp_path: Path, named: bool) -> None:
    from accelerate import Accelerator
    from checkpoint_local_job import TinyNet, make_optimizer, named_state, train

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = TinyNet(n_layers=1, out=12)  # unique shapes: the sorted weights can name them
    model, optimizer = accelerator.prepare(model, make_optimizer(model, named=named))
    train(model, optimizer, range(1, 3))
    accelerator.save_state(str(tmp_path / "state"))
    assert (tmp_path / "state" / "optimizer.bin").is_file()
    ckpt = read_checkpoint(tmp_path / "state")
    how = "param_names saved" if named else "matched by shape"
    assert any(how in note for note in ckpt.provenance.inferred)
    assert_state_equal({p.name: p.state for p in ckpt}, named_state(model, optimizer.optimizer))
    for name, value in model.named_parameters():
        assert torch.equal(ckpt.params[name].value, value), name
