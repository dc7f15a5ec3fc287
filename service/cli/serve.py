"""``adamscope serve``: the service in this process, one worker per GPU, or on Ray.

``adamscope serve`` runs the service with uvicorn; ``--per-gpu`` runs one worker process per
visible GPU (steppers live in a worker's memory, so each GPU gets its own port: the base port
plus the GPU index, and its own data subdirectory). Worker ``i`` sees only the ``i``-th GPU
visible to the parent (the ``i``-th entry of its ``CUDA_VISIBLE_DEVICES`` when that is set),
as its ``cuda:0``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..auth import (
    TokenConfigError,
    TokenTable,
    banner,
    binding_problem,
    describe_validation_error,
    load_access,
)
from ..settings import DEFAULT_PORT, Settings
from .history_options import add_history_options, history_overrides, history_worker_flags
from .snapshots import add_serve_option, parse_durability

__all__ = ["add_command", "visible_devices", "worker_commands", "worker_device"]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..app import create_app

    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "data_dir": args.data_dir,
            "device": args.device,
            "log_level": args.log_level,
            "max_body_bytes": args.max_body_bytes,
            "durability": parse_durability(args.durability) if args.durability else None,
            **{flag: getattr(args, flag) for flag in _ACCESS_FLAGS},
            "insecure_no_auth": args.insecure_no_auth or None,
            **history_overrides(args),
        }.items()
        if v is not None
    }
    checked = _checked_settings(overrides)
    if checked is None:
        return 2
    settings, table = checked
    if args.per_gpu:
        return _serve_per_gpu(args, settings.port, settings.data_dir)
    if args.ray:
        return _serve_ray(args, settings)
    app = create_app(settings)
    print(
        f"adamscope serving on http://{settings.host}:{settings.port} "
        f"(default device {settings.default_device()}, data in {settings.data_dir})",
        flush=True,
    )
    print(banner(settings, table), flush=True)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
    return 0


def _serve_ray(args: argparse.Namespace, settings: Settings) -> int:
    bind = args.slot_bind or ("auto" if args.ray_address else "127.0.0.1")
    from ..distributed.serve_config import slot_config

    # The slots' services check the tokens: off loopback they need some, as the service
    # itself does.
    try:
        config = slot_config(settings, args.slots, bind, args.slot_cpus, args.slot_gpus)
    except ValueError as e:
        _error(str(e))
        return 2
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        _error("--ray needs Ray Serve: pip install 'adamscope[ray]' (or 'ray[serve]')")
        return 2
    from ..distributed.serve import run

    print(
        f"adamscope: starting on Ray ({args.ray_address or 'a new local instance'}), "
        f"data in {config.data_dir}",
        flush=True,
    )
    return run(config, settings.host, settings.port, args.ray_address)


#: Settings the CLI takes as --flags and hands on to --per-gpu workers.
_ACCESS_FLAGS = ("tokens_file", "max_tensor_elements", "max_steppers", "memory_budget_bytes")


def _checked_settings(overrides: dict[str, Any]) -> tuple[Settings, TokenTable] | None:
    """Settings and their token table, or None after saying on stderr why the service must
    not start (bad settings or tokens, or no tokens on a non-loopback address)."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    try:
        settings = Settings(**overrides)
        table = load_access(settings)
    except ValidationError as e:
        _error(describe_validation_error(e, "settings"))
        return None
    except SettingsError as e:  # an ADAMSCOPE_* variable that is not valid JSON
        cause = f" ({e.__cause__})" if e.__cause__ is not None else ""
        hint = (
            ('; ADAMSCOPE_TOKENS takes a JSON list of {"token", "scope", "prefix"?, "name"?}')
            if '"tokens"' in str(e)
            else ""
        )
        _error(f"{e}{cause}{hint}")
        return None
    except TokenConfigError as e:
        _error(str(e))
        return None
    problem = binding_problem(settings, table)
    if problem is not None:
        _error(problem)
        return None
    return settings, table


def _error(message: str) -> None:
    print(f"adamscope: error: {message}", file=sys.stderr, flush=True)


def visible_devices(parent: str | None, count: int) -> list[str]:
    """What each of the ``count`` GPUs this process sees is called in its
    ``CUDA_VISIBLE_DEVICES`` (``parent``: its value, None when unset): the i-th visible
    GPU is the i-th entry (an index or a ``GPU-``/``MIG-`` UUID, as schedulers hand
    them out), or index ``i`` when the variable is unset."""
    if parent is None:
        return [str(i) for i in range(count)]
    entries = [e.strip() for e in parent.split(",") if e.strip()]
    if len(entries) < count:
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES={parent!r} names {len(entries)} device(s) "
            f"but {count} are visible"
        )
    return entries[:count]


def worker_device(device: str | None) -> str | None:
    """The ``--device`` of a worker that sees its one GPU as ``cuda:0``: ``cuda:N`` of
    the parent's numbering names a GPU the worker cannot see."""
    if device is not None and device.split(":", 1)[0] == "cuda":
        return "cuda"
    return device


