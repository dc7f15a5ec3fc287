"""Hugging Face ``Trainer`` (and Accelerate ``save_state``) checkpoint directories.

A Trainer's ``checkpoint-N/`` holds ``optimizer.pt`` (the optimizer's index-format
``state_dict``, without names), ``scheduler.pt``, ``model.safetensors`` (or shards and an
index), ``config.json``, ``trainer_state.json``, ``rng_state.pth`` and
``training_args.bin``. ``training_args.bin`` is a pickle of a whole ``TrainingArguments``
object and is never opened here: everything needed is elsewhere.

Names, when ``optimizer.pt`` saved no ``param_names`` and no ``names=`` is given, are
recovered the way ``Trainer.create_optimizer`` assigned them: it builds two groups from
``model.named_parameters()`` (trainable parameters only), first those
``Trainer.get_decay_parameter_names`` returns (with ``args.weight_decay``), then the rest
(``weight_decay`` 0.0), each in ``named_parameters()`` order. The model is rebuilt from
``config.json`` on the meta device (no memory, no download) with the installed
``transformers``, and that layout is checked against the file: two groups, the same sizes,
the second with weight decay 0, and every ``exp_avg`` shape equal to its parameter's. A
checkpoint written by another grouping (a custom ``create_optimizer``, frozen parameters,
several device meshes) fails that check with a clear error; pass ``names=`` then.

The learning rate in the groups is the scheduler's last one, i.e. the rate of the *next*
step; ``scheduler.pt``'s ``_last_lr`` (read ``weights_only``) is recorded and checked
against it. ``trainer_state.json`` gives ``global_step``; its ``log_history`` holds the rate
each logged step *used*, one step behind.

An Accelerate ``save_state`` directory (``optimizer.bin``, ``model.safetensors``) holds an
optimizer the user built, so there is no grouping to reproduce: names come from
``param_names``, ``names=`` or the weights' unique shapes as for the torch format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import OptimizerCheckpoint, OptimizerKind, Provenance
from .errors import CheckpointFormatError, NameMappingError
from .naming import Shape, match_by_position, optimizer_shapes
from .state_dicts import from_state_dict, group_layout, saved_param_names
from .torch_format import resolve_names
from .unpickling import load_torch_file
from .weights import Weights, find_weights, read_weights

__all__ = ["OPTIMIZER_FILES", "is_hf_checkpoint", "read_hf", "trainer_layout"]

OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
_SCHEDULER_FILES = ("scheduler.pt", "scheduler.bin")


def is_hf_checkpoint(path: Path) -> bool:
    """A directory holding a Trainer's ``optimizer.pt`` or Accelerate's ``optimizer.bin``."""
    return path.is_dir() and any((path / name).is_file() for name in OPTIMIZER_FILES)


def read_hf(
    path: str | Path,
    *,
    names: Sequence[str] | None = None,
    kind: OptimizerKind | None = None,
) -> OptimizerCheckpoint:
    """Read a Trainer/Accelerate checkpoint directory into the neutral form."""
    path = Path(path)
    optimizer_file = next((path / n for n in OPTIMIZER_FILES if (path / n).is_file()), None)
    if optimizer_file is None:
        raise CheckpointFormatError(f"{path}: no {' or '.join(OPTIMIZER_FILES)}")
    state_dict = load_torch_file(optimizer_file)
    group_layout(state_dict, str(optimizer_file))
    provenance = Provenance("hf", str(path))
    weights_file = find_weights(path)
    weights = read_weights(weights_file) if weights_file is not None else None
    if weights is not None:
        provenance.details["weights"] = weights.source
    per_group = _names(path, state_dict, names, weights, provenance)
    values = None
    if weights is not None:
        values = {n: weights.tensors[n] for g in per_group for n in g if n in weights.tensors}
        missing = [n for g in per_group for n in g if n not in values]
        if missing:
            provenance.inferred.append(f"no value in the weights for {missing}")
    step = _read_trainer_state(path, provenance)
    checkpoint = from_state_dict(
        state_dict, per_group, provenance, values=values, kind=kind, global_step=step
    )
    _check_scheduler(path, checkpoint, provenance)
    return checkpoint


def _names(
    path: Path,
    state_dict: dict[str, Any],
    names: Sequence[str] | None,
    weights: Weights | None,
    provenance: Provenance,
) -> list[list[str]]:
    if names is not None or saved_param_names(state_dict) is not None:
        return resolve_names(state_dict, names, weights, provenance)
    if not (path / "config.json").is_file():
        provenance.inferred.append("no config.json: not a Trainer checkpoint, names from weights")
        return resolve_names(state_dict, None, weights, provenance)
    decay, no_decay, shapes = trainer_layout(path, provenance)
    sizes = [len(g["params"]) for g in state_dict["param_groups"]]
    if sizes != [len(decay), len(no_decay)]:
        raise NameMappingError(
            f"{path}: the optimizer has groups of {sizes} parameters, but the Trainer would "
            f"have grouped this model's trainable parameters as [{len(decay)}, "
            f"{len(no_decay)}] (decay, no decay): it was built another way (custom "
            "create_optimizer, frozen parameters, several device meshes); pass names="
        )
    no_decay_wd = state_dict["param_groups"][1].get("weight_decay")
    if no_decay_wd != 0.0:
        raise NameMappingError(
            f"{path}: the second group has weight_decay {no_decay_wd}, not the Trainer's 0.0 "
            "for its no-decay group; pass names="
        )
    per_group, note = match_by_position(
        decay + no_decay, shapes, optimizer_shapes(state_dict), sizes, "the Trainer's grouping"
    )
    provenance.inferred.append(
        "names: Trainer.create_optimizer's two groups (get_decay_parameter_names, then the "
        f"rest) of the model rebuilt from config.json; {note}"
    )
    return per_group


def trainer_layout(
    path: Path, provenance: Provenance
) -> tuple[list[str], list[str], dict[str, Shape]]:
    """The Trainer's decay and no-decay names, and every parameter's shape, for this model."""
    try:
        import transformers
    except ImportError:
        raise NameMappingError(
            "recovering names from config.json needs the transformers package; install it "
            "or pass names="
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds for an unusable config
        raise NameMappingError(f"{path}/config.json cannot be used ({exc}); pass names=") from None
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if not (
        isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)
    ):
        raise NameMappingError(
            f"{path}/config.json names architectures {architectures}, which is not a model "
            "class of the installed transformers; pass names="
        )
    with torch.device("meta"):
        model = model_class(config)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # The Trainer's own method, so the patterns (bias, layernorm, rmsnorm, norm...) are the
    # installed version's; it uses no instance state, hence no Trainer is built for it.
    try:
        unbound: Any = transformers.Trainer.get_decay_parameter_names
        decay_names = set(unbound(None, model))
    except Exception as exc:  # a future version that needs a real Trainer lands here
        raise NameMappingError(
            f"cannot reproduce the Trainer's decay grouping with transformers "
            f"{transformers.__version__} ({exc!r}); pass names="
        ) from None
    decay = [n for n, _ in trainable if n in decay_names]
    no_decay = [n for n, _ in trainable if n not in decay_names]
    provenance.details["architecture"] = architectures[0]
    provenance.details["transformers"] = transformers.__version__
    return decay, no_decay, {n: tuple(p.shape) for n, p in trainable}


def _read_trainer_state(path: Path, provenance: Provenance) -> int | None:
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
    except ValueError as exc:
        raise CheckpointFormatError(f"{state_file}: not JSON ({exc})") from None
    history = [e for e in state.get("log_history", []) if "learning_rate" in e]
    if history:
        provenance.details["logged_learning_rate"] = history[-1]["learning_rate"]
        provenance.details["logged_learning_rate_step"] = history[-1].get("step")
    provenance.details["epoch"] = state.get("epoch")
    step = state.get("global_step")
    return step if isinstance(step, int) else None


def _check_scheduler(path: Path, checkpoint: OptimizerCheckpoint, provenance: Provenance) -> None:
    scheduler_file = next((path / n for n in _SCHEDULER_FILES if (path / n).is_file()), None)
    if scheduler_file is None:
        return
    scheduler = load_torch_file(scheduler_file)
    last = scheduler.get("_last_lr") if isinstance(scheduler, dict) else None
    if not isinstance(last, list):
        return
    provenance.details["scheduler_last_lr"] = last
    group_lrs = [g.options.get("lr") for g in checkpoint.groups]
    if len(last) == len(group_lrs) and last != group_lrs:
        provenance.inferred.append(
            f"scheduler.pt's last lr {last} differs from the groups' lr {group_lrs}; the "
            "groups' values are kept (they are what the optimizer would use)"
        )
