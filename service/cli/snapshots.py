"""``adamscope`` commands for checkpoints and snapshots, run against a service with the client.

    adamscope snapshot NAME [--as SNAP]        take a snapshot now
    adamscope snapshots NAME                   list them
    adamscope restore NAME SNAP                roll the stepper back to one
    adamscope export NAME SNAP FILE            download one as a file
    adamscope import FILE [--name NEW]         create a stepper from such a file
    adamscope rm-snapshot NAME SNAP            delete one
    adamscope checkpoint NAME                  write the stepper to the service's disk now
    adamscope durability NAME MODE[:N|:SECONDS] change when it is written

Each takes ``--url`` (default ``$ADAMSCOPE_URL``, else ``http://127.0.0.1:8470``); a token
comes from ``$ADAMSCOPE_TOKEN``. Errors print the service's problem and exit with status 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adamscope.client.protocol import Durability

from .inspect import client_command, when

__all__ = ["add_commands", "parse_durability"]


def parse_durability(text: str) -> Durability:
    """``every_step``, ``every_n:100``, ``interval:30`` or ``manual`` -> a policy."""
    mode, _, arg = text.partition(":")
    body: dict[str, Any] = {"mode": mode}
    if arg:
        try:
            if mode == "every_n":
                body["n"] = int(arg)
            else:
                body["seconds"] = float(arg)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number in {text!r}") from None
    try:
        return Durability.model_validate(body)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use every_step, every_n:N, interval:SECONDS or manual ({e})"
        ) from None


def _durability_arg(text: str) -> str:
    parse_durability(text)  # validate; keep the text (it is handed on to --per-gpu workers)
    return text


def _size(n: int) -> str:
    from adamscope.client.progress import human_bytes

    return human_bytes(n)


def _snapshot(c: Any, a: argparse.Namespace) -> str:
    s = c.snapshot(a.name, a.snap)
    return f"snapshot {s.name} of {s.stepper} at step {s.step} ({_size(s.size)})"


def _snapshots(c: Any, a: argparse.Namespace) -> str:
    rows = [("NAME", "STEP", "SIZE", "CREATED")]
    for s in c.snapshots(a.name):
        rows.append(
            (
                s.name,
                "?" if s.step is None else str(s.step),
                _size(s.size),
                when(s.created_at) if s.error is None else f"unreadable: {s.error}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows)


def _restore(c: Any, a: argparse.Namespace) -> str:
    s = c.restore(a.name, a.snap)
    return f"restored {s.name} to snapshot {a.snap}: step {s.step}"


def _export(c: Any, a: argparse.Namespace) -> str:
    path = c.download_snapshot(a.name, a.snap, a.file, progress=False if a.quiet else None)
    return f"wrote {path} ({_size(path.stat().st_size)})"


def _import(c: Any, a: argparse.Namespace) -> str:
    s = c.import_snapshot(a.file, a.new_name, device=a.device, progress=False if a.quiet else None)
    return f"imported stepper {s.name} at step {s.step} on {s.device}"


def _rm_snapshot(c: Any, a: argparse.Namespace) -> str:
    c.delete_snapshot(a.name, a.snap)
    return f"deleted snapshot {a.snap} of {a.name}"


def _checkpoint(c: Any, a: argparse.Namespace) -> str:
    info = c.checkpoint(a.name)
    return f"wrote {info.stepper} at step {info.step} ({_size(info.size)})"


def _durability(c: Any, a: argparse.Namespace) -> str:
    policy = parse_durability(a.policy).model_dump(exclude_none=True)
    s = c.set_durability(a.name, policy)
    return f"{s.name}: durability {a.policy}, on disk at step {s.persisted_step}"


def add_commands(sub: Any) -> None:
    """Add the snapshot commands to the ``adamscope`` sub-command parser."""

    def command(
        name: str, help: str, action: Callable[[Any, argparse.Namespace], str | None]
    ) -> argparse.ArgumentParser:
        return client_command(sub, name, help, action)

    p = command("snapshot", "take a named snapshot of a stepper now", _snapshot)
    p.add_argument("name", help="stepper")
    p.add_argument("--as", dest="snap", help="snapshot name (default: step<N>-<UTC time>)")
    p = command("snapshots", "list a stepper's snapshots", _snapshots)
    p.add_argument("name", help="stepper")
    p = command("restore", "roll a stepper back to one of its snapshots", _restore)
    p.add_argument("name", help="stepper")
    p.add_argument("snap", help="snapshot")
    p = command("export", "download a snapshot as a safetensors file", _export)
    p.add_argument("name", help="stepper")
    p.add_argument("snap", help="snapshot")
    p.add_argument("file", type=Path, help="where to write it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = command("import", "create a stepper from a snapshot or checkpoint file", _import)
    p.add_argument("file", type=Path, help="the file")
    p.add_argument("--name", dest="new_name", help="the new stepper's name (default: the file's)")
    p.add_argument(
        "--device", help="device (default: the file's if available, else the service's default)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = command("rm-snapshot", "delete a snapshot", _rm_snapshot)
    p.add_argument("name", help="stepper")
    p.add_argument("snap", help="snapshot")
    p = command("checkpoint", "write a stepper to the service's data directory now", _checkpoint)
    p.add_argument("name", help="stepper")
    p = command("durability", "change when a stepper is written to disk", _durability)
    p.add_argument("name", help="stepper")
    p.add_argument(
        "policy", type=_durability_arg, help="every_step | every_n:N | interval:SECONDS | manual"
    )


def add_serve_option(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--durability",
        type=_durability_arg,
        help="default durability of new steppers: every_step (default), "
        "every_n:N, interval:SECONDS or manual (also ADAMSCOPE_DURABILITY)",
    )
