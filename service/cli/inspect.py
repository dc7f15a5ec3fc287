"""``adamscope`` commands that show what steppers and their optimizers are doing.

    adamscope ls                                  the steppers, one line each
    adamscope show NAME                           a stepper's summary: groups, parameters
    adamscope stats NAME                          statistics of parameters and state per tensor
    adamscope stats NAME --signals [--all]        the latest step's signals per tensor
    adamscope watch NAME [--once]                 a live view driven by the event stream
    adamscope history NAME [--csv] [--signal S] [--tensor T] [--since N] [--limit N]
    adamscope alerts NAME [--set RULES]           alert rules and the latest events

Each takes ``--url`` (default ``$ADAMSCOPE_URL``, else ``http://127.0.0.1:8470``) and
``--token`` (default ``$ADAMSCOPE_TOKEN``). Errors print the service's problem and exit 1;
so does a service that cannot be reached, in one line saying why (:mod:`.failures`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["add_commands", "render_watch"]

#: Signals shown per tensor by ``stats`` and ``watch`` (the rest with ``--all``).
KEY_SIGNALS = (
    "grad_norm",
    "update_ratio",
    "lr_eff_p50",
    "lr_eff_p99",
    "shock_p99",
    "gamma_frac",
    "amsgrad_clamp",
    "eps_dominance",
    "nan_count",
    "inf_count",
)

CLEAR = "\x1b[H\x1b[2J"
BOLD, RED, RESET = "\x1b[1m", "\x1b[31m", "\x1b[0m"


def when(t: float | None) -> str:
    """A time as local ISO date and time to the second ('-' for none)."""
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int) or (math.isfinite(v) and v == int(v) and abs(v) < 1e9):
        return str(int(v))
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return f"{v:.4g}"


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell (the last one not padded)."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)).rstrip()
        for r in rows
    )


class CommandError(Exception):
    """A command that could not do what was asked (exit status 1)."""


def _run(action: Callable[[Any, argparse.Namespace], str | None]) -> Callable[..., int]:
    def run(args: argparse.Namespace) -> int:
        from adamscope.client import Client
        from adamscope.client._base import resolve_url
        from adamscope.client.errors import AdamscopeError, TransportError

        from .failures import unreachable

        try:
            with Client(args.url, token=args.token) as client:
                out = action(client, args)
        except TransportError as e:
            print(unreachable(e, resolve_url(args.url)), file=sys.stderr, flush=True)
            return 1
        except (AdamscopeError, CommandError) as e:
            print(f"adamscope: error: {e}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            return 130
        if out:
            print(out, flush=True)
        return 0

    return run


# ---------------------------------------------------------------------- ls, show


def _alerts_cell(summary: Any) -> str:
    a = summary.alerts
    if a is None:
        return "-"
    return f"{a.count}" + (f" ({a.active} active)" if a.active else "")


def _ls(c: Any, a: argparse.Namespace) -> str:
    rows = [("NAME", "OPTIMIZER", "DEVICE", "STEP", "PARAMS", "ALERTS", "UPDATED")]
    for s in c.list():
        step = f"{s.step} (frozen)" if s.kind == "frozen" else str(s.step)
        rows.append(
            (
                s.name,
                s.optimizer,
                s.device,
                step,
                f"{s.numel:,}",
                _alerts_cell(s),
                when(s.updated_at),
            )
        )
    if len(rows) == 1:
        return "no steppers"
    return table(rows)


def _show(c: Any, a: argparse.Namespace) -> str:
    from adamscope.client.progress import human_bytes

    s = c.get(a.name)
    lines = [
        f"{BOLD if a.color else ''}{s.name}{RESET if a.color else ''}: {s.optimizer} on "
        f"{s.device}, step {s.step}, {s.numel:,} parameters, "
        f"{human_bytes(s.state_bytes)} with state",
        f"created {when(s.created_at)}, updated {when(s.updated_at)}",
    ]
    if s.kind == "frozen":
        lines.append("frozen: steps are refused (adamscope unfreeze NAME makes it steppable)")
    if s.durability is not None:
        lines.append(
            f"durability {s.durability.mode}, on disk at step "
            f"{_num(s.persisted_step)}{' (changes not written)' if s.dirty else ''}"
        )
    if s.alerts is not None:
        latest = s.alerts.latest
        lines.append(
            f"alerts {s.alerts.count} ({s.alerts.active} active)"
            + (
                f", latest at step {latest.step}: {latest.rule} on {latest.tensor or 'aggregate'}"
                if latest
                else ""
            )
        )
    lines.append("")
    rows = [("GROUP", "LR", "BETAS", "EPS", "WEIGHT_DECAY", "AMSGRAD", "PARAMS")]
    for g in s.groups:
        rows.append(
            (
                str(g.index),
                _num(g.lr),
                f"({_num(g.betas[0])}, {_num(g.betas[1])})",
                _num(g.eps),
                _num(g.weight_decay),
                str(g.amsgrad),
                str(len(g.params)),
            )
        )
    lines += [table(rows), ""]
    params = [("PARAM", "SHAPE", "DTYPE", "GROUP", "STEP", "STATE")]
    for p in s.params:
        params.append(
            (
                p.name,
                "x".join(map(str, p.shape)) or "scalar",
                p.dtype,
                str(p.group),
                _num(p.step),
                ",".join(p.state) or "-",
            )
        )
    lines.append(table(params))
    return "\n".join(lines)


# ---------------------------------------------------------------------- stats, history


def _stats(c: Any, a: argparse.Namespace) -> str:
    """Statistics of the parameters and Adam state (``GET .../stats``), per tensor and
    aggregated; with ``--signals`` (or ``--all``, which only means something for signals)
    the latest step's signals instead."""
    if a.signals or a.all:
        return _signals(c, a)
    report = c.stats(a.name, a.tensor, a.key)
    columns = ("norm", "mean", "std", "min", "max")
    quantiles: list[str] = []
    for per_key in [*report.get("tensors", {}).values(), report.get("aggregate", {})]:
        for st in per_key.values():
            quantiles = sorted(st.get("quantiles") or {}, key=float)
            break
        if quantiles:
            break
    rows = [
        (
            "TENSOR",
            "KEY",
            *[x.upper() for x in columns],
            *[f"P{float(q) * 100:g}" for q in quantiles],
            "NAN",
            "INF",
            "ZEROS",
        )
    ]

    def add(tensor: str, key: str, st: dict[str, Any]) -> None:
        qs = st.get("quantiles") or {}
        rows.append(
            (
                tensor,
                key + ("*" if st.get("sampled") else ""),
                *[_num(st.get(x)) for x in columns],
                *[_num(qs.get(q)) for q in quantiles],
                _num(st.get("nan")),
                _num(st.get("inf")),
                _num(st.get("zeros")),
            )
        )

    for tensor, per_key in report.get("tensors", {}).items():
        for key, st in per_key.items():
            add(tensor, key, st)
    for key, st in report.get("aggregate", {}).items():
        add("(aggregate)", key, st)
    head = f"{a.name} at step {report.get('step')}"
    sampled = any(r[1].endswith("*") for r in rows[1:])
    return head + "\n" + table(rows) + ("\n* quantiles from a sample" if sampled else "")


