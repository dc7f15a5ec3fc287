"""Input generators for the fuzz test (test_fuzz.py): fixtures, and what the OpenAPI
document cannot say about this API's inputs.

The document can only say "binary" for a tensor body, "object" for a JSON tensor map and
"list of strings" for parameter names; schemathesis then generates bytes, objects and strings
that stop at the first check (the safetensors header length, the first unknown name). The
strategies here reach the checks behind those: well-formed safetensors aimed at the fixtures
(their parameter and state names, shapes and dtypes, mixed with wrong ones; hostile values;
option and spec metadata of arbitrary JSON), the same corrupted, plain random bytes, the
fixtures' snapshot files (import bodies) intact or corrupted; JSON tensor maps with right and
wrong names and shapes; and query name lists mixing real and unknown names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import schemathesis
import torch
from hypothesis import strategies as st

from adamscope.client import codec
from adamscope.client.constants import META_GROUPS, META_SPEC, OPTION_NAMES

#: Every option PyTorch knows, and one it does not.
FUZZED_OPTIONS = (*OPTION_NAMES, "bogus")

__all__ = [
    "CHECKPOINT_FILES",
    "FIXTURES",
    "SNAP",
    "Fixture",
    "aimed_bodies",
    "corrupted",
    "json_bodies",
    "query_overrides",
]

SNAP = "snap0"


@dataclass(frozen=True)
class Fixture:
    """A stepper that exists before every request, and how it is built."""

    name: str
    params: dict[str, tuple[tuple[int, ...], torch.dtype]]
    optimizer: str
    hyper: dict[str, Any]
    groups: list[dict[str, Any]] | None
    steps: int

    def values(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(len(self.name))
        return {
            n: torch.randn(s, generator=g, dtype=torch.float64).to(d)
            for n, (s, d) in self.params.items()
        }

    def grads(self, k: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + k)
        return {
            n: torch.randn(s, generator=g, dtype=torch.float64).to(d)
            for n, (s, d) in self.params.items()
        }

    def local(self) -> dict[str, torch.Tensor]:
        """Its parameters after its steps, computed with a local torch optimizer."""
        params = {n: t.clone().requires_grad_(True) for n, t in self.values().items()}
        cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        groups = self.groups or [{"params": list(params)}]
        local = cls(
            [{**g, "params": [params[n] for n in g["params"]]} for g in groups], **self.hyper
        )
        for k in range(1, self.steps + 1):
            for n, g in self.grads(k).items():
                params[n].grad = g
            local.step()
        return {n: p.detach() for n, p in params.items()}


F32, BF16 = torch.float32, torch.bfloat16
FIXTURES = (
    Fixture(
        "fz-amsgrad",
        {"w": ((3, 4), F32), "b": ((4,), F32)},
        "adam",
        {"lr": 1e-2, "amsgrad": True},
        None,
        steps=3,
    ),
    Fixture(
        "fz-groups",
        {"w": ((2, 3), F32), "b": ((3,), F32), "h": ((4,), BF16)},
        "adamw",
        {"lr": 1e-2, "weight_decay": 0.1},
        [{"params": ["w", "b"]}, {"params": ["h"], "lr": 5e-2, "amsgrad": True}],
        steps=2,
    ),
    Fixture("fz-fresh", {"x": ((5,), F32)}, "adam", {}, None, steps=0),
)

PARAM_NAMES = sorted({n for fx in FIXTURES for n in fx.params})
STEPPER_NAMES = [fx.name for fx in FIXTURES] + ["fz-new", "", "../x", "a/b"]
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "param", "")
SHAPES = sorted({s for fx in FIXTURES for s, _ in fx.params.values()}) + [(), (0,), (1,)]
DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float64,
    torch.float16,
    torch.complex64,
    torch.int64,
    torch.uint8,
    torch.bool,
]
#: Snapshot files of the fixtures, filled in once the server runs.
CHECKPOINT_FILES: list[bytes] = []

#: JSON as requests sends it: finite numbers (non-finite ones as the codec's strings).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["NaN", "-Infinity"])
    | st.text(max_size=4)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
#: Inside safetensors metadata, Python's json writes NaN and Infinity, and the service reads it.
meta_values = json_values | st.sampled_from([float("nan"), float("inf"), -1.0, 1e308])


def group_options(values: st.SearchStrategy[Any]) -> st.SearchStrategy[list[dict[str, Any]]]:
    return st.lists(
        st.dictionaries(st.sampled_from(FUZZED_OPTIONS), values, max_size=3), max_size=3
    )


param_names = st.sampled_from(PARAM_NAMES) | st.sampled_from(["zz", "", "w.exp_avg"])
tensor_names = (
    st.sampled_from(PARAM_NAMES)
    | st.sampled_from(PARAM_NAMES)
    | st.builds(lambda p, k: f"{p}.{k}", st.sampled_from(PARAM_NAMES), st.sampled_from(STATE_KEYS))
    | st.text(max_size=6)
)
shapes = st.sampled_from(SHAPES) | st.lists(st.integers(0, 4), max_size=3).map(tuple)
fills = st.sampled_from([0.0, 1.0, -1e30, 1e-45, float("nan"), float("inf")])

# ------------------------------------------------------------------ safetensors bodies


@st.composite
def specs(draw: st.DrawFn, names: list[str]) -> dict[str, Any]:
    """A create spec naming ``names``, every field drawn from valid and invalid values."""
    spec: dict[str, Any] = {
        "name": draw(st.sampled_from(STEPPER_NAMES)),
        "optimizer": draw(st.sampled_from(["adam", "adamw", "sgd"])),
        "params": [{"name": n} for n in names],
        "hyperparameters": draw(
            st.dictionaries(st.sampled_from(FUZZED_OPTIONS), meta_values, max_size=3)
        ),
    }
    if draw(st.booleans()):
        spec["groups"] = [
            {"params": draw(st.lists(st.sampled_from(names or ["w"]), max_size=3))}
            for _ in range(2)
        ]
    if draw(st.booleans()):
        spec["durability"] = draw(
            st.sampled_from([{"mode": "manual"}, {"mode": "every_n"}]) | json_values
        )
    return spec


def _meta_of(fx: Fixture, name: str) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Shape and dtype a tensor named ``name`` (a parameter or '<param>.<key>') should have
    for fixture ``fx``, if it names one of its parameters."""
    if name in fx.params:
        return fx.params[name]
    pname, _, key = name.rpartition(".")
    if pname not in fx.params:
        return None
    return ((), torch.float32) if key == "step" else fx.params[pname]


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """Tensors aimed at one fixture: mostly its names, shapes and dtypes, some wrong."""
    fx = draw(st.sampled_from(FIXTURES))
    own = st.sampled_from(list(fx.params)) | st.builds(
        lambda p, k: f"{p}.{k}", st.sampled_from(list(fx.params)), st.sampled_from(STATE_KEYS)
    )
    out = {}
    for name in draw(st.lists(own | own | tensor_names, max_size=3, unique=True)):
        meta = _meta_of(fx, name)
        right = [meta] * 2 if meta is not None else []
        shape, dtype = draw(st.sampled_from(right + [(None, None)]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        t = torch.randn(
            shape if shape is not None else draw(shapes), generator=g, dtype=torch.float64
        )
        if draw(st.booleans()) and t.numel():
            t = t.fill_(draw(fills))
        out[name] = t.to(dtype if dtype is not None else draw(st.sampled_from(DTYPES)))
    return out


@st.composite
def safetensors_bodies(draw: st.DrawFn) -> bytes:
    values = draw(tensors())
    meta: dict[str, str] = {}
    if draw(st.booleans()):
        groups = draw(group_options(meta_values) | meta_values)
        meta[META_GROUPS] = json.dumps(groups) if draw(st.booleans()) else draw(st.text())
    if draw(st.booleans()):
        meta[META_SPEC] = json.dumps(draw(specs(list(values)) | json_values))
    return codec.encode(values, meta or None)


@st.composite
def corrupted(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> bytes:
    body = bytearray(draw(bodies))
    how = draw(st.sampled_from(["truncate", "flip", "append", "length"]))
    at = draw(st.integers(0, max(len(body) - 1, 0)))
    if how == "truncate":
        return bytes(body[:at])
    if how == "flip" and body:
        body[at] ^= 1 << draw(st.integers(0, 7))
    elif how == "append":
        body += draw(st.binary(min_size=1, max_size=16))
    elif how == "length" and len(body) >= 8:
        body[:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    return bytes(body)


SPOILERS = ("unknown name", "shape", "dtype", "scalar shape", "options", "none")
#: Option changes a step may carry for one group (as metadata), valid and invalid; amsgrad
#: turned on is invalid_state where the group has state without max_exp_avg_sq.
GOOD_CHANGES = ({}, {"lr": 1e-3}, {"betas": [0.8, 0.99]}, {"lr": 2e-3, "maximize": True})
BAD_CHANGES = (
    {"lr": -1.0},
    {"lr": float("nan")},
    {"amsgrad": True},
    {"betas": [1.0, 0.9]},
    {"eps": -1.0},
    {"bogus": 1},
    {"lr": "fast"},
    {"fused": True, "foreach": True},
)


@st.composite
def aimed_bodies(draw: st.DrawFn, fx: Fixture, kind: str) -> bytes:
    """A body that is right for fixture ``fx`` in every tensor but (usually) one: the case
    that shows whether a rejected request was applied in part. ``kind``: "params" names
    tensors by parameter (step, params), "state" by '<param>.<key>'."""
    names = draw(st.lists(st.sampled_from(list(fx.params)), min_size=1, unique=True))
    if kind == "state":
        keys = draw(st.lists(st.sampled_from(STATE_KEYS[:4]), min_size=1, unique=True))
        names = [f"{n}.{k}" for n in names for k in keys]
    values: dict[str, torch.Tensor] = {}
    for name in names:
        shape, dtype = _meta_of(fx, name) or ((), torch.float32)
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        values[name] = t.abs() if name.endswith(("exp_avg_sq", ".step")) else t
        values[name] = values[name].to(dtype)
    spoiler = draw(st.sampled_from(SPOILERS))
    victim = draw(st.sampled_from(sorted(values)))
    if spoiler == "unknown name":
        values[draw(st.sampled_from(["zz", "zz.exp_avg", f"{victim}x"]))] = values[victim]
    elif spoiler == "shape":
        values[victim] = torch.zeros(values[victim].numel() + 1, dtype=values[victim].dtype)
    elif spoiler == "dtype":
        values[victim] = values[victim].to(
            torch.float64 if values[victim].dtype != torch.float64 else torch.float16
        )
    elif spoiler == "scalar shape":
        values[victim] = torch.zeros((), dtype=values[victim].dtype)
    meta = {}
    n_groups = len(fx.groups or [None])
    if spoiler == "options":  # every tensor right, one group's change wrong
        changes = draw(
            st.lists(st.sampled_from(GOOD_CHANGES), min_size=n_groups, max_size=n_groups)
        )
        changes[draw(st.integers(0, n_groups - 1))] = draw(st.sampled_from(BAD_CHANGES))
        meta[META_GROUPS] = json.dumps(changes)
    elif draw(st.booleans()):
        meta[META_GROUPS] = json.dumps(
            draw(
                st.lists(st.sampled_from(GOOD_CHANGES), min_size=n_groups, max_size=n_groups)
                | group_options(meta_values)
            )
        )
    return codec.encode(values, meta or None)


checkpoint_files = st.deferred(lambda: st.sampled_from(CHECKPOINT_FILES))
octet_bodies = st.one_of(
    safetensors_bodies(),
    corrupted(safetensors_bodies()),
    st.binary(max_size=64),
    checkpoint_files,
    corrupted(checkpoint_files),
)
# Process-wide in schemathesis; only the fuzz test uses schemathesis.
schemathesis.openapi.media_type("application/octet-stream", octet_bodies)

# ------------------------------------------------------------------ JSON tensor bodies


@st.composite
def json_tensors(draw: st.DrawFn) -> Any:
    """A JSON tensor: nested lists of some shape, or {"data", "dtype"?, "shape"?}."""
    data = (
        codec.tensor_to_json(torch.zeros(draw(shapes)).fill_(draw(fills)))["data"]
        if draw(st.booleans())
        else draw(json_values)
    )
    if draw(st.booleans()):
        return data
    out: dict[str, Any] = {"data": data}
    if draw(st.booleans()):
        out["dtype"] = draw(st.sampled_from([*codec.DTYPE_NAMES, "float128"]))
    if draw(st.booleans()):
        out["shape"] = draw(st.lists(st.integers(-1, 4), max_size=3) | json_values)
    return out


json_params = st.fixed_dictionaries(
    {"params": st.dictionaries(param_names, json_tensors(), max_size=3) | json_values}
)
json_state = st.fixed_dictionaries(
    {
        "state": st.dictionaries(
            param_names,
            st.dictionaries(st.sampled_from(STATE_KEYS), json_tensors(), max_size=3),
            max_size=2,
        )
        | json_values
    },
    optional={"param_groups": group_options(json_values) | json_values},
)


def json_bodies(path: str) -> st.SearchStrategy[Any] | None:
    """Targeted JSON bodies for the routes whose document says only "object"."""
    if path.endswith("/params"):
        return json_params
    if path.endswith("/state"):
        return json_state
    return None


# ------------------------------------------------------------------ query names

QUERY_TARGETS = {
    "name": st.sampled_from(PARAM_NAMES + STEPPER_NAMES),
    "key": st.sampled_from([*STATE_KEYS, "bogus"]),
}


def query_overrides(operation: dict[str, Any]) -> dict[str, st.SearchStrategy[Any]]:
    """For an operation of the OpenAPI document: real and unknown values for its ``name`` and
    ``key`` query parameters (a list of them where the parameter takes a list)."""
    out = {}
    for p in operation.get("parameters", []):
        pool = QUERY_TARGETS.get(p["name"]) if p["in"] == "query" else None
        if pool is not None:
            is_list = '"array"' in json.dumps(p.get("schema", {}))
            out[p["name"]] = st.lists(pool, min_size=1, max_size=3) if is_list else pool
    return out