def worker_commands(
    args: argparse.Namespace, base_port: int, data_dir: Path, count: int, parent_visible: str | None
) -> list[tuple[list[str], dict[str, str]]]:
    """Each ``--per-gpu`` worker's command line and the environment it adds: worker ``i``
    sees only the parent's ``i``-th visible GPU, on port ``base_port + i``."""
    visible = visible_devices(parent_visible, count) if count else [None]
    out = []
    for i, entry in enumerate(visible):
        cmd = [
            sys.executable,
            "-m",
            "adamscope.service.cli",
            "serve",
            "--port",
            str(base_port + i),
            "--data-dir",
            str(data_dir / f"worker{i}"),
        ]
        for flag in ("host", "device", "log_level", "max_body_bytes", "durability", *_ACCESS_FLAGS):
            value = getattr(args, flag)
            if flag == "device" and count:
                value = worker_device(value)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        if args.insecure_no_auth:
            cmd.append("--insecure-no-auth")
        cmd += history_worker_flags(args)
        out.append((cmd, {} if entry is None else {"CUDA_VISIBLE_DEVICES": entry}))
    return out


def _serve_per_gpu(args: argparse.Namespace, base_port: int, data_dir: Path) -> int:
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        print("--per-gpu: no CUDA device visible; serving one CPU worker", file=sys.stderr)
    elif args.device is not None and worker_device(args.device) != args.device:
        print(
            f"--per-gpu: each worker sees its one GPU as cuda:0; --device {args.device} "
            "is passed on as cuda",
            file=sys.stderr,
        )
    try:
        plan = worker_commands(
            args, base_port, data_dir, count, os.environ.get("CUDA_VISIBLE_DEVICES")
        )
    except ValueError as e:
        _error(f"--per-gpu: {e}")
        return 2
    workers = [subprocess.Popen(cmd, env={**os.environ, **env}) for cmd, env in plan]

    def stop(signum: int, frame: object) -> None:
        for w in workers:
            w.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [w.wait() for w in workers]
    return max(codes, default=0)


def add_command(sub: Any) -> None:
    """The ``serve`` subcommand."""
    serve = sub.add_parser(
        "serve",
        help="run the service",
        description="Run the adamscope service: the REST API (/v1/...), its documentation "
        "(/docs, /redoc, /openapi.json), the dashboard (/dashboard) and metrics (/metrics) "
        f"on http://127.0.0.1:{DEFAULT_PORT} by default. Steppers live in this process's "
        "memory and are written to the data directory (see --durability); they are "
        "restored from it at the next start. Without tokens it serves loopback only, every "
        "client an admin; --tokens-file (or ADAMSCOPE_TOKENS) gives each token a scope. "
        "--per-gpu runs one worker per GPU, --ray the same API on a Ray cluster. Settings "
        "can also come from ADAMSCOPE_* environment variables (ADAMSCOPE_PORT, "
        "ADAMSCOPE_DATA_DIR, ...); a flag wins over its variable.",
    )
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--data-dir", type=Path, help="data directory (default ./adamscope-data)")
    serve.add_argument(
        "--device", help="default device for new steppers (default: cuda if available, else cpu)"
    )
    serve.add_argument("--max-body-bytes", type=int, help="largest request body accepted")
    serve.add_argument("--log-level", help="uvicorn log level (default info)")
    serve.add_argument(
        "--tokens-file",
        type=Path,
        help="JSON or TOML file of bearer tokens with scopes (also "
        "ADAMSCOPE_TOKENS_FILE; ADAMSCOPE_TOKENS takes them as JSON)",
    )
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-loopback --host without tokens: every client is "
        "an admin (without tokens the service otherwise refuses that)",
    )
    serve.add_argument(
        "--max-tensor-elements", type=int, help="largest parameter a stepper may hold, in elements"
    )
    serve.add_argument("--max-steppers", type=int, help="most steppers at once")
    serve.add_argument(
        "--memory-budget-bytes",
        type=int,
        help="bytes all steppers may hold: each one's footprint (parameters, "
        "Adam state, gradient buffer, step workspace, pinned host buffers); "
        "default: none, but every new stepper must also fit the memory its "
        "device has available, keeping 10%% free",
    )
    serve.add_argument(
        "--per-gpu",
        action="store_true",
        help="one worker per visible GPU on ports PORT, PORT+1, ...",
    )
    ray = serve.add_argument_group(
        "distributed mode",
        "the same API on a Ray cluster: Ray Serve runs the ingress, Ray "
        "actors hold the steppers (see docs/guides/distributed.md)",
    )
    ray.add_argument("--ray", action="store_true", help="serve on Ray")
    ray.add_argument(
        "--ray-address",
        help="an existing Ray cluster (e.g. ray://head:10001 or auto); default: start a local one",
    )
    ray.add_argument(
        "--slots",
        type=int,
        default=0,
        help="slot actors to run (default: one per GPU in the cluster, or 2)",
    )
    ray.add_argument(
        "--slot-gpus",
        type=float,
        default=0.0,
        help="GPUs per slot actor (default: with GPUs in the cluster, 1 when "
        "there are as many GPUs as slots, else the GPUs shared evenly, e.g. "
        "0.5 for --slots 2 on one GPU); slots Ray could never place are "
        "refused at start",
    )
    ray.add_argument("--slot-cpus", type=float, default=0.0, help="CPUs per slot actor")
    ray.add_argument(
        "--slot-bind",
        help="address each slot's service listens on (default "
        "127.0.0.1 for a local Ray; 'auto': its node's address)",
    )
    add_serve_option(serve)
    add_history_options(serve)
    serve.set_defaults(func=_serve)
