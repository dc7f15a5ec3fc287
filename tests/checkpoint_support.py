"""Real jobs that write real checkpoints (a 2-rank FSDP2 job, a Hugging Face Trainer run), and
bit-exact comparisons of optimizer state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a model hub


def run_fsdp_job(out: Path, *args: str) -> float:
    """Run ``checkpoint_fsdp_job.py`` (2 ranks, gloo); return its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(HERE / "checkpoint_fsdp_job.py"), str(out), *args],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        pytest.fail(f"FSDP job failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def load_full(
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], list[Any]]:
    """A job's gathered dump: values by name, state by name and key, param groups."""
    flat = load_file(str(path))
    values = {k.removeprefix("model/"): v for k, v in flat.items() if k.startswith("model/")}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        if key.startswith("state/"):
            _, name, leaf = key.split("/")
            state.setdefault(name, {})[leaf] = tensor
    groups = json.loads(path.with_suffix(".groups.json").read_text())
    return values, state, groups


def assert_state_equal(
    actual: dict[str, dict[str, torch.Tensor]], expected: dict[str, dict[str, torch.Tensor]]
) -> int:
    """Every state tensor equal bit for bit, dtype included; returns how many were compared."""
    assert actual.keys() == expected.keys()
    compared = 0
    for name, tensors in expected.items():
        assert actual[name].keys() == tensors.keys(), name
        for key, tensor in tensors.items():
            got = actual[name][key]
            assert got.dtype == tensor.dtype, (name, key)
            assert torch.equal(got, tensor), (name, key)
            compared += 1
    return compared


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


class TokenDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


def train_hf(out: Path, seed: int, resume: Path | None = None) -> tuple[Any, dict[int, Saved]]:
    """A tiny random Llama trained by ``transformers.Trainer`` for 4 steps (checkpoints at 2
    and 4, optionally resumed from ``resume``); what its optimizer held at each save."""
    import transformers

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
            model=model, args=args, train_dataset=TokenDataset(), callbacks=[Capture()]
        )
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer, saved
