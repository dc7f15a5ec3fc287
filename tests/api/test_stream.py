"""The streamed step path against a real uvicorn: wire options, the write gate, ingest.

Every numeric check is bit-exact against a local ``torch.optim.Adam`` fed the same
gradients (for a lossy wire: the gradients rounded to the wire dtype and widened back).
Raw sockets play the clients no library would be: one that reads its reply slowly while
another steps, one that hangs up mid-body, one whose chunked body lies.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest
import torch
from conftest import LiveServer

from adamscope.client import Client, RemoteAdam, codec
from adamscope.client.errors import DtypeMismatchError
from adamscope.service.api.serving import INLINE_NUMEL

LOSSY = [torch.bfloat16, torch.float16]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def values_of(
    shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], seed: int = 0
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, (shape, dtype) in shapes.items():
        if dtype.is_complex:
            out[n] = torch.randn(shape, generator=gen, dtype=dtype)
        else:
            out[n] = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return out


def grads_like(values: Mapping[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        n: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
        if not t.dtype.is_complex
        else torch.randn(t.shape, generator=gen, dtype=t.dtype)
        for n, t in values.items()
    }


class Replica:
    """A local torch.optim.Adam over copies of ``values``: what the stepper must equal."""

    def __init__(self, values: Mapping[str, torch.Tensor], **options: Any) -> None:
        self.params = {n: t.clone().requires_grad_(True) for n, t in values.items()}
        self.opt = torch.optim.Adam(list(self.params.values()), **options)

    def step(self, grads: Mapping[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            p.grad = grads[n].clone() if n in grads else None
        self.opt.step()

    def values(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {n: dict(self.opt.state[p]) for n, p in self.params.items() if self.opt.state.get(p)}


def assert_exact(expected: torch.Tensor, actual: torch.Tensor, what: str) -> None:
    assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), what
    assert torch.equal(expected.detach(), actual.detach()), f"{what}: values differ"


def assert_matches(c: Client, name: str, replica: Replica) -> None:
    """The stepper's parameters and every state tensor equal the replica's, bit for bit."""
    server = c.get_params(name)
    for n, t in replica.values().items():
        assert_exact(t, server[n], f"param {n}")
    state = c.get_state(name)
    for n, s in replica.state().items():
        assert set(state[n]) == set(s), n
        for k, t in s.items():
            assert_exact(t, state[n][k], f"state {n}.{k}")


def observe(c: Client, name: str) -> tuple[Any, ...]:
    """Everything a client can see of a stepper, for before/after equality."""
    summary = c.get(name).model_dump(exclude={"created_at", "updated_at"})
    params = {n: codec.encode({n: t}) for n, t in c.get_params(name).items()}
    state = {
        n: codec.encode({f"{n}.{k}": t for k, t in s.items()}) for n, s in c.get_state(name).items()
    }
    return summary, params, state


@pytest.fixture
def client(live_server: LiveServer) -> Iterator[Client]:
    with Client(live_server.url) as c:
        yield c


# ---------------------------------------------------------------------- raw HTTP


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def request_head(method: str, path: str, headers: Mapping[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_reply(sock: socket.socket, pending: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Status, headers and Content-Length body of one response."""
    data = pending
    for _ in range(10_000):
        if b"\r\n\r\n" in data:
            break
        chunk = sock.recv(65536)
        assert chunk, "server closed before answering"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers["content-length"])
    buf = bytearray(body)
    while len(buf) < length:
        chunk = sock.recv(1 << 20)
        assert chunk, "server closed mid-body"
        buf += chunk
    return int(lines[0].split()[1]), headers, bytes(buf)


def chunked(parts: list[bytes], end: bool = True) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p)
    return out + (b"0\r\n\r\n" if end else b"")


