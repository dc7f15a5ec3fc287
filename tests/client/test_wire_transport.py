"""WireTransport, the client's zero-copy HTTP/1.1 path, against real servers on 127.0.0.1.

Three kinds of server: a tiny Starlette app under a real uvicorn (well-behaved HTTP), a
raw-socket server that answers with scripted bytes (close-delimited bodies, 1xx, servers
that hang up early), and the real adamscope service (``live_server``) for the client's
in-place receive (``into=``) and RemoteAdam's recovery from a reply cut short, injected
by a forwarding proxy that truncates one step reply.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from conftest import LiveServer
from remote_support import assert_tensor_equal, unique
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adamscope.client import Client, RemoteAdam, codec
from adamscope.client.errors import ProtocolError, TransportError
from adamscope.client.transport import READINTO_EXTENSION, WIRE_EXTENSION, WireTransport
from adamscope.service.testing import free_port

WIRE = {WIRE_EXTENSION: True}
BIG = 8 * 1024 * 1024 + 13  # odd on purpose: no chunk or buffer size divides it


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic pseudo-random bytes."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).numpy().tobytes()


# ---------------------------------------------------------------------- servers


def _app(connections: set[int]) -> Starlette:
    """Endpoints for each response framing; records every client port it has seen."""
    blob = pattern(BIG, seed=1)

    def seen(request: Request) -> int:
        assert request.client is not None
        connections.add(request.client.port)
        return request.client.port

    async def conn(request: Request) -> JSONResponse:
        return JSONResponse({"port": seen(request)})

    async def echo(request: Request) -> Response:
        seen(request)
        body = await request.body()
        return Response(body, headers={"x-sha256": hashlib.sha256(body).hexdigest()})

    async def chunked(request: Request) -> StreamingResponse:
        seen(request)

        async def parts() -> Any:
            for i, size in enumerate([1, 0, 70_000, 5, 3 * 1024 * 1024, 17]):
                yield pattern(size, seed=10 + i)

        return StreamingResponse(parts(), media_type="application/octet-stream")

    async def multi(request: Request) -> Response:
        seen(request)
        r = Response(b"m")
        r.headers.append("x-multi", "a")
        r.headers.append("x-multi", "b")
        r.set_cookie("c1", "1")
        r.set_cookie("c2", "2")
        return r

    async def blob_route(request: Request) -> Response:
        seen(request)
        return Response(blob, media_type="application/octet-stream")

    async def no_content(request: Request) -> Response:
        seen(request)
        return Response(status_code=204)

    return Starlette(
        routes=[
            Route("/conn", conn),
            Route("/echo", echo, methods=["POST"]),
            Route("/chunked", chunked),
            Route("/multi", multi),
            Route("/blob", blob_route, methods=["GET", "HEAD"]),
            Route("/empty", no_content),
        ]
    )


@contextlib.contextmanager
def serve(app: Any, **config: Any) -> Iterator[str]:
    """A real uvicorn serving ``app`` on 127.0.0.1 in a thread (as conftest.run_uvicorn)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def app_server() -> Iterator[tuple[str, set[int]]]:
    connections: set[int] = set()
    with serve(_app(connections)) as url:
        yield url, connections