def _signals(c: Any, a: argparse.Namespace) -> str:
    """The latest step's signals: the aggregate and each tensor's."""
    report = c.history(a.name, tensor="*", limit=1)
    if not report.aggregate.steps:
        return f"{a.name}: no step recorded yet"
    step = report.aggregate.steps[-1]
    signals = report.signals if a.all else [s for s in KEY_SIGNALS if s in report.signals]
    rows = [("TENSOR", *[s.upper() for s in signals])]
    rows.append(("(aggregate)", *[_num(report.aggregate.values[s][-1]) for s in signals]))
    for name, series in report.tensors.items():
        if (a.tensor is None or name in a.tensor) and series.steps and series.steps[-1] == step:
            rows.append((name, *[_num(series.values[s][-1]) for s in signals]))
    head = f"{a.name} at step {step} ({when(report.aggregate.time[-1])})"
    if report.loss.steps:
        head += f", loss {_num(report.loss.values[-1])} at step {report.loss.steps[-1]}"
    return head + "\n" + table(rows)


def _history(c: Any, a: argparse.Namespace) -> str:
    if a.csv:
        return str(
            c.history(a.name, a.signal, a.tensor, since=a.since, limit=a.limit, fmt="csv")
        ).rstrip("\n")
    report = c.history(a.name, a.signal, a.tensor, since=a.since, limit=a.limit)
    if a.json:
        return str(report.model_dump_json(indent=2))
    signals = (
        report.signals if a.signal or a.all else [s for s in KEY_SIGNALS if s in report.signals]
    )
    loss = dict(zip(report.loss.steps, report.loss.values, strict=True))
    blocks = [("(aggregate)", report.aggregate)] + list(report.tensors.items())
    out = []
    for title, series in blocks:
        rows = [("STEP", "LOSS", *[s.upper() for s in signals])]
        for k, step in enumerate(series.steps):
            rows.append(
                (str(step), _num(loss.get(step)), *[_num(series.values[s][k]) for s in signals])
            )
        out.append(f"{title}\n{table(rows)}")
    return "\n\n".join(out)


