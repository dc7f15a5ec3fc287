"""Milliseconds per Adam step: remote (``RemoteAdam`` through a real ``adamscope serve``) vs
local (``torch.optim.Adam`` in this process, same implementation) vs the wire's floor,
measured interleaved.

    python benchmarks/bench_step.py                      # 1M, 10M, 50M fp32 params, fused Adam
    python benchmarks/bench_step.py --impl forloop --sizes 1M 10M --steps 30
    python benchmarks/bench_step.py --sizes 10K 10M --steps 30 --signals-ab

``--signals-ab`` serves twice, with the per-step signals on and off, measures every size on
both in the same run and prints the signals' per-step cost in the service (its engine time
per step, on minus off) and the remote/floor ratio of each.

The floor is what no HTTP service can beat on this machine: a plain TCP echo of the same
number of bytes (request and reply) between two processes on loopback (``recv_into`` a
preallocated buffer, ``sendall`` it back), plus one local fused Adam step (the fastest exact
PyTorch implementation) of the same parameters.

The server is ``python -m adamscope.service.cli serve`` in a subprocess on 127.0.0.1 and an
ephemeral port (:mod:`adamscope.service.testing`). A remote step is everything a training
loop waits for in ``RemoteAdam.step()``: encoding the gradients as safetensors, the HTTP
round trip, PyTorch's Adam step in the service, the updated parameters coming back and
being copied into the local tensors. A local step is ``torch.optim.Adam.step()``. Both get
the same parameters, gradients and options; remote and local steps alternate (and
alternate which goes first) so that machine noise hits both alike. At the end the remote
and local parameters are compared with ``torch.equal``: the two runs must be bit-identical.

Parameters are laid out like a small transformer (per layer: attention and MLP weights,
biases, layer norms; plus an embedding holding the remainder), so 10M parameters come as
about 130 tensors of mixed sizes rather than one big block.

A second table sets the local step and the server's step against the device's memory
bandwidth: Adam reads the parameter, gradient, m and v and writes the parameter, m and v (28
bytes per fp32 parameter), so the step cannot beat 28 bytes x params / the device's copy
rate. The server's step is its engine time per timed step (``adamscope_step_duration_seconds``
on ``/metrics``: the gradients' copy to the device, PyTorch's update and the wait for it,
plus the per-step signals unless ``--no-signals``). With ``--device cuda`` it adds the
pinned host-to-device and device-to-host copy rates, which bound how fast gradients reach the
GPU and parameters come back.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from adamscope.client import Client, RemoteAdam
from adamscope.service.testing import spawned

ROOT = Path(__file__).resolve().parent.parent
IMPLS = {
    "forloop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"foreach": False, "fused": True},
}


def parse_size(text: str) -> int:
    """'1M', '10M', '500k', '1e6' or '123456' -> a parameter count."""
    t = text.strip().lower()
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(t[-1:], 1)
    value = float(t[:-1] if scale != 1 else t) * scale
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r}")
    return int(value)


def transformer_shapes(numel: int) -> list[tuple[int, ...]]:
    """Tensor shapes of a transformer-like model with about ``numel`` parameters (~8 layers)."""
    d = 64 * max(1, round(math.sqrt(numel / (12 * 8)) / 64))
    layer: list[tuple[int, ...]] = []
    for _ in range(4):  # q, k, v, out projections
        layer += [(d, d), (d,)]
    layer += [(4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # MLP
    layer += [(d,), (d,), (d,), (d,)]  # two layer norms
    per_layer = sum(math.prod(s) for s in layer)
    layers = numel // per_layer
    shapes = layer * layers
    rest = numel - per_layer * layers
    if rest >= d:
        shapes.append((rest // d, d))  # embedding
    elif rest or not shapes:
        shapes.append((max(rest, 1),))
    return shapes


def model(
    numel: int,
) -> tuple[list[tuple[int, ...]], list[str], list[torch.Tensor], list[torch.Tensor]]:
    """A benchmark model of about ``numel`` parameters: shapes, names, initial values and
    one set of gradients (the same every run: seeded)."""
    shapes = transformer_shapes(numel)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    return shapes, [f"p{i}" for i in range(len(shapes))], init, grads


ECHO_SERVER = r"""
import socket, sys
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
print(ls.getsockname()[1], flush=True)
conn, _ = ls.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(int(sys.argv[1])); view = memoryview(buf)
while True:
    head = bytearray(16); got = 0
    while got < 16:
        n = conn.recv_into(memoryview(head)[got:])
        if not n: sys.exit(0)
        got += n
    up, down = int.from_bytes(head[:8], "little"), int.from_bytes(head[8:], "little")
    got = 0
    while got < up:
        n = conn.recv_into(view[got:up])
        if not n: sys.exit(0)
        got += n
    conn.sendall(view[:down])
