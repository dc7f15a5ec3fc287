"""Hugging Face Trainer checkpoint directories from a real Trainer run of a tiny random model."""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_support import assert_state_equal

from adamscope.client.checkpoints import NameMappingError, read_checkpoint, write_torch

transformers = pytest.importorskip("transformers")


@dataclass
class Saved:
    """What the Trainer's own optimizer held at each save, keyed by name via identity."""

    state: dict[str, dict[str, torch.Tensor]]
    values: dict[str, torch.Tensor]
    groups: list[tuple[list[str], dict[str, Any]]]


@dataclass
class HFRun:
    out: Path
    saved: dict[int, Saved] = field(default_factory=dict)
    seconds: float = 0.0


class _Dataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


def _train(out: Path, seed: int, resume: Path | None = None) -> tuple[Any, dict[int, Saved]]:
    saved: dict[int, Saved] = {}

    class Capture(transformers.TrainerCallback):  # type: ignore[misc]
        def on_save(
            self,
            args: Any,
            state: Any,
            control: Any,
            model: Any = None,
            optimizer: Any = None,
            **_: Any,
        ) -> None:
            names = {id(p): n for n, p in model.named_parameters()}
            saved[state.global_step] = Saved(
                state={
                    names[id(p)]: {k: v.clone() for k, v in s.items()}
                    for p, s in optimizer.state.items()
                },
                values={n: p.detach().clone() for n, p in model.named_parameters()},
                groups=[
                    (
                        [names[id(p)] for p in g["params"]],
                        {k: v for k, v in g.items() if k != "params"},
                    )
                    for g in optimizer.param_groups
                ],
            )

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        warmup_steps=1,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library's own chatter is not under test here
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=_Dataset(), callbacks=[Capture()]
        )
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer, saved


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> HFRun:
    out = tmp_path_factory.mktemp("hf")
    start = time.perf_counter()
    _, saved = _train(out, seed=0)
    run = HFRun(out, saved, time.perf_counter() - start)
    print(f"\nHF Trainer run (4 steps, 2 checkpoints): {run.seconds:.1f} s")
    return run


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
    trainer, _ = _train(tmp_path / "out", seed=1, resume=resume)

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
    from local_job import TinyNet, make_optimizer, named_state, train

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
