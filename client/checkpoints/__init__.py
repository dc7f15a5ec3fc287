"""Read and write the optimizer checkpoints training stacks already produce.

Every format goes through one neutral, name-keyed form, :class:`OptimizerCheckpoint`:

    >>> ckpt = read_checkpoint("runs/step-1000")            # DCP, HF Trainer dir or .pt
    >>> ckpt.params["model.layers.0.mlp.up_proj.weight"].state["exp_avg_sq"]
    >>> write_dcp(ckpt, "edited-dcp")                       # or write_torch(ckpt, "edited")

Nothing here unpickles beyond ``torch.load(weights_only=True)`` and a DCP-metadata
allowlist, and nothing opens the network.
"""

from .checkpoint import (
    STATE_KEYS,
    OptimizerCheckpoint,
    OptimizerKind,
    ParamGroup,
    ParamState,
    Provenance,
    infer_kind,
)
from .dcp_format import read_dcp, write_dcp
from .errors import (
    CheckpointError,
    CheckpointFormatError,
    NameMappingError,
    OptimizerKindError,
    UnsafeCheckpointError,
)
from .hf_format import read_hf
from .reading import detect_format, read_checkpoint
from .state_dicts import from_optimizer, from_state_dict, to_state_dict
from .torch_format import read_torch, write_torch

__all__ = [
    "STATE_KEYS",
    "CheckpointError",
    "CheckpointFormatError",
    "NameMappingError",
    "OptimizerCheckpoint",
    "OptimizerKind",
    "OptimizerKindError",
    "ParamGroup",
    "ParamState",
    "Provenance",
    "UnsafeCheckpointError",
    "detect_format",
    "from_optimizer",
    "from_state_dict",
    "infer_kind",
    "read_checkpoint",
    "read_dcp",
    "read_hf",
    "read_torch",
    "to_state_dict",
    "write_dcp",
    "write_torch",
]
