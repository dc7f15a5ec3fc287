"""The ``adamscope`` command line.

``adamscope serve`` runs the service with uvicorn; ``--per-gpu`` runs one worker process per
visible GPU (steppers live in a worker's memory, so each GPU gets its own port: the base port
plus the GPU index, and its own data subdirectory).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .settings import DEFAULT_PORT

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .settings import Settings

    overrides = {k: v for k, v in {
        "host": args.host, "port": args.port, "data_dir": args.data_dir,
        "device": args.device, "log_level": args.log_level,
        "max_body_bytes": args.max_body_bytes,
    }.items() if v is not None}
    settings = Settings(**overrides)
    if args.per_gpu:
        return _serve_per_gpu(args, settings.port, settings.data_dir)
    app = create_app(settings)
    print(f"adamscope serving on http://{settings.host}:{settings.port} "
          f"(default device {settings.default_device()}, data in {settings.data_dir})",
          flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=5)
    return 0


def _serve_per_gpu(args: argparse.Namespace, base_port: int, data_dir: Path) -> int:
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        print("--per-gpu: no CUDA device visible; serving one CPU worker", file=sys.stderr)
    workers = []
    for i in range(max(count, 1)):
        env = dict(os.environ)
        if count:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        cmd = [sys.executable, "-m", "service.cli", "serve",
               "--port", str(base_port + i), "--data-dir", str(data_dir / f"worker{i}")]
        for flag in ("host", "device", "log_level", "max_body_bytes"):
            value = getattr(args, flag)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        workers.append(subprocess.Popen(cmd, env=env))

    def stop(signum: int, frame: object) -> None:
        for w in workers:
            w.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [w.wait() for w in workers]
    return max(codes, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adamscope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--data-dir", type=Path, help="data directory (default ./adamscope-data)")
    serve.add_argument("--device", help="default device for new steppers (default: cuda if "
                       "available, else cpu)")
    serve.add_argument("--max-body-bytes", type=int, help="largest request body accepted")
    serve.add_argument("--log-level", help="uvicorn log level (default info)")
    serve.add_argument("--per-gpu", action="store_true",
                       help="one worker per visible GPU on ports PORT, PORT+1, ...")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
