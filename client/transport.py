"""An httpx transport that moves bulk tensor bodies without copying them.

httpx's default HTTP/1.1 stack (httpcore + h11) joins each upload chunk into a new bytes
object and hands a download back in 64 KiB pieces that are joined again; for a step of 10M
fp32 parameters (40 MB each way) that is most of the step's time. :class:`WireTransport`
keeps the httpx API (it is an ``httpx.BaseTransport``) but serves the requests the client
marks with the ``adamscope.wire`` extension itself, over kept-alive plain sockets:

- the request body's chunks (memoryviews of tensor memory) go to ``socket.sendall``
  unchanged;
- the response exposes ``response.extensions["adamscope.readinto"]``, a function that
  fills a caller's buffer (e.g. a parameter's own memory) straight from the socket with
  ``recv_into``. Iterating the response works as usual too.

Every other request (and any ``https`` URL) goes through the regular httpx transport.
Only what HTTP/1.1 responses need is implemented: Content-Length and chunked bodies, or a
body closed by the server; informational (1xx) responses are skipped.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx

__all__ = ["WIRE_EXTENSION", "READINTO_EXTENSION", "WireTransport"]

WIRE_EXTENSION = "adamscope.wire"
READINTO_EXTENSION = "adamscope.readinto"

_MAX_HEAD = 64 * 1024
_RECV = 1 << 20
_IOV_MAX = 512  # below the kernel's limit of buffers per sendmsg (1024 on Linux)


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()  # bytes received but not consumed yet

    def fill(self) -> bool:
        chunk = self.sock.recv(_RECV)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def readinto(self, dest: memoryview) -> int:
        """Up to ``dest.nbytes`` bytes: buffered ones first, else one recv_into."""
        if self.buf:
            n = min(len(self.buf), dest.nbytes)
            dest[:n] = self.buf[:n]
            del self.buf[:n]
            return n
        return self.sock.recv_into(dest, dest.nbytes)

    def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            if len(self.buf) > _MAX_HEAD:
                raise httpx.RemoteProtocolError("response line too long")
            if not self.fill():
                raise httpx.RemoteProtocolError("server closed the connection mid-response")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Body(httpx.SyncByteStream):
    """A response body read off the socket: iterable, and ``readinto`` for zero-copy."""

    def __init__(
        self,
        transport: WireTransport,
        key: tuple[str, int],
        conn: _Connection,
        length: int | None,
        chunked: bool,
        keep_alive: bool,
    ) -> None:
        self._transport = transport
        self._key = key
        self._conn: _Connection | None = conn
        self._left = length  # bytes left (Content-Length) or in the current chunk
        self._chunked = chunked
        self._keep = keep_alive and (length is not None or chunked)
        self._done = length == 0 and not chunked
        if self._done:
            self._finish()  # no body (HEAD, 204, Content-Length: 0): the connection is free

    def _next_chunk_size(self, conn: _Connection) -> None:
        if self._left == 0:  # the CRLF after a chunk's data
            conn.readline()
        line = conn.readline().split(b";", 1)[0].strip()
        try:
            size = int(line, 16)
        except ValueError:
            raise httpx.RemoteProtocolError(f"bad chunk size line {line!r}") from None
        if size == 0:
            while conn.readline():  # trailers, up to the empty line
                pass
            self._done = True
        self._left = size

    def readinto(self, dest: memoryview | bytearray) -> int:
        """Fill up to ``len(dest)`` bytes of ``dest``; 0 at the end of the body."""
        view = memoryview(dest).cast("B")
        if self._done or self._conn is None or view.nbytes == 0:
            return 0
        conn = self._conn
        try:
            if self._chunked and not self._left:
                self._next_chunk_size(conn)
                if self._done:
                    self._finish()
                    return 0
            want = view.nbytes if self._left is None else min(view.nbytes, self._left)
            n = conn.readinto(view[:want])
        except OSError as e:
            self._abort()
            raise httpx.ReadError(str(e)) from e
        if n == 0:
            if self._left is None:  # body delimited by the server closing
                self._done = True
                self._finish()
                return 0
            self._abort()
            raise httpx.RemoteProtocolError("server closed the connection mid-body")
        if self._left is not None:
            self._left -= n
            if self._left == 0 and not self._chunked:
                self._done = True
                self._finish()
        return n

    def __iter__(self) -> Iterator[bytes]:
        buf = bytearray(_RECV)
        view = memoryview(buf)
        while True:
            n = self.readinto(view)
            if n == 0:
                return
            yield bytes(view[:n])

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._keep and not conn.buf:
                self._transport._checkin(self._key, conn)
            else:
                conn.close()

    def _abort(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        if not self._done:
            self._abort()  # unread bytes left on the wire: the connection cannot be reused


def _send_all(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """Write every part with as few system calls as possible (scatter-gather ``sendmsg``),
    never copying a part."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        batch = views[:_IOV_MAX]
        sent = sock.sendmsg(batch)
        while sent:
            if sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