"""


class Echo:
    """A plain-socket echo server in another process: the transport floor."""

    def __init__(self, capacity: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ECHO_SERVER, str(capacity)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(capacity)

    def round_trip(self, up: int, down: int) -> float:
        view = memoryview(self.buf)
        t0 = time.perf_counter()
        self.sock.sendall(up.to_bytes(8, "little") + down.to_bytes(8, "little"))
        self.sock.sendall(view[:up])
        got = 0
        while got < down:
            got += self.sock.recv_into(view[got:down])
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextmanager
def server(
    device: str,
    timeout: float = 60,
    data_parent: str | None = None,
    extra: tuple[str, ...] = (),
    stop_timeout: float = 15,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """``adamscope serve`` (with ``extra`` arguments, and ``env`` added to its environment)
    in a subprocess on 127.0.0.1; yields its URL, stops it after. Its data directory is a
    temporary one (inside ``data_parent`` when given)."""
    with (
        tempfile.TemporaryDirectory(prefix="adamscope-bench-", dir=data_parent) as data,
        spawned(
            data,
            "--device",
            device,
            *extra,
            timeout=timeout,
            stop_timeout=stop_timeout,
            env=env,
            cwd=ROOT,
        ) as running,
    ):
        yield running.url


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def engine_time(client: Client, name: str) -> tuple[float, int, float, int]:
    """The server's summed engine seconds and step count for stepper ``name``, and its
    summed seconds and count of step requests (``adamscope_http_request_duration_seconds``
    of the step route: from the request's arrival until its reply's last byte left, so a
    wait for the previous step's deferred signals is in it), from /metrics."""
    total, count, http_total, http_count = 0.0, 0, 0.0, 0
    text = httpx.get(f"{client.url}/metrics", timeout=60).text
    label = f'{{stepper="{name}"}}'
    route = '{method="POST",route="/v1/steppers/{name}/step"}'
    for line in text.splitlines():
        if line.startswith(f"adamscope_step_duration_seconds_sum{label}"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"adamscope_step_duration_seconds_count{label}"):
            count = int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith(f"adamscope_http_request_duration_seconds_sum{route}"):
            http_total = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"adamscope_http_request_duration_seconds_count{route}"):
            http_count = int(float(line.rsplit(" ", 1)[1]))
    return total, count, http_total, http_count


