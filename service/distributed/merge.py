"""A sharded stepper's replies, one per shard, merged into the one reply of a stepper.

Pure functions of the shards' JSON (or safetensors) replies. What combines how is not
re-typed here: signals combine by the rule each signal declares
(:data:`~adamscope.service.inspect.kernels.COMBINE`, :mod:`adamscope.service.inspect.merge`),
and statistics merge through the same :class:`~adamscope.service.inspect.summary.Summary`
that aggregates tensors in one process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..inspect.merge import combine_signals, merge_signal_details, merge_stats_aggregate
from .cluster import ShardedRecord
from .shards import merge as merge_bodies
from .shards import parse

__all__ = [
    "Reply",
    "alerts",
    "history",
    "join_metrics",
    "signals",
    "stats",
    "summaries",
    "tensors",
]

#: A shard's reply: status, headers, body.
Reply = tuple[int, dict[str, str], bytes]


def _numel(record: ShardedRecord, shard: int) -> int:
    total = 0
    for n in record.shards[shard].params:
        size = 1
        for d in record.shapes.get(n, []):
            size *= int(d)
        total += size
    return total


def _weights(record: ShardedRecord, shards: Sequence[int]) -> list[int]:
    return [_numel(record, i) for i in shards]


def _in_order(record: ShardedRecord, found: dict[str, Any]) -> dict[str, Any]:
    return {k: found[k] for k in record.params if k in found}


def summaries(record: ShardedRecord, parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The stepper's summary from its shards' (each shard is a stepper of its own)."""
    if len(parts) == 1:
        return dict(parts[0])
    out = dict(parts[0])
    by_param = {p["name"]: p for part in parts for p in part.get("params", [])}
    out["params"] = [by_param[n] for n in record.params if n in by_param]
    out["numel"] = sum(int(p.get("numel", 0)) for p in parts)
    out["state_bytes"] = sum(int(p.get("state_bytes", 0)) for p in parts)
    prints = [p["footprint"] for p in parts if p.get("footprint")]
    if prints:  # every shard is a stepper of its own, with its own buffers: they add up
        out["footprint"] = {k: sum(int(f.get(k, 0)) for f in prints) for k in prints[0]}
    out["step"] = min(int(p.get("step", 0)) for p in parts)
    out["updated_at"] = max(float(p.get("updated_at", 0)) for p in parts)
    groups = [dict(g) for g in parts[0].get("groups", [])]
    for g in groups:
        g["params"] = [n for n in record.params if n in by_param]
    out["groups"] = groups
    persisted = [p.get("persisted_step") for p in parts]
    known = [int(p) for p in persisted if p is not None]
    out["persisted_step"] = min(known) if len(known) == len(persisted) else None
    out["dirty"] = any(bool(p.get("dirty")) for p in parts)
    briefs = [p["alerts"] for p in parts if p.get("alerts")]
    if briefs:
        latest = [b["latest"] for b in briefs if b.get("latest")]
        out["alerts"] = {
            "count": sum(int(b.get("count", 0)) for b in briefs),
            "active": sum(int(b.get("active", 0)) for b in briefs),
            "latest": max(latest, key=lambda e: e.get("step") or 0) if latest else None,
        }
    return out


def tensors(record: ShardedRecord, key: str, replies: Sequence[Reply]) -> tuple[str, bytes]:
    """Params or state reads (``key``) as one reply (media type, body), the tensors in the
    stepper's order, as JSON or safetensors as the shards answered."""
    kind = replies[0][1].get("content-type", "")
    if kind.startswith("application/json"):
        data = [json.loads(c) for _, _, c in replies]
        joined: dict[str, Any] = {}
        for d in data:
            joined.update(d.get(key) or {})
        return "application/json", json.dumps({**data[0], key: _in_order(record, joined)}).encode()
    body = merge_bodies([parse(c) for _, _, c in replies], record.params)
    return kind.split(";")[0].strip() or "application/octet-stream", body


