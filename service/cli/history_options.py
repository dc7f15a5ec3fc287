"""``adamscope serve``'s history options: the raw window, the downsampled tiers, and
whether the history is kept in the data directory (each one also an ``ADAMSCOPE_*``
variable, see :class:`~adamscope.service.settings.Settings`)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_history_options", "history_overrides", "history_worker_flags"]

#: Settings these options set, as argparse names them (handed on to --per-gpu workers).
_VALUED = ("history_steps", "history_tier_widths", "history_tier_buckets")


def _widths(text: str) -> str:
    """``10,100,1000``: validated, kept as text (it is handed on to workers as is)."""
    try:
        w = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None
    if not w or w[0] < 2 or any(b <= a or b % a for a, b in zip(w, w[1:], strict=False)):
        raise argparse.ArgumentTypeError(
            f"{text!r}: widths must be >= 2, increasing, each a multiple of the one before"
        )
    return text


def add_history_options(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "history",
        "each stepper's signal history: the latest steps raw, older ones downsampled into "
        "tiers of min/max/mean buckets back to step 1, in history.sqlite beside its checkpoint",
    )
    group.add_argument(
        "--history-steps", type=int, help="steps kept raw per stepper (default 10000)"
    )
    group.add_argument(
        "--history-tier-widths",
        type=_widths,
        help="steps per bucket of each tier (default 10,100,1000,10000)",
    )
    group.add_argument("--history-tier-buckets", type=int, help="buckets per tier (default 1000)")
    group.add_argument(
        "--history-in-memory",
        action="store_true",
        help="keep the history in memory only (lost when the service stops)",
    )


def history_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the options name (those given)."""
    out: dict[str, Any] = {k: getattr(args, k) for k in _VALUED if getattr(args, k) is not None}
    if "history_tier_widths" in out:
        out["history_tier_widths"] = [int(x) for x in out["history_tier_widths"].split(",")]
    if args.history_in_memory:
        out["history_durable"] = False
    return out


def history_worker_flags(args: argparse.Namespace) -> list[str]:
    """The options again, for a ``--per-gpu`` worker's command line."""
    out = []
    for k in _VALUED:
        if getattr(args, k) is not None:
            out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.history_in_memory:
        out.append("--history-in-memory")
    return out
