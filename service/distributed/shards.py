"""Tensor bodies split by shard and replies merged back, byte for byte.

A sharded stepper's request carries tensors of several shards in one safetensors body;
:func:`split` cuts it into one body per shard (the same metadata on each, every tensor's
bytes unchanged), and :func:`merge` joins the shards' safetensors replies into one body
in the stepper's parameter order (metadata from the first reply, with the per-shard lists
``adamscope.stepped`` / ``adamscope.skipped`` joined).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from adamscope.client import codec
from adamscope.client.constants import META_SKIPPED, META_STEPPED

__all__ = ["Body", "merge", "owner", "parse", "split"]

#: Metadata keys whose values are JSON lists of parameter names, joined across shards.
LIST_KEYS = (META_STEPPED, META_SKIPPED)


class Body:
    """A parsed safetensors body: entries by name, metadata, and the data section."""

    def __init__(self, raw: bytes | memoryview) -> None:
        view = memoryview(raw)
        self.entries, self.metadata, _ = codec._parse_header(view)
        start = 8 + codec.header_length(view)
        self.data = view[start:]
        self.by_name = {e.name: e for e in self.entries}

    def chunk(self, name: str) -> memoryview:
        e = self.by_name[name]
        return self.data[e.begin : e.end]


def parse(raw: bytes | memoryview) -> Body:
    return Body(raw)


def _encode(
    entries: Sequence[tuple[str, codec.Entry, memoryview]], metadata: Mapping[str, str] | None
) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, e, chunk in entries:
        header[name] = {
            "dtype": codec._TAG_OF[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + chunk.nbytes],
        }
        offset += chunk.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return b"".join([struct.pack("<Q", len(head)), head, *(c for _, _, c in entries)])


def split(
    body: Body, shards: Sequence[Sequence[str]], metadata: Mapping[str, str] | None = None
) -> list[bytes]:
    """One body per shard with the tensors of ``body`` that shard holds (in the shard's
    order; a shard none of whose tensors is in the body gets a body without tensors), and
    ``body``'s metadata (or ``metadata``)."""
    out = []
    for names in shards:
        picked = [(n, body.by_name[n], body.chunk(n)) for n in names if n in body.by_name]
        out.append(_encode(picked, body.metadata if metadata is None else metadata))
    return out


def owner(name: str, params: Collection[str]) -> str | None:
    """The parameter a tensor name is about: the name itself, or for a state tensor
    ``<param>.<key>`` (parameter names may hold dots) the part before the last dot."""
    if name in params:
        return name
    base = name.rsplit(".", 1)[0]
    return base if "." in name and base in params else None


def merge(replies: Sequence[Body], order: Sequence[str]) -> bytes:
    """The shards' replies as one body: tensors by the position of their parameter in
    ``order`` (a parameter's state tensors in the order its shard sent them)."""
    rank = {n: i for i, n in enumerate(order)}
    found = []
    for r in replies:
        for k, e in enumerate(r.entries):
            param = owner(e.name, rank.keys())
            found.append((rank[param] if param is not None else len(rank), k, r, e))
    found.sort(key=lambda x: (x[0], x[1]))
    picked = [(e.name, e, r.chunk(e.name)) for _, _, r, e in found]
    metadata = dict(replies[0].metadata) if replies else {}
    for key in LIST_KEYS:
        if any(key in r.metadata for r in replies):
            joined = {n for r in replies for n in json.loads(r.metadata.get(key, "[]"))}
            metadata[key] = json.dumps([n for n in order if n in joined])
    return _encode(picked, metadata)