def bench_size(
    client: Client, numel: int, impl: str, device: str, warmup: int, steps: int
) -> dict[str, object]:
    """Interleaved timings of ``steps`` remote and local steps (after ``warmup`` of each)."""
    shapes, names, init, grads = model(numel)
    options = {"lr": 1e-3, **IMPLS[impl]}

    remote_params = [t.clone().requires_grad_() for t in init]
    local_params = [t.to(device, copy=True).requires_grad_() for t in init]
    fused_params = [t.to(device, copy=True).requires_grad_() for t in init]
    for p, g in zip(remote_params, grads, strict=True):
        p.grad = g.clone()
    for p, g in zip(local_params, grads, strict=True):
        p.grad = g.to(device)
    for p, g in zip(fused_params, grads, strict=True):
        p.grad = g.to(device)
    fused = torch.optim.Adam(fused_params, lr=1e-3, fused=True)
    wire_bytes = sum(g.numel() * g.element_size() for g in grads)
    echo = Echo(wire_bytes + (1 << 16))
    name = f"bench-{numel}-{impl}-{os.getpid()}"
    # In-memory durability: this measures the wire and the step, not the disk (see
    # bench_durability.py for what each durability policy adds).
    client.create(
        name,
        [(n, p.detach()) for n, p in zip(names, remote_params, strict=True)],
        **options,
        device=device,
        durability="manual",
    )
    remote = RemoteAdam(
        list(zip(names, remote_params, strict=True)),
        **options,
        client=client,
        name=name,
        device=device,
    )
    local = torch.optim.Adam(local_params, **options)

    def timed_remote() -> float:
        t0 = time.perf_counter()
        remote.step()
        return time.perf_counter() - t0

    def timed_local() -> float:
        sync(device)
        t0 = time.perf_counter()
        local.step()
        sync(device)
        return time.perf_counter() - t0

    def timed_floor() -> float:
        # The same bytes each way as a remote step's request and reply (header included).
        head = 8 + 64 * len(shapes)
        wire = echo.round_trip(wire_bytes + head, wire_bytes + head)
        wire_ms.append(wire * 1e3)
        sync(device)
        t0 = time.perf_counter()
        fused.step()
        sync(device)
        return wire + time.perf_counter() - t0

    remote_ms: list[float] = []
    local_ms: list[float] = []
    floor_ms: list[float] = []
    wire_ms: list[float] = []  # the floor's socket part
    engine_before = (0.0, 0, 0.0, 0)
    try:
        for i in range(warmup + steps):
            if i == warmup:
                engine_before = engine_time(client, name)
            order = [timed_remote, timed_local, timed_floor]
            order = order[i % 3 :] + order[: i % 3]  # rotate who goes first
            took = {f: f() for f in order}
            if i >= warmup:
                remote_ms.append(took[timed_remote] * 1e3)
                local_ms.append(took[timed_local] * 1e3)
                floor_ms.append(took[timed_floor] * 1e3)
        wire_ms[:] = wire_ms[warmup:]
        engine_after = engine_time(client, name)
        identical = all(
            torch.equal(r, lo.detach().cpu())
            for r, lo in zip(remote_params, local_params, strict=True)
        )
    finally:
        client.delete(name)
        echo.close()
    return {
        "numel": sum(math.prod(s) for s in shapes),
        "tensors": len(shapes),
        "remote": remote_ms,
        "local": local_ms,
        "floor": floor_ms,
        "wire": wire_ms,
        "server_ms": (engine_after[0] - engine_before[0])
        * 1e3
        / max(1, engine_after[1] - engine_before[1]),
        "request_ms": (engine_after[2] - engine_before[2])
        * 1e3
        / max(1, engine_after[3] - engine_before[3]),
        "identical": identical,
    }


def breakdown(results: dict[str, dict[str, object]]) -> list[str]:
    """One line per variant (signals on/off) of one size: where its remote step's time
    goes (see the table's caption in :func:`main`)."""
    lines = []
    step = float(str(results["off"]["server_ms"])) if "off" in results else None
    for label, res in results.items():
        remote, wire = res["remote"], res["wire"]
        assert isinstance(remote, list) and isinstance(wire, list)
        request = float(str(res["request_ms"]))
        engine = float(str(res["server_ms"]))
        own = engine if step is None or label == "off" else step
        signals = f"{engine - step:>26.2f}" if step is not None and label == "on" else f"{'':>26}"
        r, w = statistics.fmean(remote), statistics.fmean(wire)
        lines.append(
            f"{res['numel']:>11,} {label:>7}   {r:>8.2f}   {r - request:>8.2f}   {request:>8.2f}"
            f"   {w:>8.2f}   {own:>8.2f}   {request - w - own:>8.2f}   {signals}"
        )
    return lines