def read_request(conn: socket.socket) -> tuple[bytes, bytes] | None:
    """One request (head, Content-Length body) off ``conn``; None at a clean EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "client closed mid-body"
        body += chunk
    assert len(body) == length, "the client sent more than its Content-Length"
    return head, body


class RawServer:
    """Accepts connections on 127.0.0.1 and runs ``handle(conn, index)`` for each in its
    own thread (``index`` counts accepted connections from 0)."""

    def __init__(self, handle: Callable[[socket.socket, int], None]) -> None:
        self.handle = handle
        self.accepted = 0
        self.requests: list[bytes] = []
        self.errors: list[BaseException] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._workers: list[tuple[threading.Thread, socket.socket]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            index, self.accepted = self.accepted, self.accepted + 1
            worker = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
            self._workers.append((worker, conn))
            worker.start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        with conn:
            conn.settimeout(10)
            try:
                self.handle(conn, index)
            except Exception as e:  # noqa: BLE001 - reported by __exit__
                self.errors.append(e)

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._listener.close()
        for worker, conn in self._workers:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # unblock a handler still reading
            worker.join(timeout=10)
        assert not self.errors, self.errors


def wire_client(**kwargs: Any) -> httpx.Client:
    return httpx.Client(transport=WireTransport(), timeout=10, **kwargs)


# ---------------------------------------------------------------------- response framing


def test_chunked_response_bodies_are_decoded_through_iteration_and_readinto(
    app_server: tuple[str, set[int]],
) -> None:
    url, _ = app_server
    expected = b"".join(
        pattern(s, seed=10 + i) for i, s in enumerate([1, 0, 70_000, 5, 3 * 1024 * 1024, 17])
    )
    with wire_client() as http:
        r = http.get(f"{url}/chunked", extensions=WIRE)
        assert r.headers["transfer-encoding"] == "chunked"
        assert r.content == expected
        with http.stream("GET", f"{url}/chunked", extensions=WIRE) as r:
            readinto = r.extensions[READINTO_EXTENSION]
            buf = bytearray(len(expected) + 100)
            view, filled = memoryview(buf), 0
            for _ in range(10_000):
                n = readinto(view[filled : filled + 40_000])
                if n == 0:
                    break
                filled += n
            assert bytes(buf[:filled]) == expected
        # the trailing 0-chunk was consumed: the connection is clean for the next request
        assert http.get(f"{url}/conn", extensions=WIRE).status_code == 200


def test_close_delimited_body_is_read_to_eof_and_its_connection_not_reused() -> None:
    payload = pattern(300_000, seed=2)

    def handle(conn: socket.socket, index: int) -> None:
        assert read_request(conn) is not None
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        conn.sendall(payload)  # no Content-Length, not chunked: the close ends the body

    with RawServer(handle) as server, wire_client() as http:
        assert http.get(f"{server.url}/a", extensions=WIRE).content == payload
        assert http.get(f"{server.url}/b", extensions=WIRE).content == payload
        assert server.accepted == 2


def test_informational_responses_are_skipped() -> None:
    def handle(conn: socket.socket, index: int) -> None:
        while read_request(conn) is not None:
            conn.sendall(
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n"
                b"HTTP/1.1 201 Created\r\nX-Final: yes\r\nContent-Length: 2\r\n\r\nok"
            )

    with RawServer(handle) as server, wire_client() as http:
        r = http.post(f"{server.url}/x", content=b"body", extensions=WIRE)
        assert (r.status_code, r.content, r.headers["x-final"]) == (201, b"ok", "yes")
        assert "link" not in r.headers
        assert http.get(f"{server.url}/y", extensions=WIRE).content == b"ok"
        assert server.accepted == 1


def test_large_upload_and_download_are_byte_exact(app_server: tuple[str, set[int]]) -> None:
    url, _ = app_server
    # the client's shape of upload: a list of memoryviews of tensor memory
    tensor = torch.frombuffer(bytearray(pattern(BIG, seed=3)), dtype=torch.uint8)
    parts = [memoryview(b"head"), tensor[: BIG // 3].numpy().data, tensor[BIG // 3 :].numpy().data]
    sent = b"head" + tensor.numpy().tobytes()
    with wire_client() as http:
        with http.stream(
            "POST",
            f"{url}/echo",
            content=parts,  # type: ignore[arg-type]
            extensions=WIRE,
            headers={"content-length": str(len(sent))},
        ) as r:
            assert r.headers["x-sha256"] == hashlib.sha256(sent).hexdigest()
            dest = bytearray(len(sent))
            view, filled = memoryview(dest), 0
            for _ in range(100_000):
                n = r.extensions[READINTO_EXTENSION](view[filled:])
                if n == 0:
                    break
                filled += n
            assert filled == len(sent) and dest == sent
        assert http.get(f"{url}/blob", extensions=WIRE).content == pattern(BIG, seed=1)


def test_chunked_upload_skips_empty_parts(app_server: tuple[str, set[int]]) -> None:
    """Without Content-Length the body goes chunked; an empty part must not end it."""
    url, _ = app_server
    with wire_client() as http:
        r = http.post(
            f"{url}/echo", content=iter([b"ab", b"", b"cd", b"e" * 100_000]), extensions=WIRE
        )
        assert r.status_code == 200
        assert r.content == b"abcd" + b"e" * 100_000


def test_repeated_headers_keep_every_value(app_server: tuple[str, set[int]]) -> None:
    url, _ = app_server
    with wire_client() as http:
        r = http.get(f"{url}/multi", extensions=WIRE)
        assert r.headers.get_list("x-multi") == ["a", "b"]
        assert [c.split(";")[0] for c in r.headers.get_list("set-cookie")] == ["c1=1", "c2=2"]
        assert dict(r.cookies) == {"c1": "1", "c2": "2"}


def test_head_and_204_have_no_body_and_keep_the_connection(
    app_server: tuple[str, set[int]],
) -> None:
    url, _ = app_server
    with wire_client() as http:
        port = http.get(f"{url}/conn", extensions=WIRE).json()["port"]
        head = http.head(f"{url}/blob", extensions=WIRE)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-length"] == str(BIG)
        empty = http.get(f"{url}/empty", extensions=WIRE)
        assert (empty.status_code, empty.content) == (204, b"")
        # had the transport waited for a body, or dropped the connection, these would differ
        assert http.get(f"{url}/conn", extensions=WIRE).json()["port"] == port


def test_sequential_requests_reuse_one_connection(app_server: tuple[str, set[int]]) -> None:
    url, connections = app_server
    with wire_client() as http:
        before = set(connections)
        ports = {http.get(f"{url}/conn", extensions=WIRE).json()["port"] for _ in range(5)}
        http.post(f"{url}/echo", content=b"x" * 1000, extensions=WIRE)
        assert http.get(f"{url}/blob", extensions=WIRE).status_code == 200
        assert len(ports) == 1
        assert connections - before == ports


# ---------------------------------------------------------------------- failures


def test_connection_closed_by_the_server_while_idle_is_retried_once() -> None:
    """uvicorn closes a kept-alive connection after timeout_keep_alive; the next request
    over the pooled socket is sent again, body included, on a fresh one."""
    connections: set[int] = set()
    with serve(_app(connections), timeout_keep_alive=1) as url, wire_client() as http:
        first = http.get(f"{url}/conn", extensions=WIRE).json()["port"]
        time.sleep(1.6)
        data = pattern(200_000, seed=4)
        r = http.post(
            f"{url}/echo",
            content=[memoryview(data)],  # type: ignore[list-item]
            extensions=WIRE,
            headers={"content-length": str(len(data))},
        )
        assert r.status_code == 200 and r.content == data
        second = http.get(f"{url}/conn", extensions=WIRE).json()["port"]
        assert first != second and len(connections) == 2


def test_raw_server_hanging_up_after_an_answer_gets_the_request_again() -> None:
    def handle(conn: socket.socket, index: int) -> None:
        request = read_request(conn)
        assert request is not None
        server.requests.append(request[1])
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + f"#{index}".encode())

    with RawServer(handle) as server, wire_client() as http:
        assert http.post(f"{server.url}/s", content=b"one", extensions=WIRE).content == b"#0"
        assert http.post(f"{server.url}/s", content=b"two", extensions=WIRE).content == b"#1"
        assert server.requests == [b"one", b"two"] and server.accepted == 2


def test_fresh_connection_hung_up_before_an_answer_is_an_error_not_a_retry() -> None:
    def handle(conn: socket.socket, index: int) -> None:
        assert read_request(conn) is not None

    with RawServer(handle) as server, wire_client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            http.post(f"{server.url}/s", content=b"x", extensions=WIRE)
        assert server.accepted == 1


def test_truncated_body_is_a_protocol_error() -> None:
    body = codec.encode({"w": torch.arange(1000, dtype=torch.float32)})

    def handle(conn: socket.socket, index: int) -> None:
        assert read_request(conn) is not None
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        conn.sendall(body[: len(body) // 2])

    with RawServer(handle) as server, wire_client() as http:
        with pytest.raises(httpx.RemoteProtocolError, match="mid-body"):
            http.get(f"{server.url}/t", extensions=WIRE)
        with Client(server.url) as c, pytest.raises(TransportError) as info:
            c.get_params("anything", into={"w": torch.zeros(1000)})
        assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)


def test_malformed_status_line_or_length_is_a_protocol_error() -> None:
    answers = [
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
    ]

    def handle(conn: socket.socket, index: int) -> None:
        assert read_request(conn) is not None
        conn.sendall(answers[index])

    with RawServer(handle) as server, wire_client() as http:
        for _ in answers:
            with pytest.raises(httpx.RemoteProtocolError):
                http.get(f"{server.url}/m", extensions=WIRE)
        assert server.accepted == len(answers)


def test_connect_error_is_a_client_transport_error() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", timeout=5) as c:
        with pytest.raises(TransportError) as info:
            c.get_params("x")  # the wire path
        assert isinstance(info.value.__cause__, httpx.ConnectError)
        with pytest.raises(TransportError) as info:
            c.step("x", {"w": torch.zeros(3)}, return_params=True)
        assert isinstance(info.value.__cause__, httpx.ConnectError)
        with pytest.raises(TransportError):
            c.health()  # the regular httpx path


# ---------------------------------------------------------------------- in-place receive


def _make(c: Client, name: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    values = {
        "w": torch.randn(3, 4, generator=gen),
        "b": torch.randn(4, generator=gen),
        "h": torch.randn(5, generator=gen).to(torch.float64),
    }
    c.create(name, values, lr=0.1)
    c.step(name, {n: torch.ones_like(t) for n, t in values.items()})
    return c.get_params(name)


@pytest.mark.parametrize("transport", ["wire", "httpx"])
def test_get_params_into_writes_in_place(live_server: LiveServer, transport: str) -> None:
    http = None if transport == "wire" else httpx.Client(base_url=live_server.url, timeout=30)
    with Client(live_server.url, http_client=http) as c:
        name = unique("into")
        server = _make(c, name)
        w = torch.zeros(3, 4, requires_grad=True)
        b = torch.zeros(4)
        ptrs, version = (w.data_ptr(), b.data_ptr()), w._version
        out = c.get_params(name, into={"w": w, "b": b})
        assert out["w"] is w and out["b"] is b
        assert (w.data_ptr(), b.data_ptr()) == ptrs
        assert w._version > version, "autograd must see the in-place write"
        assert_tensor_equal(server["w"], w.detach(), "w")
        assert_tensor_equal(server["b"], b, "b")
        assert_tensor_equal(server["h"], out["h"], "h")  # not in into: a fresh tensor
    if http is not None:
        http.close()


def test_get_params_into_falls_back_for_unfit_destinations(live_server: LiveServer) -> None:
    with Client(live_server.url) as c:
        name = unique("unfit")
        server = _make(c, name)
        wrong_dtype = torch.zeros(3, 4, dtype=torch.float64)
        wrong_shape = torch.zeros(2, 2)
        strided = torch.zeros(5, 2, dtype=torch.float64)[:, 0]  # shape (5,), not contiguous
        assert not strided.is_contiguous()
        out = c.get_params(
            name, ["w", "b", "h"], into={"w": wrong_dtype, "b": wrong_shape, "h": strided}
        )
        for n, dest in [("w", wrong_dtype), ("b", wrong_shape), ("h", strided)]:
            assert out[n] is not dest
            assert_tensor_equal(server[n], out[n], n)
            assert not dest.any(), f"{n}: an unfit destination must be left alone"


# ---------------------------------------------------------------------- RemoteAdam recovery


class TruncatingProxy:
    """Forwards HTTP/1.1 (Content-Length framing) to ``upstream``; the next ``cut`` step
    replies are forwarded only up to ``keep(total)`` bytes, then the client's connection
    is closed."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self.cut = 0
        self.keep: Callable[[bytes], int] = lambda reply: len(reply) // 2
        self._server = RawServer(self._handle)
        self.url = self._server.url

    def _handle(self, conn: socket.socket, index: int) -> None:
        with socket.create_connection(self._upstream, timeout=10) as up:
            while (request := read_request(conn)) is not None:
                head, body = request
                up.sendall(head + b"\r\n\r\n" + body)
                reply = self._response(up)
                if b"/step" in head.split(b"\r\n")[0] and self.cut > 0:
                    self.cut -= 1
                    conn.sendall(reply[: self.keep(reply)])
                    return
                conn.sendall(reply)

    @staticmethod
    def _response(up: socket.socket) -> bytes:
        got = read_request(up)  # a response is framed like a request here
        assert got is not None, "upstream closed"
        return got[0] + b"\r\n\r\n" + got[1]

    def __enter__(self) -> TruncatingProxy:
        self._server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.__exit__(*exc)