# ---------------------------------------------------------------------- alerts


def _rules_arg(text: str) -> Any:
    """A JSON list of rules, ``@file`` with one, or ``defaults``."""
    if text == "defaults":
        return None
    try:
        raw = Path(text[1:]).read_text() if text.startswith("@") else text
        rules = json.loads(raw)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"rules must be a JSON list (or @file): {e}") from None
    if not isinstance(rules, list):
        raise argparse.ArgumentTypeError("rules must be a JSON list of rule objects")
    return rules


def _event_line(e: Any) -> str:
    prev = f" (was {_num(e.previous)})" if e.previous is not None else ""
    return (
        f"step {e.step}  {e.tensor or '(aggregate)'}  {e.rule}: "
        f"{_num(e.value)}{prev}  {when(e.time)}"
    )


def _alerts(c: Any, a: argparse.Namespace) -> str:
    report = c.set_alerts(a.name, a.set) if a.set is not False else c.alerts(a.name, a.limit)
    lines = [
        f"{report.stepper}: {len(report.rules)} rule(s)"
        + (" (the defaults)" if report.defaults else "")
    ]
    lines += [
        f"  {r.label()}  [tensor {r.tensor if r.tensor is not None else '(aggregate)'}"
        + (f", after step {r.after_step}" if r.after_step else "")
        + "]"
        for r in report.rules
    ]
    lines.append(f"{report.count} alert(s) raised, {len(report.active)} active")
    lines += [
        f"  active: {x.rule} on {x.tensor or '(aggregate)'} since step {x.since_step}"
        for x in report.active
    ]
    lines += [f"  {_event_line(e)}" for e in report.events]
    return "\n".join(lines)


# ---------------------------------------------------------------------- watch


def render_watch(
    event: dict[str, Any],
    alerts: Sequence[dict[str, Any]],
    loss: float | None,
    signals: Sequence[str] = KEY_SIGNALS,
    color: bool = False,
    max_rows: int = 30,
) -> str:
    """One frame of ``watch``: a step event's signals, the recent alerts, the loss."""
    red = RED if color else ""
    bold = BOLD if color else ""
    reset = RESET if color else ""
    head = f"{bold}{event['stepper']}{reset}  step {event['step']}  {when(event.get('time'))}" + (
        f"  loss {_num(loss)}" if loss is not None else ""
    )
    agg = event.get("aggregate", {})
    shown = [s for s in signals if s in agg or any(s in v for v in event["tensors"].values())]
    rows = [("TENSOR", *[s.upper() for s in shown])]
    rows.append(("(aggregate)", *[_num(agg.get(s)) for s in shown]))
    tensors = list(event.get("tensors", {}).items())
    for name, values in tensors[:max_rows]:
        rows.append((name, *[_num(values.get(s)) for s in shown]))
    lines = [head, table(rows)]
    hidden = len(tensors) - min(len(tensors), max_rows) + int(event.get("tensors_omitted", 0))
    if hidden:
        lines.append(f"... {hidden} more tensor(s)")
    if alerts:
        lines.append("")
        lines.append(f"{red}recent alerts{reset}")
        for e in alerts[-5:]:
            prev = f" (was {_num(e.get('previous'))})" if e.get("previous") is not None else ""
            lines.append(
                f"  step {e['step']}  {e.get('tensor') or '(aggregate)'}  "
                f"{e['rule']}: {_num(e.get('value'))}{prev}"
            )
    return "\n".join(lines)


