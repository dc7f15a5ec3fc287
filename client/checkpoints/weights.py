"""Model weight files: one or sharded safetensors, or a ``torch.save``-d state dict.

Safetensors cannot run code, so they are read with the ``safetensors`` library; ``.pt`` /
``.bin`` files only ever with ``torch.load(weights_only=True)``. A ``torch.save``-d state
dict keeps the model's order (``Module.state_dict()`` order) and the sharing of tied
weights, which this module folds so that each parameter appears once under the first name
``named_parameters()`` would give it. A safetensors file is sorted by name, so its order
says nothing about the model's, and :attr:`Weights.ordered` is False for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointFormatError
from .unpickling import load_torch_file

__all__ = ["WEIGHT_FILES", "Weights", "find_weights", "read_weights", "write_safetensors"]

#: Weight files looked for in a model/checkpoint directory, in order of preference.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass
class Weights:
    """Named floating-point tensors read from a weights file.

    ``ordered`` says whether the names are in the model's order; ``aliases`` maps each
    folded tied-weight name to the name it was kept under; ``skipped`` lists tensors that
    cannot be parameters (integer buffers such as BatchNorm's ``num_batches_tracked``).
    """

    tensors: dict[str, torch.Tensor]
    ordered: bool
    source: str
    aliases: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.tensors.items()}


def find_weights(directory: Path) -> Path | None:
    """The first of :data:`WEIGHT_FILES` present in ``directory``."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def read_weights(path: Path) -> Weights:
    """Read a ``.safetensors`` file, a sharded index ``.json``, or a ``.pt``/``.bin`` file."""
    if path.name.endswith(".index.json"):
        return _read_index(path)
    if path.suffix == ".safetensors":
        return Weights(_load_safetensors(path), ordered=False, source=str(path))
    if path.suffix in (".pt", ".pth", ".bin"):
        return _fold(_load_torch_state_dict(path), str(path))
    raise CheckpointFormatError(f"{path}: unknown weights format (want .safetensors, .pt, .bin)")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path}: no such file") from None
    except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
        raise CheckpointFormatError(f"{path}: not a safetensors file ({exc})") from None


def _load_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    loaded = load_torch_file(path)
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise CheckpointFormatError(f"{path}: not a model state dict (a dict of name -> tensor)")
    return loaded


def _read_index(path: Path) -> Weights:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointFormatError(f"{path}: not a sharded weights index ({exc})") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = path.parent / shard
        if shard_path.suffix == ".safetensors":
            tensors.update(_load_safetensors(shard_path))
        else:
            tensors.update(_load_torch_state_dict(shard_path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointFormatError(f"{path}: shards lack {missing[:5]}")
    return Weights(tensors, ordered=False, source=str(path))


def _fold(state_dict: dict[str, torch.Tensor], source: str) -> Weights:
    """Keep floating tensors once each, under the first name sharing their storage."""
    kept: dict[str, torch.Tensor] = {}
    first: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    weights = Weights(kept, ordered=True, source=source)
    for name, tensor in state_dict.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            weights.skipped.append(name)
            continue
        key = (
            tensor.untyped_storage().data_ptr(),
            int(tensor.storage_offset()),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if key in first and tensor.numel() > 0:
            weights.aliases[name] = first[key]
            continue
        first[key] = name
        kept[name] = tensor
    return weights


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as one safetensors file (each tensor copied contiguous)."""
    # transformers refuses safetensors files without this metadata entry.
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    save_file(contiguous, str(path), metadata={"format": "pt"})
