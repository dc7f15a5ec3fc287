"""``adamscope`` commands for the optimizer checkpoints training jobs write (issue 16).

    adamscope import-checkpoint PATH --name NAME [--format auto|dcp|torch|hf]
                                [--step-into hosted|frozen] [--weights FILE] [--names ...]
                                [--kind adam|adamw]
    adamscope export-checkpoint NAME PATH --format dcp|torch
    adamscope freeze NAME | adamscope unfreeze NAME

The checkpoint is read here, by the client, from a path on this machine (``torch.load`` with
``weights_only=True`` only; DCP metadata through an allowlist), and sent to the service
through its ordinary endpoints: the service never opens a path it is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .inspect import client_command

__all__ = ["add_commands"]

IMPORT_NOTE = (
    "The checkpoint is read here, by this client, from a local path: torch.load with "
    "weights_only=True only (a file that would run code is refused and nothing in it "
    "runs), DCP metadata through an allowlist; training_args.bin and RNG files are never "
    "opened. It reaches the service through its ordinary endpoints; the service never "
    "opens a path. Hugging Face Trainer directories need adamscope[hf]."
)


def _import(c: Any, a: argparse.Namespace) -> str:
    from adamscope.client.checkpoints import read_checkpoint

    ckpt = read_checkpoint(a.path, a.format, weights=a.weights, names=a.names, kind=a.kind)
    lines = [
        f"read {ckpt.provenance.format} checkpoint {a.path}: {ckpt.kind}, "
        f"{len(ckpt.params)} parameters in {len(ckpt.groups)} group(s), "
        f"step {ckpt.global_step if ckpt.global_step is not None else 'unknown (0)'}"
    ]
    lines += [f"  inferred: {line}" for line in ckpt.provenance.inferred]
    s = c.import_checkpoint(
        ckpt, a.name, step_into=a.step_into, device=a.device, progress=False if a.quiet else None
    )
    lines.append(f"imported as {s.kind} stepper {s.name} at step {s.step} on {s.device}")
    return "\n".join(lines)


def _export(c: Any, a: argparse.Namespace) -> str:
    ckpt = c.export_checkpoint(a.name, a.path, format=a.format, progress=False if a.quiet else None)
    what = (
        "optimizer.pt + model.safetensors"
        if a.format == "torch"
        else "a DCP directory ({'model': ..., 'optim': ...})"
    )
    return f"wrote {a.name} at step {ckpt.global_step} to {a.path}: {what}"


def _freeze(c: Any, a: argparse.Namespace) -> str:
    s = c.set_kind(a.name, "frozen")
    return f"{s.name} is frozen: steps are refused, reads and edits work"


def _unfreeze(c: Any, a: argparse.Namespace) -> str:
    s = c.set_kind(a.name, "hosted")
    return f"{s.name} is hosted: it can be stepped again (at step {s.step})"


def _add_import(sub: Any) -> None:
    p = client_command(
        sub,
        "import-checkpoint",
        "create a stepper from an optimizer "
        "checkpoint a training job wrote (DCP, torch state_dict, HF Trainer)",
        _import,
    )
    p.epilog = IMPORT_NOTE
    p.add_argument(
        "path",
        type=Path,
        help="a DCP directory, a Hugging Face Trainer "
        "checkpoint-N/ or Accelerate save_state directory, or a torch.save'd "
        "optimizer state_dict (.pt/.pth/.bin)",
    )
    p.add_argument("--name", required=True, help="the new stepper's name")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "dcp", "torch", "hf"],
        help="the checkpoint's format (default: detected from the path)",
    )
    p.add_argument(
        "--step-into",
        dest="step_into",
        default="hosted",
        choices=["hosted", "frozen"],
        help="hosted (default): the stepper can be stepped, e.g. by RemoteAdam "
        "replaying the steps that led to a crash; frozen: steps are refused "
        "(reads, stats, snapshots, diff and state edits work; 'adamscope "
        "unfreeze NAME' lifts it)",
    )
    p.add_argument(
        "--weights",
        type=Path,
        help="torch format: the model's weights "
        "(a torch.save'd state_dict or a .safetensors file), for the values and, "
        "when the optimizer saved no param_names, the parameter names",
    )
    p.add_argument(
        "--names",
        nargs="+",
        metavar="NAME",
        help="torch format: the parameter "
        "names in the order the optimizer got them (when it saved no param_names)",
    )
    p.add_argument(
        "--kind",
        choices=["adam", "adamw"],
        help="Adam or AdamW, where the "
        "checkpoint cannot say (no decoupled_weight_decay saved, weight_decay > 0)",
    )
    p.add_argument("--device", help="device of the stepper (default: the service's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_commands(sub: Any) -> None:
    """Add the checkpoint commands to the ``adamscope`` sub-command parser."""
    _add_import(sub)
    p = client_command(
        sub,
        "export-checkpoint",
        "write a stepper as a checkpoint a "
        "training job loads (DCP directory, or torch state_dict + safetensors)",
        _export,
    )
    p.add_argument("name", help="stepper")
    p.add_argument("path", type=Path, help="directory to write")
    p.add_argument(
        "--format",
        required=True,
        choices=["dcp", "torch"],
        help="dcp: torch.distributed.checkpoint, get_state_dict's layout "
        "({'model': ..., 'optim': ...}); torch: optimizer.pt (load_state_dict "
        "format, with param_names) + model.safetensors",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = client_command(sub, "freeze", "make a stepper refuse steps (edits still work)", _freeze)
    p.add_argument("name", help="stepper")
    p = client_command(sub, "unfreeze", "make a frozen stepper steppable again", _unfreeze)
    p.add_argument("name", help="stepper")