class WireTransport(httpx.BaseTransport):
    """httpx transport: marked bulk requests over plain sockets, the rest via httpx."""

    def __init__(self, inner: httpx.BaseTransport | None = None, max_idle: int = 4) -> None:
        self._inner = inner or httpx.HTTPTransport()
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._lock = threading.Lock()
        self._max_idle = max_idle

    def _checkout(self, key: tuple[str, int]) -> _Connection | None:
        with self._lock:
            pool = self._idle.get(key)
            return pool.pop() if pool else None

    def _checkin(self, key: tuple[str, int], conn: _Connection) -> None:
        with self._lock:
            pool = self._idle.setdefault(key, [])
            if len(pool) < self._max_idle:
                pool.append(conn)
                return
        conn.close()

    def _connect(self, key: tuple[str, int], timeout: dict[str, Any]) -> _Connection:
        try:
            sock = socket.create_connection(key, timeout=timeout.get("connect"))
        except OSError as e:
            raise httpx.ConnectError(str(e)) from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(sock)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not request.extensions.get(WIRE_EXTENSION) or request.url.scheme != "http":
            return self._inner.handle_request(request)
        key = (request.url.host, request.url.port or 80)
        timeout = request.extensions.get("timeout", {})
        conn = self._checkout(key)
        if conn is not None:
            try:
                return self._exchange(request, key, conn, timeout, reused=True)
            except _StaleConnection:
                pass  # the server closed an idle connection before reading anything
        return self._exchange(request, key, self._connect(key, timeout), timeout, reused=False)

    def _exchange(
        self,
        request: httpx.Request,
        key: tuple[str, int],
        conn: _Connection,
        timeout: dict[str, Any],
        reused: bool,
    ) -> httpx.Response:
        target = request.url.raw_path.decode("ascii")
        lines = [f"{request.method} {target} HTTP/1.1"]
        headers = request.headers.copy()
        body = request.stream
        if "content-length" not in headers and request.method in ("POST", "PUT", "PATCH"):
            headers["transfer-encoding"] = "chunked"
        chunked_upload = headers.get("transfer-encoding") == "chunked"
        lines += [f"{k}: {v}" for k, v in headers.multi_items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        conn.sock.settimeout(timeout.get("write"))
        try:
            out: list[bytes | memoryview] = [head]
            for part in body:  # type: ignore[union-attr]
                if chunked_upload:
                    size = memoryview(part).nbytes
                    if size:  # an empty chunk would end the body
                        out += [f"{size:x}\r\n".encode(), part, b"\r\n"]
                else:
                    out.append(part)
            if chunked_upload:
                out.append(b"0\r\n\r\n")
            _send_all(conn.sock, out)
            conn.sock.settimeout(timeout.get("read"))
            status, reason, response_headers = self._read_head(conn, reused)
        except (_StaleConnection, httpx.RemoteProtocolError):
            conn.close()
            raise
        except TimeoutError as e:
            conn.close()
            raise httpx.ReadTimeout(str(e)) from e
        except OSError as e:
            conn.close()
            if reused and isinstance(e, BrokenPipeError | ConnectionResetError):
                raise _StaleConnection from e
            raise httpx.WriteError(str(e)) from e
        length_header = response_headers.get("content-length")
        chunked = "chunked" in response_headers.get("transfer-encoding", "").lower()
        if not chunked and length_header is not None and not length_header.isdigit():
            conn.close()
            raise httpx.RemoteProtocolError(f"bad Content-Length {length_header!r}")
        length = None if chunked or length_header is None else int(length_header)
        if request.method == "HEAD" or status in (204, 304):
            length, chunked = 0, False
        keep = response_headers.get("connection", "").lower() != "close"
        stream = _Body(self, key, conn, length, chunked, keep)
        return httpx.Response(
            status,
            headers=response_headers.multi_items(),
            stream=stream,
            extensions={
                READINTO_EXTENSION: stream.readinto,
                "http_version": b"HTTP/1.1",
                "reason_phrase": reason.encode("latin-1"),
            },
        )

    def _read_head(self, conn: _Connection, reused: bool) -> tuple[int, str, httpx.Headers]:
        while True:
            try:
                line = conn.readline()
            except httpx.RemoteProtocolError:
                if reused and not conn.buf:
                    raise _StaleConnection from None
                raise
            parts = line.decode("latin-1").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise httpx.RemoteProtocolError(f"bad status line {line!r}")
            status = int(parts[1])
            fields = []
            while True:
                h = conn.readline()
                if not h:
                    break
                k, _, v = h.decode("latin-1").partition(":")
                fields.append((k.strip(), v.strip()))
            if status >= 200:
                return status, parts[2] if len(parts) > 2 else "", httpx.Headers(fields)

    def close(self) -> None:
        with self._lock:
            pools, self._idle = self._idle, {}
        for pool in pools.values():
            for conn in pool:
                conn.close()
        self._inner.close()


class _StaleConnection(Exception):
    """A reused connection was closed by the server before it answered: retry afresh."""
