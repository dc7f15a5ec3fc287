"""A distributed watched run's ranks, merged by parameter name into one run.

Under FSDP2 every rank reports the signals of its own shards (computed where they live,
on ``DTensor.to_local()``) and answers a state read with them; the whole is put together
here. What combines how is not re-typed: each signal combines by the rule it declares
(:data:`~.kernels.COMBINE`, applied by :func:`~.merge.combine_signals`, as a sharded
stepper's shards do), with each shard weighted by its elements:

- **exact**: norms (root of the summed squares), sums, minima, maxima, element means
  (``exp_avg_sq_mean``), counts (NaN/Inf, the localized ``lr_fell``/``lr_rose``) and
  ``update_ratio`` combine exactly (up to one rounding of each addition); a NaN of any
  shard makes the whole NaN, as it does within a tensor.
- **bounds**: ``lr_eff_p1`` is the least of the shards' p1, ``lr_eff_p99`` and
  ``shock_p99`` the greatest p99: quantiles of the whole cannot be made from the parts'
  quantiles, these are outer bounds; ``lr_eff_p50`` is the element-weighted mean of the
  shards' medians (an approximation, no bound).
- **fractions**: ``eps_dominance`` is the element-weighted mean of the shards' estimates,
  each within its shard's rank error of the shard's fraction, so the whole's is within the
  largest (the merged ``estimates.rank_error``; at a confidence lowered by the union over
  the shards); ``gamma_frac`` (a fraction of the comparable elements, not of all) and
  ``amsgrad_clamp`` (scaled from the sample) merge the same way, approximately.
- **not merged**: histograms and the localized top elements (``local.top``) are left out.

Shards that hold the same block (a replicated dimension: HSDP, or a tensor that is not
sharded) count once. :func:`assemble` puts a state read's shards together into whole
tensors, bit for bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from adamscope.client import codec

from .kernels import COMBINE
from .kernels.assemble import ESTIMATES
from .merge import combine_signals

__all__ = ["MERGE_NOTE", "Part", "assemble", "merge_signals"]

#: A rank's report of one step: (rank, its cleaned signals, ``{name: its shard's place}``
#: (None: the whole tensor)).
Part = tuple[int, Mapping[str, Any], Mapping[str, Mapping[str, Any] | None]]

_ESTIMATED = {s for names in ESTIMATES.values() for s in names}
#: The signals whose merge is exact (a NaN part makes them NaN).
EXACT = tuple(s for s, rule in COMBINE.items() if s not in _ESTIMATED and rule != "ratio")
BOUNDS = ("lr_eff_p1", "lr_eff_p99", "shock_p99")
MERGE_NOTE = (
    "merged from the ranks' shards by parameter name: norms, sums, minima, maxima, means, "
    "counts and update_ratio are exact; lr_eff_p1 (least) and lr_eff_p99, shock_p99 "
    "(greatest) are outer bounds of the whole's; eps_dominance is within the largest "
    "shard's rank error; lr_eff_p50, gamma_frac and amsgrad_clamp are element-weighted "
    "means of the shards' (approximate); histograms and local.top are not merged"
)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _block(where: Mapping[str, Any] | None) -> tuple[Any, ...]:
    if where is None:
        return ("whole",)
    return (tuple(where["offset"]), tuple(where["shape"]))


def _combine(parts: Sequence[Mapping[str, Any]], weights: Sequence[int]) -> dict[str, float]:
    """The signals of several pieces, by their rules; an exact one is NaN when any piece's
    is (``combine`` leaves NaN parts out, as for shards that did not report)."""
    merged = combine_signals(parts, weights)
    out = {s: (math.nan if v is None else v) for s, v in merged.items()}
    for s in EXACT:
        if s in out and any(math.isnan(float(p.get(s, math.nan))) for p in parts):
            out[s] = math.nan
    return out


def merge_signals(
    parts: Sequence[Part], shapes: Mapping[str, Sequence[int]], world: int
) -> dict[str, Any] | None:
    """One step's signals of the whole run from its ranks' (see the module docstring);
    None when no rank reported signals. ``shapes``: each tensor's whole shape."""
    reported = [(r, s, w) for r, s, w in parts if s]
    if not reported:
        return None
    tensors: dict[str, dict[str, float]] = {}
    numels: dict[str, int] = {}
    pieces_of: dict[str, list[tuple[int, Mapping[str, Any], int]]] = {}
    blocks: dict[str, set[tuple[Any, ...]]] = {}
    for rank, signals, where in reported:
        for name, values in (signals.get("tensors") or {}).items():
            block = _block(where.get(name))
            if block in blocks.setdefault(name, set()):
                continue  # a replica of a block already counted
            blocks[name].add(block)
            place = where.get(name)
            size = _numel(place["shape"]) if place else _numel(shapes.get(name, []))
            pieces_of.setdefault(name, []).append((rank, values, size))
    for name in [n for n in shapes if n in pieces_of]:
        pieces = pieces_of[name]
        numels[name] = sum(size for _, _, size in pieces)
        tensors[name] = (
            dict(pieces[0][1])
            if len(pieces) == 1
            else _combine([v for _, v, _ in pieces], [size for _, _, size in pieces])
        )
    aggregate = _combine(list(tensors.values()), [numels[n] for n in tensors])
    first = reported[0][1]
    ranks = sorted(r for r, _, _ in reported)
    out: dict[str, Any] = {
        "step": first.get("step"),
        "time": max(float(s.get("time") or 0.0) for _, s, _ in reported),
        "tensors": tensors,
        "aggregate": {s: aggregate.get(s, math.nan) for s in first.get("aggregate", {})},
        "sample": {
            n: sum(int((s.get("sample") or {}).get(n, 0)) for _, s, _ in reported) for n in tensors
        },
        "merge": {
            "ranks": ranks,
            "world_size": world,
            "partial": len(ranks) < world,
            "exact": [s for s in EXACT if s in aggregate],
            "bounds": list(BOUNDS),
            "fractions": ["eps_dominance"],
            "approximate": ["lr_eff_p50", "gamma_frac", "amsgrad_clamp"],
            "not_merged": ["histograms", "local.top"],
            "note": MERGE_NOTE,
        },
    }
    out.update(_details(reported, pieces_of))
    return out


