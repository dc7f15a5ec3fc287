"""The fuzz bar: schemathesis drives every operation of the OpenAPI document with generated
input against a real uvicorn; no answer is a 5xx, every 4xx is an RFC 9457 problem with a
documented ``code``, and a rejected request changes nothing.

Three steppers exist before every request (``manual`` durability, so the run is not spent
writing checkpoints): Adam with amsgrad, AdamW with two param groups and a bfloat16
parameter, and one that has never stepped; each has a snapshot. Every operation is fuzzed
with schema-violating input (schemathesis' negative mode) and with schema-valid input
(positive mode: valid shapes, nonsensical values), with its stepper name left free or pinned
to a fixture (and its snapshot), and with bodies and query names from fuzz_support aimed at
the checks behind the name lookup.

After every request the test observes the whole service as a client can: the list of
steppers and, for each, its summary (without timestamps), its parameters and state as
safetensors bytes, and its snapshot list. After a 4xx, and after any GET, that observation
must equal the one before the request. An accepted request may change things (delete a
stepper, step it, reset its state, create another): then the world is put back, steppers the
fuzz created are deleted and changed fixtures rebuilt, so no operation is left out to keep
the others' targets alive.

Seeded (hypothesis ``derandomize``, no example database): CI sends the same requests every
run. About 1,200 generated requests in all, however many operations the API has.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import requests
import schemathesis
import torch
from api_support import documented_codes
from conftest import LiveServer, run_uvicorn
from fuzz_support import (
    CHECKPOINT_FILES,
    FIXTURES,
    SNAP,
    Fixture,
    aimed_bodies,
    json_bodies,
    query_overrides,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from adamscope.client import Client
from adamscope.client.errors import CODES
from adamscope.service.app import create_app
from adamscope.service.settings import Settings

pytestmark = pytest.mark.e2e

PROBLEM = "application/problem+json"
OCTET = "application/octet-stream"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
#: Examples per operation and generation mode: a budget for the whole run shared out over
#: the operations (the API grows), between 10 and 25 each; twice as many for the routes
#: that load tensors into a stepper, where a partly applied rejected request would hide.
TOTAL_EXAMPLES = 1200
TENSOR_ROUTES = {
    ("post", "/v1/steppers/{name}/step"),
    ("put", "/v1/steppers/{name}/params"),
    ("put", "/v1/steppers/{name}/state"),
}
#: A request that takes longer is a failure (e.g. a wait the service should have bounded).
REQUEST_TIMEOUT_S = 30
#: An event stream never ends by itself: its reply is read for this long (schemathesis also
#: stops after its max-stream-events), then the test goes on with what arrived.
STREAM_READ_S = 0.25
#: Query parameters that make the service wait (for other workers' contributions): waiting
#: as long as asked is documented behaviour, so generated waits are cut to this.
WAIT_PARAMS, MAX_WAIT_S = ("wait",), 0.2
#: Fields that differ on every rebuild or write; everything else must be identical.
TIMESTAMPS = frozenset({"created_at", "updated_at", "persisted_at"})

#: The app's OpenAPI document, built in process (routes do not depend on settings).
DOC = create_app(Settings(device="cpu")).openapi()
OPERATIONS = [
    (method, path) for path, item in DOC["paths"].items() for method in METHODS if method in item
]
MODES = (GenerationMode.NEGATIVE, GenerationMode.POSITIVE)
#: Operations with a parameter or body: the others have no schema to violate (negative
#: mode), only their positive run.
WITH_INPUT = {
    (m, p)
    for m, p in OPERATIONS
    if DOC["paths"][p][m].get("parameters") or DOC["paths"][p][m].get("requestBody")
}
RUNS = [
    (m, p, mode)
    for m, p in OPERATIONS
    for mode in MODES
    if mode is GenerationMode.POSITIVE or (m, p) in WITH_INPUT
]
MAX_EXAMPLES = max(10, min(25, TOTAL_EXAMPLES // len(RUNS)))
STREAMS = {
    (method, path)
    for path, item in DOC["paths"].items()
    for method, op in item.items()
    if method in METHODS
    for reply in op.get("responses", {}).values()
    if "text/event-stream" in reply.get("content", {})
}


def _strip(value: Any, drop: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v, drop) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [_strip(v, drop) for v in value]
    return value


class World:
    """The live service, its fixtures, and what a client can observe of it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S)
        self.session = requests.Session()
        self.schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        CHECKPOINT_FILES.clear()
        for fx in FIXTURES:
            self.build(fx)
            CHECKPOINT_FILES.append(self._get(f"/v1/steppers/{fx.name}/snapshots/{SNAP}").content)
        self.pristine = self.observe()
        self.current = self.pristine

    def close(self) -> None:
        self.http.close()
        self.session.close()

    def build(self, fx: Fixture) -> None:
        with Client(self.url) as c:
            c.create(
                fx.name,
                fx.values(),
                optimizer=fx.optimizer,
                groups=fx.groups,
                durability="manual",
                **fx.hyper,
            )
            for k in range(1, fx.steps + 1):
                c.step(fx.name, fx.grads(k))
            c.snapshot(fx.name, SNAP)

    def _get(self, path: str) -> httpx.Response:
        r = self.http.get(path)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text[:300]}"
        return r

    def observe(self) -> dict[str, Any]:
        """Every stepper: summary minus timestamps, params and state bytes, snapshots."""
        seen: dict[str, Any] = {}
        for summary in self._get("/v1/steppers").json()["steppers"]:
            name = summary["name"]
            base = f"/v1/steppers/{quote(name, safe='')}"
            seen[name] = {
                "summary": _strip(summary, TIMESTAMPS),
                # parameters and state, in one read
                "tensors": self._get(f"{base}/state?with_params=true").content,
                "snapshots": _strip(self._get(f"{base}/snapshots").json(), TIMESTAMPS),
            }
        return seen

    @staticmethod
    def _rebuilt(observed: dict[str, Any]) -> Any:
        """What a rebuild reproduces exactly (a snapshot file's size carries a timestamp)."""
        return _strip(observed, frozenset({"size"}))

    def settle(self) -> None:
        """After an accepted request: delete what the fuzz created, rebuild what it changed."""
        now = self.observe()
        if now == self.current:
            return
        fixtures = {fx.name: fx for fx in FIXTURES}
        with Client(self.url) as c:
            for name in now:
                if name not in fixtures:
                    c.delete(name)
            for name, fx in fixtures.items():
                if name in now and self._rebuilt(now[name]) == self._rebuilt(self.pristine[name]):
                    continue
                if name in now:
                    c.delete(name)
                self.build(fx)
        self.current = self.observe()
        assert self._rebuilt(self.current) == self._rebuilt(self.pristine)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    server: LiveServer
    with run_uvicorn(Settings(data_dir=tmp_path_factory.mktemp("fuzz"), device="cpu")) as server:
        w = World(server.url)
        try:
            yield w
        finally:
            w.close()