def device_limits(numel: int, device: str, repeats: int = 5) -> dict[str, float]:
    """What the hardware allows for one step of ``numel`` fp32 parameters: the device's
    copy bandwidth (bytes read + written per second, from a device-to-device copy of
    ``numel`` floats), the time Adam's 28 bytes of memory traffic per parameter (read
    param, grad, m, v; write param, m, v) take at that rate, and, on a GPU, the pinned
    host-to-device and device-to-host copy rates of the gradients and parameters."""
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)

    def best(work: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            work()
            sync(device)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    nbytes = numel * 4
    copy_rate = 2 * nbytes / best(lambda: dst.copy_(src))
    out = {"copy_gbs": copy_rate / 1e9, "adam_floor_ms": 28 * numel / copy_rate * 1e3}
    if device.startswith("cuda"):
        host = torch.empty(numel, pin_memory=True)
        out["h2d_gbs"] = nbytes / best(lambda: dst.copy_(host, non_blocking=True)) / 1e9
        out["d2h_gbs"] = nbytes / best(lambda: host.copy_(src, non_blocking=True)) / 1e9
    return out


def fmt(ms: list[float]) -> str:
    return f"{statistics.median(ms):9.2f} [{min(ms):8.2f}, {max(ms):8.2f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=[10**6, 10**7, 5 * 10**7],
        help="parameter counts, e.g. 1M 10M 50M (default)",
    )
    parser.add_argument(
        "--impl",
        choices=sorted(IMPLS),
        default="fused",
        help="Adam implementation on both sides (default fused)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the service keeps the stepper and the local Adam runs",
    )
    parser.add_argument("--steps", type=int, default=15, help="timed steps per size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per size")
    parser.add_argument(
        "--no-signals",
        action="store_true",
        help="serve without per-step signals (ADAMSCOPE_SIGNALS=false): the "
        "server's step is then the copy, PyTorch's update and its wait",
    )
    parser.add_argument(
        "--signals-ab",
        action="store_true",
        help="two servers, per-step signals on and off, each size measured on both in the "
        "same run; prints the signals' per-step cost and both remote/floor ratios",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    print(
        f"adamscope step benchmark: torch {torch.__version__}, python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"threads, device {args.device}, impl {args.impl} {IMPLS[args.impl]}, fp32, "
        f"{args.steps} timed steps after {args.warmup} warmup, remote/local/floor interleaved"
    )
    print(
        "floor = plain-socket echo of the same bytes + one local fused Adam step"
        + ("; server without per-step signals" if args.no_signals and not args.signals_ab else "")
    )
    header = (
        f"{'params':>11} {'tensors':>7}   {'remote ms median [min, max]':>29}   "
        f"{'local ms median [min, max]':>29}   {'floor ms median [min, max]':>29}   "
        f"{'remote/local':>12} {'remote/floor':>12}  identical"
    )
    print(header)
    print("-" * len(header))
    all_identical = True
    limits: list[tuple[int, float, float, dict[str, float]]] = []
    variants = [("on", None), ("off", {"ADAMSCOPE_SIGNALS": "false"})]
    if not args.signals_ab:
        variants = [variants[1] if args.no_signals else variants[0]]
    with contextlib.ExitStack() as stack:
        clients = [
            (label, stack.enter_context(Client(stack.enter_context(server(args.device, env=env)))))
            for label, env in variants
        ]
        costs: list[str] = []
        parts: list[str] = []
        for numel in args.sizes:
            by_label: dict[str, tuple[float, float]] = {}
            results: dict[str, dict[str, object]] = {}
            for label, client in clients:
                res = bench_size(client, numel, args.impl, args.device, args.warmup, args.steps)
                remote, local, floor = res["remote"], res["local"], res["floor"]
                assert isinstance(remote, list) and isinstance(local, list)
                assert isinstance(floor, list)
                ratio = statistics.median(remote) / statistics.median(local)
                to_floor = statistics.median(remote) / statistics.median(floor)
                all_identical &= bool(res["identical"])
                print(
                    f"{res['numel']:>11,} {res['tensors']:>7}   {fmt(remote):>29}   "
                    f"{fmt(local):>29}   {fmt(floor):>29}   {ratio:>11.2f}x {to_floor:>11.2f}x"
                    f"  {res['identical']}" + (f"  signals {label}" if args.signals_ab else ""),
                    flush=True,
                )
                by_label[label] = (float(str(res["server_ms"])), to_floor)
                results[label] = res
                limits.append(
                    (
                        int(str(res["numel"])),
                        statistics.median(local),
                        float(str(res["server_ms"])),
                        device_limits(numel, args.device),
                    )
                )
            if len(by_label) == 2:
                (on_ms, on_ratio), (off_ms, off_ratio) = by_label["on"], by_label["off"]
                costs.append(
                    f"{numel:>11,}   {on_ms - off_ms:>16.2f}   {on_ratio:>16.2f}x"
                    f"   {off_ratio:>17.2f}x"
                )
            parts += breakdown(results)
        if costs:
            print(
                "\nper-step signals in the service (server step with signals on minus off; "
                "remote/floor of each, same run)"
            )
            print(
                f"{'params':>11}   {'signals ms/step':>16}   {'remote/floor on':>17}"
                f"   {'remote/floor off':>18}"
            )
            print("\n".join(costs), flush=True)
        print(
            "\nwhere a remote step's time goes, ms, means over the timed steps (/metrics gives "
            "the server's only as sums; a slow outlier moves a mean: compare with the medians "
            "above): remote = client + server request; server request (arrival to the "
            "reply's last byte) = wire (the floor's echo of the same bytes) + step (engine "
            "time; with signals on: the off server's, the signals run after the reply) + the "
            "rest (HTTP, parsing into the buffers, streaming the reply beyond the echo's "
            "time, and with signals on the wait for the previous step's signals); client = "
            "remote - server request (encoding, connecting, copying the reply into the "
            "parameters)"
        )
        print(
            f"{'params':>11} {'signals':>7}   {'remote':>8}   {'client':>8}   {'request':>8}   "
            f"{'wire':>8}   {'step':>8}   {'rest':>8}   {'signals (engine, deferred)':>26}"
        )
        print("\n".join(parts), flush=True)
    print(
        f"\nmemory-bandwidth limit on {args.device}: Adam moves 28 bytes per fp32 parameter "
        "(reads param, grad, m, v; writes param, m, v); copy = device-to-device copy rate; "
        "server step = the service's engine time per step (mean, /metrics)"
    )
    print(
        f"{'params':>11}   {'copy GB/s':>9}   {'28 B/param ms':>13}   {'local step ms':>13}"
        f"   {'step / limit':>12}   {'server step ms':>14}   {'server / limit':>14}"
        + ("   H2D GB/s   D2H GB/s" if args.device != "cpu" else "")
    )
    for n, local_ms, server_ms, lim in limits:
        line = (
            f"{n:>11,}   {lim['copy_gbs']:>9.1f}   {lim['adam_floor_ms']:>13.2f}   "
            f"{local_ms:>13.2f}   {local_ms / lim['adam_floor_ms']:>11.2f}x   "
            f"{server_ms:>14.2f}   {server_ms / lim['adam_floor_ms']:>13.2f}x"
        )
        if "h2d_gbs" in lim:
            line += f"   {lim['h2d_gbs']:>8.1f}   {lim['d2h_gbs']:>8.1f}"
        print(line, flush=True)
    return 0 if all_identical else 1


if __name__ == "__main__":
    sys.exit(main())