def signals(
    record: ShardedRecord, shards: Sequence[int], parts: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The last step's signals: per tensor from the shard that holds it; the aggregate
    combined signal by signal."""
    merged = dict(parts[0])
    found: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    for p in parts:
        found.update(p.get("tensors") or {})
        samples.update(p.get("sample") or {})
    merged["tensors"] = _in_order(record, found)
    merged["sample"] = _in_order(record, samples)
    steps = [int(s) for p in parts if (s := p.get("step")) is not None]
    merged["step"] = min(steps) if len(steps) == len(parts) else None
    merged["aggregate"] = combine_signals(
        [p.get("aggregate") or {} for p in parts], _weights(record, shards)
    )
    merged.update(merge_signal_details(parts))
    return merged


def history(
    record: ShardedRecord, shards: Sequence[int], parts: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The history of the steps every shard recorded (they step together; a shard restored
    from disk may lack the steps its memory-only history had), its aggregate combined
    step by step, and each tensor's series from the shard that holds it."""
    merged = dict(parts[0])
    common = set(parts[0]["aggregate"]["steps"])
    for p in parts[1:]:
        common &= set(p["aggregate"]["steps"])
    steps = [st for st in parts[0]["aggregate"]["steps"] if st in common]
    rows = [{st: k for k, st in enumerate(p["aggregate"]["steps"])} for p in parts]
    signal_names = list(merged.get("signals", []))
    weights = _weights(record, shards)
    columns: dict[str, list[Any]] = {s: [] for s in signal_names}
    for st in steps:
        rowwise = [
            {
                s: p["aggregate"]["values"].get(s, [None] * (rows[i][st] + 1))[rows[i][st]]
                for s in signal_names
            }
            for i, p in enumerate(parts)
        ]
        combined = combine_signals(rowwise, weights)
        for s in signal_names:
            columns[s].append(combined.get(s))
    times = [parts[0]["aggregate"]["time"][rows[0][st]] for st in steps]
    merged["aggregate"] = {"steps": steps, "time": times, "values": columns}
    if "counts" in parts[0]["aggregate"]:  # a whole-run query: points may be buckets
        merged["aggregate"].update(_extents(parts, steps, rows, signal_names, weights))
    found: dict[str, Any] = {}
    for p in parts:
        found.update(p.get("tensors") or {})
    merged["tensors"] = _in_order(record, found)
    return merged


#: What a whole-run history reply of a sharded stepper says of its merged bucket points.
BUCKETS_NOTE = (
    "points with counts > 1 are buckets of several steps, merged from each shard's bucket: "
    "their mean is exact for sum and mean signals and an approximation for the others, "
    "and their min and max bound the merged steps' values from outside for the norm, sum "
    "and mean signals; a point of one step combines as the latest step's signals do, its "
    "min and max equal to its value"
)


def _extents(
    parts: Sequence[dict[str, Any]],
    steps: Sequence[int],
    rows: Sequence[dict[int, int]],
    signal_names: Sequence[str],
    weights: Sequence[int],
) -> dict[str, Any]:
    """``first_steps``, ``counts``, ``min`` and ``max`` of a whole-run reply's points
    (``steps``, common to every shard), each extreme combined from the shards' by the
    signal's rule: the exact value for a point of one step (its min and max are its
    value), outer bounds for a bucket (every rule is monotone in each shard's value)."""
    first = parts[0]["aggregate"]
    out: dict[str, Any] = {
        "first_steps": [first["first_steps"][rows[0][st]] for st in steps],
        "counts": [
            min(int(p["aggregate"]["counts"][r[st]]) for p, r in zip(parts, rows, strict=True))
            for st in steps
        ],
    }
    for key in ("min", "max"):
        cols: dict[str, list[Any]] = {s: [] for s in signal_names}
        for st in steps:
            rowwise = [
                {
                    s: (p["aggregate"][key].get(s) or [None] * (r[st] + 1))[r[st]]
                    for s in signal_names
                }
                for p, r in zip(parts, rows, strict=True)
            ]
            combined = combine_signals(rowwise, weights)
            for s in signal_names:
                cols[s].append(combined.get(s))
        out[key] = cols
    if any(n > 1 for n in out["counts"]):
        out["note"] = BUCKETS_NOTE
    return out


def stats(
    record: ShardedRecord, shards: Sequence[int], parts: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Statistics: per tensor from its shard; each key's aggregate merged exactly where it
    can be (counts, norm, mean, std, extremes), quantiles and histograms left per tensor."""
    merged = dict(parts[0])
    found: dict[str, Any] = {}
    for p in parts:
        found.update(p.get("tensors") or {})
    merged["tensors"] = _in_order(record, found)
    merged["missing"] = [m for p in parts for m in p.get("missing", [])]
    if "aggregate" in merged and len(parts) > 1:
        keys = dict.fromkeys(k for p in parts for k in (p.get("aggregate") or {}))
        merged["aggregate"] = {
            key: {
                **merge_stats_aggregate(
                    [p["aggregate"][key] for p in parts if key in (p.get("aggregate") or {})]
                ),
                "shards": len(parts),
                "note": "merged across shards: counts, norm, mean, std, min and max are "
                "exact; quantiles and histograms are per tensor (ask for one "
                "tensor by name)",
            }
            for key in keys
        }
    return merged


def alerts(
    record: ShardedRecord, parts: Sequence[dict[str, Any]], limit: int | None
) -> dict[str, Any]:
    """Alert reports: every shard's events in step order (the latest ``limit``), counts
    added, what holds now on any shard."""
    merged = dict(parts[0])
    if "events" in merged:
        events = sorted(
            (e for p in parts for e in p.get("events", [])),
            key=lambda e: (e.get("step") or 0, e.get("time") or 0),
        )
        merged["events"] = events[-limit:] if limit else events
        merged["count"] = sum(int(p.get("count", 0)) for p in parts)
        merged["active"] = [a for p in parts for a in p.get("active", [])]
    return merged


def join_metrics(texts: Sequence[bytes]) -> bytes:
    """The slots' Prometheus texts as one: each family's HELP/TYPE once, samples of every
    slot (per-stepper series name their stepper; process-wide ones add up per slot)."""
    seen: set[bytes] = set()
    out: list[bytes] = []
    for text in texts:
        for line in text.splitlines():
            if line.startswith(b"# "):
                if line in seen:
                    continue
                seen.add(line)
            out.append(line)
    return b"\n".join(out) + b"\n"
