"""A small HTTP/1.1 load generator on raw asyncio sockets (no httpx).

``python benchmarks/loadgen.py URL PATH [PATH ...] --connections 16 --seconds 5`` keeps
``connections`` kept-alive connections busy, each sending GETs for the paths in turn, and
prints one JSON line: requests, seconds, requests/s, latency p50/p90/p99/max in ms, and
the count of non-200 answers. It is bounded by time and by ``--max-requests``, and only
ever connects to the URL it is given (the benchmarks give it 127.0.0.1).

It parses just what it needs (status line, Content-Length or chunked body), so a Python
client is not what limits the measured rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit


async def _read_response(reader: asyncio.StreamReader) -> int:
    status_line = await reader.readline()
    status = int(status_line.split(b" ", 2)[1])
    length = None
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def _worker(
    host: str,
    port: int,
    requests: list[bytes],
    deadline: float,
    budget: list[int],
    latencies: list[float],
    errors: list[int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors[0] += 1
            i += 1
    finally:
        writer.close()


async def run(
    url: str,
    paths: list[str],
    connections: int,
    seconds: float,
    max_requests: int,
    headers: dict[str, str] | None = None,
) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    requests = [f"GET {p} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode() for p in paths]
    latencies: list[float] = []
    errors = [0]
    budget = [max_requests]
    t0 = time.perf_counter()
    deadline = t0 + seconds
    await asyncio.gather(
        *(
            _worker(
                host,
                port,
                requests[i % len(requests) :] + requests[: i % len(requests)],
                deadline,
                budget,
                latencies,
                errors,
            )
            for i in range(connections)
        )
    )
    elapsed = time.perf_counter() - t0
    latencies.sort()

    def q(f: float) -> float:
        return latencies[min(len(latencies) - 1, int(f * len(latencies)))] * 1e3

    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(q(0.5), 3),
        "p90_ms": round(q(0.9), 3),
        "p99_ms": round(q(0.99), 3),
        "max_ms": round(latencies[-1] * 1e3, 3),
        "non_200": errors[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(
        json.dumps(
            asyncio.run(
                run(
                    args.url, args.paths, args.connections, args.seconds, args.max_requests, headers
                )
            )
        )
    )


if __name__ == "__main__":
    main()
