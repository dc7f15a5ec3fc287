"""The ``adamscope`` command line.

``adamscope serve`` runs the service (:mod:`.serve`); the other commands talk to a running
one through the Python client: snapshots and durability (:mod:`.snapshots`), listing,
statistics, history, alerts and a live watch (:mod:`.inspect`); optimizer checkpoints of
training jobs in and out (:mod:`.checkpoints`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import checkpoints, inspect, serve, snapshots

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adamscope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve.add_command(sub)
    snapshots.add_commands(sub)
    inspect.add_commands(sub)
    checkpoints.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
