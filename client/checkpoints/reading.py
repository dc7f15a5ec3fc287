"""One entry point for every format: :func:`read_checkpoint`, detecting which it is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from .checkpoint import OptimizerCheckpoint, OptimizerKind
from .dcp_format import read_dcp
from .errors import CheckpointFormatError
from .hf_format import is_hf_checkpoint, read_hf
from .torch_format import read_torch

__all__ = ["ReadFormat", "detect_format", "read_checkpoint"]

ReadFormat = Literal["auto", "dcp", "torch", "hf"]


def detect_format(path: Path) -> Literal["dcp", "torch", "hf"]:
    """``dcp`` for a directory with ``.metadata``; ``hf`` for one with ``optimizer.pt`` or
    ``optimizer.bin``; ``torch`` for a ``.pt``/``.pth``/``.bin`` file."""
    if path.is_dir():
        if (path / ".metadata").is_file():
            return "dcp"
        if is_hf_checkpoint(path):
            return "hf"
        raise CheckpointFormatError(
            f"{path}: a directory with neither DCP's .metadata nor optimizer.pt/optimizer.bin"
        )
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        return "torch"
    if not path.exists():
        raise CheckpointFormatError(f"{path}: no such file or directory")
    raise CheckpointFormatError(f"{path}: not a DCP or checkpoint directory, nor a .pt/.bin file")


def read_checkpoint(
    path: str | Path,
    format: ReadFormat = "auto",
    *,
    weights: str | Path | None = None,
    names: Sequence[str] | None = None,
    kind: OptimizerKind | None = None,
) -> OptimizerCheckpoint:
    """Read an Adam/AdamW checkpoint of any supported format into the neutral form.

    ``weights`` (torch format only) is the model's weights file; ``names`` the parameter
    names in the order the optimizer got them, for files that saved none; ``kind`` says
    Adam or AdamW where the file cannot (see ``checkpoint.infer_kind``).
    """
    path = Path(path)
    chosen = detect_format(path) if format == "auto" else format
    if weights is not None and chosen != "torch":
        raise CheckpointFormatError(f"weights= applies to the torch format only, not {chosen}")
    if chosen == "dcp":
        if names is not None:
            raise CheckpointFormatError("a DCP checkpoint names its parameters; names= is not used")
        return read_dcp(path, kind=kind)
    if chosen == "hf":
        return read_hf(path, names=names, kind=kind)
    if chosen == "torch":
        return read_torch(path, weights=weights, names=names, kind=kind)
    raise CheckpointFormatError(f"unknown format {format!r}: use auto, dcp, torch or hf")