def _details(
    parts: Sequence[Part], pieces_of: Mapping[str, Sequence[tuple[int, Any, int]]]
) -> dict[str, Any]:
    """The estimates' bounds, faults and localized coverage of the whole."""
    out: dict[str, Any] = {}
    counted = {name: {r for r, _, _ in pieces} for name, pieces in pieces_of.items()}
    estimates = [(r, s["estimates"]) for r, s, _ in parts if s.get("estimates")]
    if estimates:
        merged = dict(estimates[0][1])
        errors: dict[str, float] = {}
        squares: dict[str, float] = {}
        for r, e in estimates:
            for name, err in (e.get("rank_error") or {}).items():
                if r in counted.get(name, ()):
                    errors[name] = max(errors.get(name, 0.0), float(err))
            for name, b in (e.get("update_rounding") or {}).items():
                if r in counted.get(name, ()):
                    squares[name] = squares.get(name, 0.0) + float(b) ** 2
        merged["rank_error"] = errors
        merged["aggregate_rank_error"] = max(float(e["aggregate_rank_error"]) for _, e in estimates)
        if squares:  # the pieces' bounds of norm(update - stored change) add as squares
            merged["update_rounding"] = {n: math.sqrt(q) for n, q in squares.items()}
            merged["aggregate_update_rounding"] = math.sqrt(sum(squares.values()))
        out["estimates"] = merged
    faults: dict[str, dict[str, dict[str, int]]] = {}
    for r, s, _ in parts:
        for name, roles in (s.get("faults") or {}).items():
            if r not in counted.get(name, ()):
                continue
            mine = faults.setdefault(name, {})
            for role, c in roles.items():
                had = mine.setdefault(role, {"nan": 0, "inf": 0})
                had["nan"] += int(c.get("nan", 0))
                had["inf"] += int(c.get("inf", 0))
    if faults:
        out["faults"] = faults
    covered = [(s.get("local") or {}).get("covered", []) for _, s, _ in parts]
    out["local"] = {"covered": sorted({n for c in covered for n in c}), "top": {}}
    return out


def assemble(bodies: Sequence[bytes]) -> bytes:
    """Whole tensors from the ranks' uploads of one state read (safetensors with metadata
    ``step``, ``rank`` and ``places``: each shard's offset, shape and whole shape), bit for
    bit; a key no rank uploaded as a shard is taken whole from the lowest rank. Raises
    ValueError when the ranks answered at different steps or the shards do not tile a
    tensor."""
    decoded = [codec.decode(b) for b in bodies]
    decoded.sort(key=lambda d: int(d[1].get("rank", "0")))
    steps = {d[1].get("step") for d in decoded}
    if len(steps) != 1:
        raise ValueError(f"the ranks answered at different steps: {sorted(map(str, steps))}")
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, set[tuple[Any, ...]]] = {}
    for tensors, meta in decoded:
        places = json.loads(meta.get("places") or "{}")
        for key, t in tensors.items():
            where = places.get(key)
            if where is None:
                out.setdefault(key, t)
                continue
            whole = out.get(key)
            if whole is None:
                whole = out[key] = torch.empty(where["global"], dtype=t.dtype)
            block = _block(where)
            if block not in blocks.setdefault(key, set()):
                blocks[key].add(block)
                whole[tuple(slice(o, o + s) for o, s in zip(*block, strict=True))] = t
    for key, found in blocks.items():
        if sum(_numel(shape) for _, shape in found) != out[key].numel():
            raise ValueError(f"{key}: the ranks' shards do not cover the tensor")
    return codec.encode(out, {"step": str(steps.pop()), "ranks": str(len(decoded))})
