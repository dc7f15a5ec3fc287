"""The ``adamscope`` command line.

``adamscope serve`` runs the service (:mod:`.serve`); the other commands talk to a running
one through the Python client: snapshots and durability (:mod:`.snapshots`), listing,
statistics, history, alerts and a live watch (:mod:`.inspect`); optimizer checkpoints of
training jobs in and out (:mod:`.checkpoints`). What a command says when the service cannot
be reached, or its reader goes away, is in :mod:`.failures`.

Help texts are plain text (argparse prints them as they are): no reStructuredText or
Markdown markup in them, unlike the docstrings.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

from . import checkpoints, inspect, serve, snapshots
from .failures import end_on_broken_pipe

__all__ = ["build_parser", "main", "version"]

DESCRIPTION = (
    "Host, step, inspect and steer Adam optimizer state over REST. 'adamscope serve' runs "
    "the service; every other command talks to a running one (--url, default "
    "$ADAMSCOPE_URL, else http://127.0.0.1:8470; --token, default $ADAMSCOPE_TOKEN)."
)
EPILOG = "'adamscope COMMAND --help' describes a command."


def version() -> str:
    """The installed distribution's version (the source tree's when not installed)."""
    try:
        return importlib.metadata.version("adamscope")
    except importlib.metadata.PackageNotFoundError:
        from adamscope import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adamscope", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"adamscope {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_command(sub)
    snapshots.add_commands(sub)
    inspect.add_commands(sub)
    checkpoints.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status (141 when stdout's reader went away early)."""
    args = build_parser().parse_args(argv)
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe can still be handled
    except BrokenPipeError:
        return end_on_broken_pipe()
    return status