def test_remote_adam_resyncs_after_a_step_reply_cut_short(live_server: LiveServer) -> None:
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(64, generator=gen).requires_grad_(True)
    b = torch.randn(64, generator=gen).requires_grad_(True)
    name = unique("cut")
    # retries=0: the client would otherwise replay the step (same idempotency key) and
    # succeed; this test is about what is left when the failure reaches RemoteAdam.
    with (
        TruncatingProxy(live_server.url) as proxy,
        Client(proxy.url, retries=0) as via_proxy,
        Client(live_server.url) as direct,
    ):
        opt = RemoteAdam([("a", a), ("b", b)], lr=0.1, client=via_proxy, name=name)
        replica = [a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)]
        local = torch.optim.Adam(replica, lr=0.1)
        for p, q in zip([a, b], replica, strict=True):
            p.grad = torch.randn(64, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        local.step()
        assert_tensor_equal(replica[0].detach(), a.detach(), "a after a whole reply")

        # cut inside b's data: a's new values and part of b's arrive (written in place)
        proxy.cut = 1
        proxy.keep = lambda reply: len(reply) - 100
        for p, q in zip([a, b], replica, strict=True):
            p.grad = torch.randn(64, generator=gen)
            q.grad = p.grad.clone()
        with pytest.raises((ProtocolError, TransportError)):
            opt.step()
        local.step()  # the server did step
        server = direct.get_params(name)
        assert direct.get(name).step == 2
        assert_tensor_equal(replica[0].detach(), server["a"], "server a")
        assert_tensor_equal(replica[1].detach(), server["b"], "server b")
        assert_tensor_equal(server["a"], a.detach(), "local a resynced")
        assert_tensor_equal(server["b"], b.detach(), "local b resynced")
        assert proxy.cut == 0
        opt.close()