def _overrides(method: str, path: str) -> st.SearchStrategy[dict[str, Any]]:
    """Optional replacements for a generated case: real and unknown names for its ``name``
    and ``key`` query parameters, JSON tensor maps for its JSON body."""
    optional: dict[str, st.SearchStrategy[Any]] = {
        f"query:{k}": v for k, v in query_overrides(DOC["paths"][path][method]).items()
    }
    body = json_bodies(path) if method in ("put", "post") else None
    if body is not None:
        optional["application/json"] = body
    return st.fixed_dictionaries({}, optional=optional)


def _apply(case: Any, overrides: dict[str, Any]) -> Any:
    for key, value in overrides.items():
        if key.startswith("query:"):
            case.query = {**(case.query or {}), key.removeprefix("query:"): value}
        elif key == case.media_type:
            case.body = value
    return case


def _with_aimed_body(pair: tuple[Any, bytes]) -> Any:
    """The case with an aimed safetensors body and no query: generated query parameters
    (expected_step, worker, ...) would mostly stop it before its body is looked at."""
    case, body = pair
    case.query = {}
    case.media_type = OCTET
    case.body = body
    return case


def _strategy(world: World, method: str, path: str, mode: GenerationMode) -> Any:
    """Generated cases for one operation: path parameters free, and pinned to each fixture
    (and its snapshot) where the operation names a stepper, with optional overrides; for
    the routes that load tensors, also pinned cases with bodies aimed at the fixture."""
    op = world.schema[path][method.upper()]
    path_names = {p.name for p in op.path_parameters}
    other_input = bool(list(op.query) or list(op.headers) or list(op.body))
    kind = (
        {"step": "params", "params": "params", "state": "state"}.get(path.rsplit("/", 1)[-1])
        if method in ("put", "post")
        else None
    )

    def overridden(cases: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.tuples(cases, st.none() | _overrides(method, path)).map(
            lambda pair: pair[0] if pair[1] is None else _apply(*pair)
        )

    options = [overridden(op.as_strategy(generation_mode=mode))]
    if "name" in path_names:
        for fx in FIXTURES:
            pinned = {"name": fx.name}
            if "snap" in path_names:
                pinned["snap"] = SNAP
            # A negative case needs something left to break besides the pinned names.
            if mode is GenerationMode.POSITIVE or other_input or set(pinned) != path_names:
                cases = op.as_strategy(generation_mode=mode, path_parameters=pinned)
                options.append(overridden(cases))
                if kind is not None and mode is GenerationMode.POSITIVE:
                    options.append(st.tuples(cases, aimed_bodies(fx, kind)).map(_with_aimed_body))
    # Each kind of case equally often (st.one_of favours its first strategies).
    return st.sampled_from(options).flatmap(lambda cases: cases)


def _describe(case: Any, response: Any) -> str:
    return f"{case.as_curl_command()}\n-> {response.status_code} {response.content[:500]!r}"


def _check_problem(case: Any, response: Any) -> None:
    """A 4xx is application/problem+json with RFC 9457's fields and a ``code`` that is one of
    the service's codes, with its status, and that the OpenAPI document lists for the route."""
    what = _describe(case, response)
    ctype = (response.headers.get("content-type") or [""])[0]
    assert ctype.split(";")[0].strip() == PROBLEM, what
    body = response.json()
    assert isinstance(body, dict), what
    code = body.get("code")
    assert isinstance(code, str) and code, what
    assert body.get("status") == response.status_code, what
    assert isinstance(body.get("title"), str) and isinstance(body.get("detail"), str), what
    assert body.get("type") == f"urn:adamscope:problem:{code}", what
    assert code in CODES and CODES[code][0] == response.status_code, what
    route = (case.method, case.operation.path)
    assert code in documented_codes(*route), f"{code} is not documented for {route}: {what}"


FRAMING_HEADERS = {
    "transfer-encoding",
    "content-length",
    "host",
    "connection",
    "te",
    "upgrade",
    "expect",
}


def _run_case(world: World, case: Any) -> None:
    for key in WAIT_PARAMS:
        value = (case.query or {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_WAIT_S:
            case.query[key] = MAX_WAIT_S
    # Headers that frame the HTTP message belong to the HTTP client, not to the API: a
    # generated ``Transfer-Encoding: ''`` makes uvicorn's parser refuse the request (400
    # text/plain) before it reaches the service, so the fuzz never sends them.
    if case.headers:
        case.headers = {k: v for k, v in case.headers.items() if k.lower() not in FRAMING_HEADERS}
    try:
        route = (case.method.lower(), case.operation.path)
        response = case.call(
            base_url=world.url,
            session=world.session,
            timeout=STREAM_READ_S if route in STREAMS else REQUEST_TIMEOUT_S,
        )
    except requests.exceptions.InvalidHeader:
        # requests itself refuses to send some generated header values (e.g. with
        # line breaks): no request reached the service, so there is nothing to check.
        return
    status = response.status_code
    unchanged = False
    try:
        assert status < 500, _describe(case, response)
        if 400 <= status < 500:
            _check_problem(case, response)
        if 400 <= status < 500 or case.method.upper() == "GET":
            after = world.observe()
            changed = sorted(
                n for n in set(after) | set(world.current) if after.get(n) != world.current.get(n)
            )
            assert not changed, (
                f"{status} {case.method} changed stepper(s) {changed}:\n"
                + _describe(case, response)
            )
            unchanged = True
    finally:
        # Also after a failure: hypothesis then shrinks it, and every attempt must start
        # from the fixtures as built.
        if not unchanged:
            world.settle()


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [pytest.param(m, p, mode, id=f"{m.upper()} {p} {mode.value}") for m, p, mode in RUNS],
)
def test_fuzz_operation(world: World, method: str, path: str, mode: GenerationMode) -> None:
    examples = MAX_EXAMPLES * (2 if (method, path) in TENSOR_ROUTES else 1)

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )
    @given(case=_strategy(world, method, path, mode))
    def fuzz(case: Any) -> None:
        _run_case(world, case)

    fuzz()


def test_every_operation_is_fuzzed(world: World) -> None:
    """The live document has exactly the operations parametrized above, each one parsed by
    schemathesis: none is filtered out, unparseable or spared (not even DELETE of a
    stepper: the fixtures are rebuilt instead)."""
    live = {(r.ok().method.lower(), r.ok().path): r.ok() for r in world.schema.get_all_operations()}
    assert sorted(live) == sorted(OPERATIONS)
    assert {(m, p) for m, p, mode in RUNS if mode is GenerationMode.POSITIVE} == set(live)
    assert {(m, p) for m, p, mode in RUNS if mode is GenerationMode.NEGATIVE} == WITH_INPUT
    assert ("delete", "/v1/steppers/{name}") in OPERATIONS
    assert len(OPERATIONS) >= 20


def test_fixtures_are_what_they_were_built_to_be(world: World) -> None:
    """The fixtures the fuzz compared against exist, after the run, with exactly the
    parameters a local torch optimizer gives for their steps (module order: last)."""
    with Client(world.url) as c:
        for fx in FIXTURES:
            remote = c.get_params(fx.name)
            for n, p in fx.local().items():
                assert torch.equal(remote[n], p), f"{fx.name}.{n}"
            assert c.get(fx.name).step == fx.steps
