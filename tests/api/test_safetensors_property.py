"""Property: no safetensors header or metadata, however hostile, gets anything but a 4xx
problem+json, and none changes any stepper.

Hypothesis builds a body that is right for its endpoint in every way but one defect, and
sends it to every endpoint that takes tensors (step, dry run, PUT params, PUT state, create,
import). The defects are the header's and the metadata's classes: nesting up to thousands
of levels anywhere, integers past int64 (shapes, offsets, steps), offsets that lie about
sizes, overlapping ranges, duplicate names, odd dtypes, odd names, non-string metadata, a
length prefix that lies, and ``adamscope.param_groups``, ``adamscope.spec`` and
``adamscope.checkpoint`` metadata with the same. Every answer must be a 4xx problem+json
with a code the OpenAPI document lists for the route, a detail without stack traces,
paths or addresses, and everything every stepper shows must be byte-identical afterwards.

Bounded for CI: derandomized (the same examples every run, no example database), deadline
off, ~300 examples in all (a few seconds each file).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from api_support import OCTET, PROBLEM, SPEC, V1, create, documented_codes, initial_values
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adamscope.client import codec
from adamscope.client.protocol import META_CHECKPOINT, META_GROUPS, META_SPEC
from adamscope.service.app import create_app
from adamscope.service.settings import Settings

EXAMPLES = 50  # per endpoint
LEAK = re.compile(
    r"Traceback|Exception raised from|frame #\d|0x[0-9a-fA-F]{6,}|"
    r"[\w/]+\.(py|so|cpp|h)\b|site-packages"
)
BOUNDED = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


@dataclass(frozen=True)
class Raw:
    """JSON text placed as is (deep nesting, integers json.dumps would not write, ...)."""

    text: str


def to_json(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value)


@dataclass
class Pairs:
    """A JSON object as (key, value) pairs: keys may repeat."""

    items: list[tuple[str, Any]]


@dataclass
class Body:
    """A safetensors body under construction: header entries, metadata, data."""

    entries: list[tuple[str, dict[str, Any]]]
    metadata: dict[str, Any]
    data: bytes
    length_lie: int = 0

    @classmethod
    def of(cls, raw: bytes) -> Body:
        n = struct.unpack("<Q", raw[:8])[0]
        head = json.loads(raw[8 : 8 + n])
        meta = head.pop("__metadata__", {})
        return cls(list(head.items()), meta, raw[8 + n :])

    def encode(self) -> bytes:
        items: list[tuple[str, Any]] = [("__metadata__", self.metadata)] if self.metadata else []
        head = to_json(Pairs(items + list(self.entries))).encode()
        head += b" " * (-len(head) % 8)
        return struct.pack("<Q", max(0, len(head) + self.length_lie)) + head + self.data


# ---------------------------------------------------------------------- values


def deep(depth: int, inner: str = "0") -> Raw:
    return Raw("[" * depth + inner + "]" * depth)


depths = st.integers(65, 3000)
huge_ints = st.sampled_from(
    [2**63, 2**64, 2**64 + 1, -(2**63) - 1, 10**30, -(10**30), int("9" * 100)]
)
junk = st.one_of(
    depths.map(deep),
    huge_ints.map(lambda i: Raw(str(i))),
    st.sampled_from(
        [Raw("1e400"), Raw("-1e400"), None, True, "", "x", [], {}, [[]], {"a": {"b": {}}}, 1.5, -1]
    ),
)
odd_names = st.sampled_from(
    ["", "\n", "w\n", "\x00", "../x", "w" * 600, "ü", "zz", "__metadata__ ", "w.exp_avg", " w"]
)
odd_dtypes = st.sampled_from(
    ["F128", "f32", "", "U64", "F8_E4M3", "float32", "I4", 7, None, [], {"x": 1}]
)
#: Option changes no param group accepts.
bad_options = st.one_of(
    st.fixed_dictionaries({"lr": st.sampled_from([-1.0, Raw("-1e400"), Raw("1e400"), "x"])}),
    st.fixed_dictionaries(
        {"betas": st.sampled_from([[1.0, 0.9], [Raw(str(2**64)), 0.9], [0.9], deep(100)])}
    ),
    st.fixed_dictionaries({"eps": st.sampled_from([-1.0, Raw(str(-(2**64)))])}),
    st.fixed_dictionaries({"amsgrad": st.sampled_from([Raw(str(2**64)), "yes", [True]])}),
    st.fixed_dictionaries({"bogus": junk}),
)


# ---------------------------------------------------------------------- defects

HEADER_DEFECTS = (
    "nest-entry",
    "nest-shape",
    "nest-metadata",
    "nest-all",
    "huge-dim",
    "negative-dim",
    "too-many-dims",
    "huge-offset",
    "lying-offset",
    "overlap",
    "duplicate",
    "odd-dtype",
    "odd-name",
    "metadata-not-string",
    "entry-not-object",
    "length-lie",
)


def apply_header_defect(draw: st.DrawFn, body: Body, defect: str) -> None:
    """Make ``body`` invalid in one way every endpoint must refuse."""
    i = draw(st.integers(0, len(body.entries) - 1))
    name, entry = body.entries[i]
    entry = dict(entry)
    if defect == "nest-entry":
        entry[draw(st.sampled_from(["x", "dtype", "data_offsets"]))] = deep(draw(depths))
    elif defect == "nest-shape":
        entry["shape"] = deep(draw(depths))
    elif defect == "nest-metadata":
        body.metadata = {
            **body.metadata,
            draw(st.sampled_from(["x", META_GROUPS])): deep(draw(depths)),
        }
    elif defect == "nest-all":
        body.entries = [(name, deep(draw(depths), "{}"))]  # type: ignore[list-item]
        return
    elif defect == "huge-dim":
        shape = list(entry["shape"]) or [1]
        shape[draw(st.integers(0, len(shape) - 1))] = Raw(str(draw(huge_ints)))
        entry["shape"] = shape + draw(st.sampled_from([[], [0]]))
    elif defect == "negative-dim":
        entry["shape"] = [-1, *entry["shape"]]
    elif defect == "too-many-dims":
        entry["shape"] = [1] * draw(st.integers(65, 200)) + list(entry["shape"])
    elif defect == "huge-offset":
        begin, end = entry["data_offsets"]
        shift = draw(huge_ints)
        entry["data_offsets"] = [Raw(str(begin + shift)), Raw(str(end + shift))]
    elif defect == "lying-offset":
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [begin, end + draw(st.sampled_from([-4, -1, 1, 2, 8, 4096]))]
    elif defect == "overlap":
        other = (i + 1) % len(body.entries)
        b0, e0 = body.entries[other][1]["data_offsets"]
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        if other == i or size == 0:
            entry["data_offsets"] = [0, size + 4]  # no second entry: lie instead
        else:
            entry["data_offsets"] = [b0, b0 + size]
            if b0 == entry["data_offsets"][0]:
                entry["data_offsets"] = [b0 + 1, b0 + 1 + size]
    elif defect == "duplicate":
        body.entries.insert(i, (name, dict(entry)))
    elif defect == "odd-dtype":
        entry["dtype"] = draw(odd_dtypes)
    elif defect == "odd-name":
        body.entries.append(
            (draw(odd_names), {"dtype": "F32", "shape": [0], "data_offsets": [len(body.data)] * 2})
        )
    elif defect == "metadata-not-string":
        body.metadata = {
            **body.metadata,
            draw(st.sampled_from(["x", META_GROUPS, META_SPEC])): draw(
                junk.filter(lambda v: not isinstance(v, str))
            ),
        }
    elif defect == "entry-not-object":
        entry = draw(junk.filter(lambda v: not isinstance(v, dict)))
    elif defect == "length-lie":
        body.length_lie = draw(st.sampled_from([-9, -1, 1, 7, 64, 1 << 20]))
    body.entries[i] = (name, entry)


# ---------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    method: str
    route: str  # as the OpenAPI document templates it
    kind: str

    @property
    def url(self) -> str:
        return self.route.replace("{name}", "net")


ENDPOINTS = [
    Endpoint("POST", f"{V1}/{{name}}/step", "grads"),
    Endpoint("POST", f"{V1}/{{name}}/dry-run", "grads"),
    Endpoint("PUT", f"{V1}/{{name}}/params", "grads"),
    Endpoint("PUT", f"{V1}/{{name}}/state", "state"),
    Endpoint("POST", V1, "create"),
    Endpoint("POST", f"{V1}/import", "import"),
]
SHAPES = {p["name"]: (p["shape"], codec.dtype_from_name(p["dtype"])) for p in SPEC["params"]}


@st.composite
def hostile_bodies(draw: st.DrawFn, endpoint: Endpoint, checkpoint: bytes) -> bytes:
    """A body right for ``endpoint`` but for one defect."""
    meta_defects = {
        "grads": ["groups"] if endpoint.route.endswith(("step", "dry-run")) else [],
        "state": ["groups"],
        "create": ["spec"],
        "import": ["checkpoint"],
    }
    defect = draw(st.sampled_from(list(HEADER_DEFECTS) + meta_defects[endpoint.kind]))
    if endpoint.kind == "import":
        body = Body.of(checkpoint)
    else:
        names = draw(st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, unique=True))
        tensors: dict[str, torch.Tensor] = {}
        for n in names:
            shape, dtype = SHAPES[n]
            if endpoint.kind == "state":
                keys = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if n == "h" else [])
                tensors.update(
                    {
                        f"{n}.{k}": (
                            torch.ones(()) if k == "step" else torch.full(shape, 0.5, dtype=dtype)
                        )
                        for k in keys
                    }
                )
            else:
                tensors[n] = torch.full(shape, draw(st.sampled_from([0.5, -1.0])), dtype=dtype)
        meta = {}
        if endpoint.kind == "create":
            meta[META_SPEC] = json.dumps(
                {"name": "fresh", "optimizer": "adam", "params": [{"name": n} for n in tensors]}
            )
        body = Body.of(codec.encode(tensors, meta or None))
    if defect == "groups":
        body.metadata[META_GROUPS] = to_json(
            draw(
                st.one_of(
                    depths.map(deep),
                    st.lists(bad_options, min_size=2, max_size=2),
                    st.just([{}]),
                    st.just([{}, {}, {}]),
                    junk,
                )
            )
        )
    elif defect == "spec":
        spec = json.loads(body.metadata[META_SPEC])
        where = draw(
            st.sampled_from(["shape", "name", "optimizer", "hyperparameters", "whole", "params"])
        )
        if where == "shape":
            spec["params"][0]["shape"] = [draw(huge_ints.map(lambda i: Raw(str(i))))]
        elif where == "whole":
            spec = deep(draw(depths), "{}")
        elif where == "hyperparameters":
            spec["hyperparameters"] = draw(bad_options)
        else:
            spec[where] = draw(junk)
        body.metadata[META_SPEC] = to_json(spec)
    elif defect == "checkpoint":
        header = json.loads(body.metadata[META_CHECKPOINT])
        field = draw(
            st.sampled_from(
                [
                    "step",
                    "version",
                    "created_at",
                    "saved_at",
                    "groups",
                    "params",
                    "idempotency",
                    "extra",
                    "whole",
                ]
            )
        )
        header[field] = draw(
            st.one_of(
                huge_ints.map(lambda i: Raw(str(i))),
                st.sampled_from([Raw("1e400"), Raw("-1e400")]),
                depths.map(deep),
            )
        )
        text = to_json(header) if field != "whole" else deep(draw(depths), "{}").text
        body.metadata[META_CHECKPOINT] = text
    else:
        apply_header_defect(draw, body, defect)
    return body.encode()


# ---------------------------------------------------------------------- the property


def everything(client: TestClient) -> Any:
    out = {}
    for s in client.get(V1).json()["steppers"]:
        n = s["name"]
        summary = client.get(f"{V1}/{n}").json()
        for k in ("created_at", "updated_at", "persisted_at"):
            summary.pop(k, None)
        out[n] = (
            client.get(f"{V1}/{n}/params").content,
            client.get(f"{V1}/{n}/state").content,
            summary,
            client.get(f"{V1}/{n}/snapshots").json(),
        )
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, bytes]]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("property"), device="cpu")
    with TestClient(create_app(settings)) as client:
        values = initial_values()
        create(client, SPEC, values)
        r = client.post(
            f"{V1}/net/step",
            content=codec.encode({n: t * 0.5 for n, t in values.items()}),
            headers=OCTET,
        )
        assert r.status_code == 200
        assert client.post(f"{V1}/net/snapshots", json={"name": "s1"}).status_code == 201
        checkpoint = client.get(f"{V1}/net/snapshots/s1").content
        yield client, checkpoint


@pytest.mark.parametrize(
    "endpoint",
    ENDPOINTS,
    ids=lambda e: (
        f"{e.method}-{e.kind}"
        + ("-dry" if "dry" in e.route else "-step" if "step" in e.route else "")
    ),
)
def test_hostile_safetensors_is_a_clean_4xx_and_changes_nothing(
    served: tuple[TestClient, bytes], endpoint: Endpoint
) -> None:
    client, checkpoint = served
    before = everything(client)
    documented = documented_codes(endpoint.method, endpoint.route)
    url = endpoint.url + ("?name=fresh-import" if endpoint.kind == "import" else "")

    @BOUNDED
    @given(body=hostile_bodies(endpoint, checkpoint))
    def check(body: bytes) -> None:
        r = client.request(endpoint.method, url, content=body, headers=OCTET)
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        assert r.headers["content-type"].split(";")[0] == PROBLEM
        problem = r.json()
        assert problem["code"] in documented, problem
        assert LEAK.search(problem["detail"]) is None, problem["detail"]
        assert everything(client) == before

    check()
