"""The only ways this package turns pickled bytes into objects, all of them restricted.

Checkpoints are pickles, and a pickle can run any code when loaded. So ``torch.load`` is
only ever called with ``weights_only=True`` (tensors, containers and plain values; no
arbitrary classes), and DCP's ``.metadata`` file, which ``torch.distributed.checkpoint``
itself reads with unrestricted ``pickle.load``, is read with an unpickler that resolves only
the handful of DCP metadata classes it holds. Anything else is refused with
:class:`~.errors.UnsafeCheckpointError` before it can execute.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import IO, Any

import torch
from torch.distributed.checkpoint.metadata import Metadata

from .errors import CheckpointFormatError, UnsafeCheckpointError

__all__ = ["load_dcp_metadata", "load_torch_bytes", "load_torch_file"]


def load_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")``, with our errors."""
    try:
        with path.open("rb") as stream:
            return _load_weights_only(stream, str(path))
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path}: no such file") from None
    except OSError as exc:  # a directory, no permission...
        raise CheckpointFormatError(f"{path}: cannot be read as a file ({exc.strerror})") from None


def load_torch_bytes(data: io.BytesIO, what: str) -> Any:
    """Load one ``torch.save``-d value held in memory, ``weights_only`` as for files."""
    return _load_weights_only(data, what)


def _load_weights_only(stream: IO[bytes], what: str) -> Any:
    try:
        return torch.load(stream, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        # torch's message names the offending global; its advice to retry with
        # weights_only=False is exactly what we must not do, so only the first line is kept.
        reason = str(exc).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "global" in line), "")
        raise UnsafeCheckpointError(
            f"refused to load {what}: it is not a plain tensor/state-dict file and would need "
            f"unrestricted unpickling, which can run code; nothing in it was executed. {detail}"
        ) from None
    except (RuntimeError, EOFError) as exc:
        raise CheckpointFormatError(f"{what}: not a torch.save file ({exc})") from None


def _is_dtype(name: str) -> bool:
    return isinstance(getattr(torch, name, None), torch.dtype)


_DCP_METADATA_CLASSES: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata dataclasses, torch dtypes/sizes/layouts and paths."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _DCP_METADATA_CLASSES.get(module, frozenset())
        if allowed or (module == "torch" and _is_dtype(name)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refused to load DCP metadata: it references {module}.{name}, which is not one "
            "of the DCP metadata classes; nothing in it was executed"
        )


def load_dcp_metadata(path: Path) -> Metadata:
    """Read a DCP directory's ``.metadata`` without unrestricted unpickling."""
    metadata_path = path / ".metadata"
    try:
        with metadata_path.open("rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except OSError:
        raise CheckpointFormatError(f"{path}: no .metadata file, not a DCP directory") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
        raise CheckpointFormatError(f"{metadata_path}: unreadable DCP metadata ({exc})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointFormatError(
            f"{metadata_path}: holds {type(metadata).__name__}, not DCP Metadata"
        )
    return metadata