def _watch(c: Any, a: argparse.Namespace, out: TextIO | None = None) -> str | None:
    out = out or sys.stdout
    clear = not a.once and out.isatty()
    deadline = None if a.timeout is None else time.monotonic() + a.timeout
    recent: list[dict[str, Any]] = []
    loss: float | None = None
    pending: dict[str, Any] | None = None
    last_frame = -math.inf
    stream = c.events(a.name, replay=1, heartbeat=a.interval, heartbeats=True, duration=a.timeout)
    try:
        for item in stream:
            kind, data = item["event"], item["data"]
            if kind == "step":
                pending = data
                recent = (recent + list(data.get("alerts", [])))[-20:]
                if data.get("loss") is not None:
                    loss = data["loss"]
            elif kind == "loss":
                loss = data["loss"]
            elif kind == "dropped":
                pass  # the next step event is what matters for the view
            now = time.monotonic()
            if pending is not None and now - last_frame >= a.interval:
                frame = render_watch(pending, recent, loss, color=clear)
                out.write((CLEAR if clear else "") + frame + "\n")
                out.flush()
                last_frame, pending = now, None
                if a.once:
                    return None
            if deadline is not None and now > deadline:
                break
    finally:
        stream.close()
    if a.once:
        raise CommandError(f"no step of {a.name} within {a.timeout}s")
    return None


# ---------------------------------------------------------------------- wiring


def client_command(
    sub: Any,
    name: str,
    help: str,
    action: Callable[[Any, argparse.Namespace], str | None],
    description: str | None = None,
) -> argparse.ArgumentParser:
    """A sub-command that runs ``action(client, args)`` against the service (``--url``,
    ``--token``) and prints what it returns; the inspection and snapshot commands.
    ``help`` is its line in ``adamscope --help``, ``description`` (default: the same) the
    text its own help starts with."""
    from adamscope.client._base import DEFAULT_URL

    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description or help)
    p.add_argument(
        "--url", default=None, help=f"service URL (default $ADAMSCOPE_URL, else {DEFAULT_URL})"
    )
    p.add_argument("--token", default=None, help="bearer token (default $ADAMSCOPE_TOKEN)")
    p.set_defaults(func=_run(action), color=sys.stdout.isatty())
    return p


def add_commands(sub: Any) -> None:
    """Add the inspection commands to the ``adamscope`` sub-command parser."""

    def command(
        name: str,
        help: str,
        action: Callable[[Any, argparse.Namespace], str | None],
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        return client_command(sub, name, help, action, description)

    command("ls", "list the steppers", _ls)
    p = command("show", "a stepper's summary: options, parameters, durability, alerts", _show)
    p.add_argument("name", help="stepper")
    p = command(
        "stats",
        "statistics of parameters and Adam state per tensor (--signals: the latest signals)",
        _stats,
        "Statistics of the parameters and Adam state (norm, mean, std, min, max, quantiles, "
        "NaN/Inf/zero counts) per tensor and aggregated, as the service computes them now. "
        "With --signals (or --all), the latest step's signals instead: gradient norm, "
        "update ratio, effective LR, shock, ... (the key ones; --all: every one).",
    )
    p.add_argument("name", help="stepper")
    p.add_argument("--tensor", action="append", help="only this tensor (repeatable)")
    p.add_argument(
        "--key",
        action="append",
        help="what to describe: param, exp_avg, exp_avg_sq, max_exp_avg_sq, m_hat, "
        "v_hat, lr_eff, update (repeatable; default the service's)",
    )
    p.add_argument(
        "--signals",
        action="store_true",
        help="the latest step's signals instead: the key ones (effective LR, shock, ...)",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="the latest step's signals, every one (implies --signals)",
    )
    p = command("watch", "a live view of a stepper's steps, signals and alerts", _watch)
    p.add_argument("name", help="stepper")
    p.add_argument(
        "--interval", type=float, default=0.5, help="seconds between redraws at most (default 0.5)"
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="print one frame (the latest step, or the next one) and exit",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="stop after this many seconds (with --once: fail if no step came)",
    )
    p = command("history", "a stepper's signal history (a table, CSV or JSON)", _history)
    p.add_argument("name", help="stepper")
    p.add_argument("--signal", action="append", help="a signal (repeatable; default: key ones)")
    p.add_argument(
        "--tensor", action="append", help="a tensor's own series too (repeatable; '*' for all)"
    )
    p.add_argument("--since", type=int, help="only steps after this one")
    p.add_argument("--limit", type=int, help="only the last N steps")
    p.add_argument("--all", action="store_true", help="every signal")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV as the service writes it")
    fmt.add_argument("--json", action="store_true", help="the JSON report")
    p = command("alerts", "a stepper's alert rules and latest alert events", _alerts)
    p.add_argument("name", help="stepper")
    p.add_argument(
        "--set",
        type=_rules_arg,
        default=False,
        metavar="RULES",
        help="replace the rules: a JSON list, @file, or 'defaults'",
    )
    p.add_argument("--limit", type=int, default=20, help="latest events to list (default 20)")
