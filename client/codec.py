"""Tensor wire codec: the safetensors format, read and written without pickling.

A safetensors body is ``u64 little-endian header length | JSON header | raw bytes``.
The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the byte buffer after the header) and may carry a ``__metadata__``
object of string to string. This module implements that format directly so that it can
validate every byte it is given (a malformed body is a clear :class:`CodecError`, never a
crash) and so both ends avoid the extra copies a general-purpose library makes. Bodies it
writes load with ``safetensors.torch.load`` and bodies that library writes decode here.

Nothing here unpickles anything: a tensor is only ever rebuilt from its declared dtype,
shape and raw little-endian bytes.
"""

# Long: both forms a tensor travels in (safetensors bodies and JSON) and the limits they
# share (header size, depth, shapes): one contract, read as a whole.

from __future__ import annotations

import functools
import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CodecError",
    "Entry",
    "MAX_DIMS",
    "MAX_JSON_DEPTH",
    "byte_view",
    "check_shape",
    "load_json",
    "encode_parts",
    "header_length",
    "parse_header",
    "DTYPE_NAMES",
    "SAFETENSORS_DTYPES",
    "MAX_HEADER_BYTES",
    "decode",
    "encode",
    "dtype_from_name",
    "dtype_name",
    "tensor_from_json",
    "tensor_to_json",
]

#: safetensors dtype tag -> torch dtype (the subset a tensor on the wire may have).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}
_TAG_OF = {v: k for k, v in SAFETENSORS_DTYPES.items()}

#: Public dtype names used in JSON (``"float32"``) -> torch dtype.
DTYPE_NAMES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt for dt in SAFETENSORS_DTYPES.values()
}

#: Same ceiling as the reference implementation: a larger header is rejected unread.
MAX_HEADER_BYTES = 100_000_000
#: Deepest nesting accepted in any JSON received (a tensor's data nests once per dimension,
#: a safetensors header three levels): deeper input is refused before anything recurses
#: into it (Python's own parser would raise RecursionError near 1,000 levels).
MAX_JSON_DEPTH = 64
#: Most dimensions a tensor may have, and the most elements its non-empty dimensions may
#: span (so that its size in bytes, strides and offsets all fit PyTorch's int64).
MAX_DIMS = 64
MAX_SPAN = 2**60

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is LE
    raise ImportError("the safetensors wire codec assumes a little-endian host")


class CodecError(ValueError):
    """A body is not a valid safetensors buffer (or a tensor cannot be encoded)."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; raises :class:`CodecError` for unknown names."""
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        known = ", ".join(sorted(DTYPE_NAMES))
        raise CodecError(f"unknown dtype {name!r}; expected one of: {known}") from None


def _raw_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu" or t.is_conj() or t.is_neg() or not t.is_contiguous():
        # Conjugate/negative views are lazy bits a byte view cannot carry: materialize them.
        t = t.cpu().resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    if t.dim() != 1:
        t = t.reshape(-1)
    # A uint8 view shares memory with the tensor: no copy for CPU-contiguous inputs.
    return memoryview(t.view(torch.uint8).numpy())  # type: ignore[arg-type]