def step_path(name: str, **query: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"/v1/steppers/{name}/step" + (f"?{q}" if q else "")


# ---------------------------------------------------------------------- step route options


def test_only_stepped_returns_exactly_the_stepped_params(client: Client) -> None:
    name = unique("only")
    values = values_of(
        {"a": ((3, 2), torch.float32), "b": ((4,), torch.float32), "c": ((5,), torch.float64)}
    )
    client.create(name, values, lr=0.05)
    replica = Replica(values, lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for only in (True, False):
        grads = grads_like(values, gen)
        del grads["b"]
        reply = client.step(name, grads, return_params=True, only_stepped=only)
        replica.step(grads)
        assert reply.params is not None
        expected = ["a", "c"] if only else ["a", "b", "c"]
        assert list(reply.params) == expected
        assert (reply.stepped, reply.skipped) == (["a", "c"], ["b"])
        for n in expected:
            assert_exact(replica.values()[n], reply.params[n], n)
    assert_matches(client, name, replica)


SIZES = {"inline": 1000, "threadpool": INLINE_NUMEL + 4000}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("wire", LOSSY, ids=str)
def test_lossy_wire_steps_with_rounded_grads_and_returns_rounded_params(
    client: Client,
    wire: torch.dtype,
    size: str,
) -> None:
    name = unique("lossy")
    values = values_of(
        {
            "w": ((SIZES[size],), torch.float32),
            "d": ((7,), torch.float64),
            "h": ((6,), torch.bfloat16),
        }
    )
    client.create(name, values, lr=0.01, durability="manual")
    replica = Replica(values, lr=0.01)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = grads_like(values, gen)
        reply = client.step(name, grads, return_params=True, wire_dtype=wire)
        replica.step({n: g.to(wire).to(g.dtype) for n, g in grads.items()})
        assert reply.params is not None
        for n, t in replica.values().items():
            assert_exact(t.to(wire), reply.params[n], f"returned {n}")
        assert_matches(client, name, replica)  # the stepper itself keeps full precision


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", [{"foreach": False}, {"fused": True}], ids=["forloop", "fused"])
def test_lossless_step_is_exact_inline_and_in_the_threadpool(
    client: Client,
    size: str,
    impl: dict[str, bool],
) -> None:
    name = unique("exact")
    values = values_of({"w": ((SIZES[size] - 10,), torch.float32), "b": ((10,), torch.float32)})
    options: dict[str, Any] = {"lr": 0.02, "amsgrad": True, "weight_decay": 0.1, **impl}
    client.create(name, values, durability="manual", **options)
    replica = Replica(values, **options)
    local = {n: t.clone() for n, t in values.items()}
    gen = torch.Generator().manual_seed(3)
    for i in range(4):
        grads = grads_like(values, gen)
        if i == 1:
            del grads["b"]
        reply = client.step(name, grads, return_params=True, into=local)
        replica.step(grads)
        assert reply.params is not None and reply.params["w"] is local["w"]
        for n, t in replica.values().items():
            assert_exact(t, local[n], f"step {i + 1}: {n}")
    assert_matches(client, name, replica)


def test_lossy_gradients_need_the_wire_option_and_a_real_parameter(client: Client) -> None:
    name = unique("reject")
    values = values_of({"w": ((4,), torch.float32), "z": ((3,), torch.complex64)})
    client.create(name, values, lr=0.1)
    before = observe(client, name)
    with pytest.raises(DtypeMismatchError):  # a lossy gradient must be asked for
        client.step(name, {"w": torch.ones(4, dtype=torch.bfloat16)})
    with pytest.raises(DtypeMismatchError):  # a complex parameter has no 16-bit wire form
        client.step(name, {"z": torch.ones(3, dtype=torch.bfloat16)}, wire_dtype=torch.bfloat16)
    with httpx.Client(base_url=client.url) as http:
        for wire, grad, code in [
            ("bfloat16", torch.ones(4, dtype=torch.float16), "dtype_mismatch"),  # another one
            ("float32", torch.ones(4), "request_validation_error"),  # not a 16-bit wire
        ]:
            r = http.post(
                step_path(name, wire_dtype=wire),
                content=codec.encode({"w": grad}),
                headers={"content-type": "application/octet-stream"},
            )
            assert (r.status_code, r.json()["code"]) == (422, code)
            assert r.headers["content-type"] == "application/problem+json"
    assert observe(client, name) == before


def test_remote_adam_on_a_bf16_wire(live_server: LiveServer) -> None:
    """Local parameters are the server's rounded to bf16 after every step; the server's
    equal a full-precision Adam fed the bf16-rounded gradients."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    replica = Replica({n: p.detach() for n, p in model.named_parameters()}, lr=0.05)
    name = unique("bf16")
    opt = RemoteAdam(
        model.named_parameters(), lr=0.05, url=live_server.url, name=name, wire_dtype=torch.bfloat16
    )
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    with Client(live_server.url) as c:
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            replica.step(
                {
                    n: p.grad.to(torch.bfloat16).to(p.dtype)  # type: ignore[union-attr]
                    for n, p in model.named_parameters()
                }
            )
            server = c.get_params(name)
            for n, p in model.named_parameters():
                assert_exact(replica.values()[n], server[n], f"server {n}")
                assert_exact(server[n].to(torch.bfloat16).to(torch.float32), p, f"local {n}")
        assert_matches(c, name, replica)
    opt.close()
    with pytest.raises(ValueError, match="wire_dtype"):
        RemoteAdam(model.parameters(), url=live_server.url, wire_dtype=torch.float32)


# ---------------------------------------------------------------------- the write gate


def test_a_slowly_read_reply_is_not_torn_by_a_concurrent_step(client: Client) -> None:
    """The reply of a step streams from parameter memory: a second step on the stepper
    must wait until that reply has left, and the reply must be the first step's params."""
    name = unique("torn")
    n = 4 * 1024 * 1024  # 16 MB each way: more than every socket buffer between the two
    values = {"w": torch.randn(n, generator=torch.Generator().manual_seed(5))}
    client.create(name, values, lr=0.01, durability="manual")
    replica = Replica(values, lr=0.01)
    gen = torch.Generator().manual_seed(6)
    g1, g2 = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    replica.step({"w": g1})
    after_first = replica.values()["w"]
    replica.step({"w": g2})

    second: dict[str, Any] = {}
    done = threading.Event()

    def step_again() -> None:
        try:
            with Client(client.url) as other:
                second["reply"] = other.step(name, {"w": g2}, return_params=True)
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            second["error"] = e
        finally:
            done.set()

    body = codec.encode({"w": g1})
    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        slow.settimeout(30)
        slow.connect(address(client.url))
        slow.sendall(
            request_head(
                "POST",
                step_path(name, return_params="true"),
                {
                    "content-type": "application/octet-stream",
                    "content-length": str(len(body)),
                    "accept": "application/octet-stream",
                },
            )
            + body
        )
        received = bytearray()
        for _ in range(64):  # the first bytes of the reply, slowly
            chunk = slow.recv(16 * 1024)
            assert chunk
            received += chunk
            time.sleep(0.001)
        thread = threading.Thread(target=step_again, daemon=True)
        thread.start()
        time.sleep(0.5)  # ample time for the second step to land, were it not held back
        assert not done.is_set(), "a step completed while the previous reply was streaming"
        status, headers, reply = read_reply(slow, bytes(received))
    assert status == 200 and headers["x-adamscope-step"] == "1"
    tensors, metadata = codec.decode(reply)
    assert metadata["adamscope.step"] == "1"
    assert_exact(after_first, tensors["w"], "the slowly read reply")

    thread.join(timeout=60)
    assert not thread.is_alive()
    assert "error" not in second, second.get("error")
    assert second["reply"].step == 2
    assert_exact(replica.values()["w"], second["reply"].params["w"], "the second reply")
    assert_matches(client, name, replica)


@pytest.mark.parametrize("size", list(SIZES))
def test_concurrent_steps_are_serialized_exactly_once(live_server: LiveServer, size: str) -> None:
    """N threads x K steps with the same gradient: N*K distinct step numbers, each reply
    equal to the serial replica at its step number, final state = N*K serial steps."""
    threads_n, steps_k = 4, 5
    name = unique("conc")
    values = values_of({"w": ((SIZES[size] - 8,), torch.float32), "b": ((8,), torch.float32)})
    grads = grads_like(values, torch.Generator().manual_seed(7))
    replica = Replica(values, lr=0.01)
    expected = {0: replica.values()}
    for k in range(1, threads_n * steps_k + 1):
        replica.step(grads)
        expected[k] = replica.values()
    with Client(live_server.url) as c:
        c.create(name, values, lr=0.01, durability="manual")
    replies: list[tuple[int, dict[str, torch.Tensor] | None]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        try:
            with Client(live_server.url) as c:
                for _ in range(steps_k):
                    r = c.step(name, grads, return_params=i % 2 == 0)
                    with lock:
                        replies.append((r.step, r.params))
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers) and not errors, errors
    assert sorted(s for s, _ in replies) == list(range(1, threads_n * steps_k + 1))
    for s, params in replies:
        for n, t in (params or {}).items():
            assert_exact(expected[s][n], t, f"reply of step {s}: {n}")
    with Client(live_server.url) as c:
        assert c.get(name).step == threads_n * steps_k
        assert_matches(c, name, replica)


def test_abandoned_reply_releases_the_gate(client: Client) -> None:
    name = unique("abandon")
    values = {"w": torch.randn(2 * 1024 * 1024, generator=torch.Generator().manual_seed(8))}
    client.create(name, values, lr=0.01, durability="manual")
    replica = Replica(values, lr=0.01)
    g = torch.ones_like(values["w"])
    body = codec.encode({"w": g})
    with socket.create_connection(address(client.url), timeout=30) as s:
        s.sendall(
            request_head(
                "POST",
                step_path(name, return_params="true"),
                {"content-type": "application/octet-stream", "content-length": str(len(body))},
            )
            + body
        )
        assert s.recv(100).startswith(b"HTTP/1.1 200")  # answered, then never read
    replica.step({"w": g})
    reply = client.step(name, {"w": g}, return_params=True)  # would hang on a held gate
    replica.step({"w": g})
    assert reply.step == 2
    assert_matches(client, name, replica)


# ---------------------------------------------------------------------- ingest failures


@pytest.fixture
def target(client: Client) -> tuple[str, dict[str, torch.Tensor], bytes]:
    """A stepper with one step taken, and a valid step body for it."""
    name = unique("ingest")
    values = values_of({"w": ((300_000,), torch.float32), "b": ((5,), torch.float32)})
    client.create(name, values, lr=0.01, durability="manual")
    gen = torch.Generator().manual_seed(9)
    client.step(name, grads_like(values, gen))
    body = codec.encode(grads_like(values, gen))
    return name, values, body


def _still_serves(client: Client, name: str) -> None:
    """The stepper takes a correct step from where it was."""
    before = client.get_params(name)
    state = client.get_state(name)
    g = {"w": torch.full((300_000,), 0.5), "b": torch.full((5,), -0.5)}
    replica = Replica(before, lr=0.01)
    for n, p in replica.params.items():
        replica.opt.state[p] = {k: t.clone() for k, t in state[n].items()}
    replica.step(g)
    assert client.step(name, g).step == 2
    assert_matches(client, name, replica)


def test_body_cut_short_by_the_client_changes_nothing(
    client: Client,
    target: tuple[str, dict[str, torch.Tensor], bytes],
) -> None:
    name, _, body = target
    before = observe(client, name)
    for cut in (4, 100, len(body) // 2, len(body) - 1):
        with socket.create_connection(address(client.url), timeout=30) as s:
            s.sendall(
                request_head(
                    "POST",
                    step_path(name),
                    {"content-type": "application/octet-stream", "content-length": str(len(body))},
                )
                + body[:cut]
            )
        assert observe(client, name) == before, f"cut at {cut}"
    _still_serves(client, name)


@pytest.mark.parametrize("how", ["trailing-garbage", "ends-early", "header-only"])
def test_bad_chunked_bodies_are_400_and_change_nothing(
    client: Client,
    target: tuple[str, dict[str, torch.Tensor], bytes],
    how: str,
) -> None:
    name, _, body = target
    head_len = 8 + int.from_bytes(body[:8], "little")
    payload = {
        "trailing-garbage": chunked([body[:1000], body[1000:], b"garbage"]),
        "ends-early": chunked([body[:head_len], body[head_len:-4]]),
        "header-only": chunked([body[:head_len]]),
    }[how]
    before = observe(client, name)
    with socket.create_connection(address(client.url), timeout=30) as s:
        s.sendall(
            request_head(
                "POST",
                step_path(name, return_params="true"),
                {"content-type": "application/octet-stream", "transfer-encoding": "chunked"},
            )
            + payload
        )
        status, headers, reply = read_reply(s)
    problem = json.loads(reply)
    assert (status, problem["code"]) == (400, "malformed_body"), problem
    assert headers["content-type"] == "application/problem+json"
    assert observe(client, name) == before
    _still_serves(client, name)


def test_chunked_body_cut_by_the_client_changes_nothing(
    client: Client,
    target: tuple[str, dict[str, torch.Tensor], bytes],
) -> None:
    name, _, body = target
    before = observe(client, name)
    with socket.create_connection(address(client.url), timeout=30) as s:
        s.sendall(
            request_head(
                "POST",
                step_path(name),
                {"content-type": "application/octet-stream", "transfer-encoding": "chunked"},
            )
            + chunked([body[:5000], body[5000 : len(body) // 2]], end=False)
        )
    assert observe(client, name) == before
    _still_serves(client, name)


def test_chunked_upload_claiming_a_huge_tensor_is_413(client: Client) -> None:
    """Without Content-Length the header's own layout is checked against the body limit
    before any tensor is allocated for it."""
    name = unique("huge")
    client.create(name, {"w": torch.zeros(3)}, lr=0.1)
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [2**31], "data_offsets": [0, 2**33]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    prefix = len(header).to_bytes(8, "little") + header
    with socket.create_connection(address(client.url), timeout=30) as s:
        s.sendall(
            request_head(
                "PUT",
                f"/v1/steppers/{name}/params",
                {"content-type": "application/octet-stream", "transfer-encoding": "chunked"},
            )
            + chunked([prefix, b"\0" * 64])
        )
        status, _, reply = read_reply(s)
    assert (status, json.loads(reply)["code"]) == (413, "payload_too_large"), reply
    assert client.get(name).step == 0
