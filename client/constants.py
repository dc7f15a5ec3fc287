"""The wire contract's plain names: the API prefix, name patterns, metadata keys and Adam's
option names. Defined once, here, without pydantic: the service's engine (torch only)
imports them, and so do the wire models (:mod:`.protocol`) and the clients.
"""

from __future__ import annotations

__all__ = [
    "API_PREFIX",
    "INT64_MAX",
    "META_CHECKPOINT",
    "META_DRY_RUN",
    "META_GROUPS",
    "META_REPLAYED",
    "META_SKIPPED",
    "META_SPEC",
    "META_STEP",
    "META_STEPPED",
    "META_STEPPER",
    "OCTET",
    "OPTION_NAMES",
    "SNAPSHOT_NAME_PATTERN",
    "STEPPER_NAME_PATTERN",
]

API_PREFIX = "/v1"
#: The media type of tensor bodies (safetensors).
OCTET = "application/octet-stream"

#: Stepper names: URL- and filesystem-safe, never a path.
STEPPER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
#: Snapshot names follow the stepper-name rules: URL- and filesystem-safe, never a path.
SNAPSHOT_NAME_PATTERN = STEPPER_NAME_PATTERN
#: Largest integer a step, count or dimension may be (PyTorch's and numpy's int64).
INT64_MAX = 2**63 - 1

#: Every keyword ``torch.optim.Adam`` / ``AdamW`` accepts besides ``params``, in the order
#: a param group lists them: a stepper's options, a summary's groups, a checkpoint's
#: groups and ``RemoteAdam``'s ``param_groups`` all carry exactly these.
OPTION_NAMES = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
)

#: safetensors ``__metadata__`` keys (values are JSON strings).
META_SPEC = "adamscope.spec"  # CreateStepper (without tensor data) on a create body
META_GROUPS = "adamscope.param_groups"  # list of per-group hyperparameter dicts
META_STEP = "adamscope.step"  # the stepper step a tensor body reflects
META_STEPPER = "adamscope.stepper"
META_CHECKPOINT = "adamscope.checkpoint"  # checkpoint/snapshot files: the header as JSON
#: A step's parameter reply: the names that stepped and did not (JSON lists), and whether
#: the step was a replay of one applied before (JSON boolean).
META_STEPPED = "adamscope.stepped"
META_SKIPPED = "adamscope.skipped"
META_REPLAYED = "adamscope.replayed"
META_DRY_RUN = "adamscope.dry_run"  # a dry run's tensor reply: its JSON report