@functools.lru_cache(maxsize=256)
def _layout(spec: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]) -> str:
    """The JSON of a header's tensor entries (memoized: a training loop sends the same
    names, dtypes and shapes every step, only the metadata changes)."""
    entries: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in spec:
        if name == "__metadata__":
            raise CodecError("'__metadata__' is reserved and cannot name a tensor")
        tag = _TAG_OF.get(dtype)
        if tag is None:
            raise CodecError(
                f"tensor {name!r} has dtype {dtype_name(dtype)}, which safetensors cannot carry"
            )
        size = math.prod(shape) * dtype.itemsize
        entries[name] = {
            "dtype": tag,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    return json.dumps(entries, separators=(",", ":"))[1:-1]


def encode_parts(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[memoryview]]:
    """The safetensors prefix (length + header) and the tensors' raw bytes, uncopied.

    For CPU-contiguous tensors the returned views share the tensors' memory, so a sender
    can write them to a socket without any serialization copy.
    """
    fields = []
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise CodecError("safetensors metadata must map strings to strings")
        fields.append('"__metadata__":' + json.dumps(dict(metadata), separators=(",", ":")))
    layout = _layout(tuple((n, t.dtype, tuple(t.shape)) for n, t in tensors.items()))
    if layout:
        fields.append(layout)
    head = ("{" + ",".join(fields) + "}").encode()
    head += b" " * (-len(head) % 8)  # keep the data section 8-byte aligned
    chunks = [_raw_bytes(t) for t in tensors.values()]
    return struct.pack("<Q", len(head)) + head, chunks


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize ``tensors`` (in the mapping's order) and optional string metadata."""
    head, chunks = encode_parts(tensors, metadata)
    return b"".join([head, *chunks])


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors header: where its bytes lie in the data section."""

    name: str
    dtype: torch.dtype
    shape: list[int]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CodecError(f"duplicate tensor name {k!r} in safetensors header")
        out[k] = v
    return out


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests deeper than MAX_JSON_DEPTH (walked level by level, no
    recursion)."""
    level = [value]
    for _ in range(MAX_JSON_DEPTH):
        deeper: list[Any] = []
        for v in level:
            items = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
            deeper += [x for x in items if isinstance(x, list | dict)]
        if not deeper:
            return False
        level = deeper
    return True


def load_json(
    raw: str | bytes | bytearray | memoryview, what: str = "JSON", object_pairs_hook: Any = None
) -> Any:
    """``json.loads`` for anything received: malformed, non-UTF-8 or deeper than
    :data:`MAX_JSON_DEPTH` JSON is a :class:`CodecError` saying ``what`` was wrong."""
    text = bytes(raw) if isinstance(raw, bytearray | memoryview) else raw
    try:
        value = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        value = None
        deep = True
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, CodecError):
            raise
        raise CodecError(f"{what} is not valid JSON: {e}") from None
    else:
        if isinstance(text, bytes):
            brackets = text.count(b"[") + text.count(b"{")
        else:
            brackets = text.count("[") + text.count("{")
        deep = brackets > MAX_JSON_DEPTH and _too_deep(value)
    if deep:
        raise CodecError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def check_shape(shape: Any, what: str) -> list[int]:
    """``shape`` as a list of dimensions PyTorch can hold, or a :class:`CodecError`: at
    most :data:`MAX_DIMS` non-negative integers whose non-zero ones multiply to at most
    :data:`MAX_SPAN` (a larger tensor fits no machine; past int64 PyTorch itself fails)."""
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CodecError(
            f"{what} has an invalid shape {_brief(shape)}: expected a list of integers >= 0"
        )
    if len(shape) > MAX_DIMS:
        raise CodecError(f"{what} has {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    span = 1
    for d in shape:
        span *= d or 1
        if span > MAX_SPAN:
            raise CodecError(
                f"{what} has shape {_brief(shape)}, which spans more than {MAX_SPAN} elements"
            )
    return shape


def _brief(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...]"


def header_length(prefix: bytes | memoryview) -> int:
    """The header length a body's first 8 bytes declare (checked against the ceiling)."""
    if len(prefix) < 8:
        raise CodecError("body too short for a safetensors header (need at least 8 bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise CodecError(f"safetensors header of {n} bytes exceeds {MAX_HEADER_BYTES}")
    return int(n)


def parse_header(raw: bytes | memoryview) -> tuple[list[Entry], dict[str, str], int]:
    """Parse and check a header's JSON: ``(entries in header order, metadata, data length)``.

    The entries are checked to tile ``[0, data length)`` exactly (no gaps or overlaps), so a
    reader only has to check that the body's data section has exactly that length.
    """
    header = load_json(raw, "safetensors header", _reject_duplicates)
    if not isinstance(header, dict):
        raise CodecError("safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:  # absent or null; any other non-object ([], "", 0) is malformed
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CodecError("safetensors __metadata__ must map strings to strings")
    entries = [Entry(name, *_check_entry(name, e)) for name, e in header.items()]
    cursor = 0
    for entry in sorted(entries, key=lambda x: (x.begin, x.end)):
        if entry.begin != cursor:
            raise CodecError(
                f"tensor {entry.name!r} starts at byte {entry.begin}, expected {cursor}: "
                "buffers overlap or leave a gap"
            )
        cursor = entry.end
    return entries, metadata, cursor


def _parse_header(data: memoryview) -> tuple[list[Entry], dict[str, str], int]:
    n = header_length(data)
    if 8 + n > data.nbytes:
        raise CodecError(
            f"safetensors header claims {n} bytes but the body has only {data.nbytes - 8}"
        )
    entries, metadata, length = parse_header(data[8 : 8 + n])
    if length != data.nbytes - 8 - n:
        raise CodecError(
            f"tensor data covers {length} bytes but the body carries {data.nbytes - 8 - n}"
        )
    return entries, metadata, 8 + n


def _check_entry(name: str, entry: Any) -> tuple[torch.dtype, list[int], int, int]:
    if not isinstance(entry, dict):
        raise CodecError(f"header entry for {name!r} must be an object")
    tag = entry.get("dtype")
    if not isinstance(tag, str) or tag not in SAFETENSORS_DTYPES:
        raise CodecError(f"tensor {name!r} has unsupported dtype {_brief(tag)}")
    dtype = SAFETENSORS_DTYPES[tag]
    shape = check_shape(entry.get("shape"), f"tensor {name!r}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CodecError(f"tensor {name!r} has invalid data_offsets {_brief(offsets)}")
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if begin < 0 or end < begin or end - begin != expected:
        raise CodecError(
            f"tensor {name!r}: data_offsets {offsets} hold {end - begin} bytes, "
            f"but shape {shape} of {tag} needs {expected}"
        )
    return dtype, shape, begin, end


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a CPU-contiguous tensor's memory (for reading into it)."""
    if t.numel() == 0:
        return memoryview(bytearray())
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def decode(
    data: bytes | bytearray | memoryview,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors body into ``(tensors, metadata)``, checking every field.

    Tensors come back as fresh, writable CPU tensors in header order. The buffers must tile
    the data section exactly (no gaps, overlaps or trailing bytes), as the format requires.
    """
    view = memoryview(data).cast("B")
    entries, metadata, start = _parse_header(view)
    body = view[start:]
    tensors: dict[str, torch.Tensor] = {}
    for e in entries:
        out = torch.empty(e.shape, dtype=e.dtype)
        if e.end > e.begin:
            # Copy straight from the body into the destination: one pass, any alignment.
            byte_view(out)[:] = body[e.begin : e.end]
        tensors[e.name] = out
    return tensors, metadata


# ---------------------------------------------------------------- JSON form (small tensors)

#: How JSON spells the floats it has no numbers for (protobuf's convention): tensor data,
#: signals, losses and alert values alike.
SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def json_float(value: float) -> float | str:
    """A float for JSON: NaN/Inf as their conventional strings."""
    if math.isfinite(value):
        return float(value)
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _to_jsonable(x: Any) -> Any:
    if isinstance(x, list):
        return [_to_jsonable(v) for v in x]
    if isinstance(x, complex):
        return [_to_jsonable(x.real), _to_jsonable(x.imag)]
    if isinstance(x, float):
        return json_float(x)
    return x


def tensor_to_json(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as ``{"dtype", "shape", "data"}`` with nested-list data.

    Floats are printed as the shortest decimal that round-trips their exact value (float16
    and bfloat16 widen exactly to float64), non-finite values as the strings ``"NaN"``,
    ``"Infinity"`` and ``"-Infinity"``, and complex values as ``[real, imag]`` pairs.
    """
    t = t.detach().cpu()
    # float16/bfloat16 widen exactly; tolist() would go through float32 rounding anyway.
    values = t.double().tolist() if t.dtype in (torch.float16, torch.bfloat16) else t.tolist()
    return {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "data": _to_jsonable(values)}


def _from_jsonable(x: Any, is_complex: bool) -> Any:
    if isinstance(x, list):
        if is_complex and len(x) == 2 and not any(isinstance(v, list) for v in x):
            return complex(_from_jsonable(x[0], False), _from_jsonable(x[1], False))
        return [_from_jsonable(v, is_complex) for v in x]
    if isinstance(x, str):
        if x in SPECIAL_FLOATS:
            return SPECIAL_FLOATS[x]
        raise CodecError(f"unexpected string {x!r} in tensor data")
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise CodecError(f"unexpected value {x!r} in tensor data")
    return x


def tensor_from_json(
    data: Any, dtype: torch.dtype, shape: Iterable[int] | None = None
) -> torch.Tensor:
    """Rebuild a tensor from nested-list ``data`` (the inverse of :func:`tensor_to_json`)."""
    if shape is not None:
        shape = check_shape(shape if isinstance(shape, list) else list(shape), "tensor data")
    values = _from_jsonable(data, dtype.is_complex)
    try:
        t = torch.tensor(values, dtype=torch.float64 if not dtype.is_complex else torch.complex128)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CodecError(f"tensor data is not a regular nested list of numbers: {e}") from None
    t = t.to(dtype)
    if shape is not None:
        # Nested lists cannot spell an empty (0, 3) tensor: its data is [], of shape (0,).
        if t.numel() == 0 and 0 in shape:
            t = t.reshape(shape)
        if list(t.shape) != shape:
            raise CodecError(f"tensor data has shape {list(t.shape)}, expected {shape}")
    return t
