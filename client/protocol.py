"""The wire contract: pydantic models shared by the service and the client.

The service imports these models to parse requests and build responses, and the client
imports them to build requests and parse responses, so the two cannot drift apart.
Bulk tensors never appear here: they travel as safetensors bodies (see ``client.codec``);
the JSON models carry specifications, summaries and small tensors only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "API_PREFIX",
    "HYPERPARAMETER_NAMES",
    "STEPPER_NAME_PATTERN",
    "BiasCorrection",
    "BiasCorrectionReport",
    "CreateStepper",
    "GroupInfo",
    "GroupSpec",
    "Hyperparameters",
    "HyperparametersPatch",
    "JsonTensor",
    "ParamInfo",
    "ParamSpec",
    "Problem",
    "StepResult",
    "StepperList",
    "StepperSummary",
    "META_GROUPS",
    "META_SPEC",
    "META_STEP",
    "META_STEPPER",
]

API_PREFIX = "/v1"

#: Stepper names: URL- and filesystem-safe, never a path.
STEPPER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

#: Every keyword ``torch.optim.Adam`` / ``AdamW`` accepts besides ``params``.
HYPERPARAMETER_NAMES = (
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

Dtype = Literal["float16", "bfloat16", "float32", "float64", "complex64"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Model):
    """Adam/AdamW options; a field left out takes PyTorch's default for the optimizer.

    ``foreach`` and ``fused`` are tri-state as in PyTorch: ``null`` lets PyTorch choose.
    Values are validated by PyTorch itself, so an invalid one is rejected with the same
    message ``torch.optim.Adam`` would raise.
    """

    lr: float | None = Field(None, description="learning rate (PyTorch default 1e-3)")
    betas: tuple[float, float] | None = Field(None, description="(beta1, beta2)")
    eps: float | None = None
    weight_decay: float | None = Field(None, description="0 for adam, 1e-2 for adamw")
    amsgrad: bool | None = None
    maximize: bool | None = None
    foreach: bool | None = None
    capturable: bool | None = None
    differentiable: bool | None = None
    fused: bool | None = None
    decoupled_weight_decay: bool | None = Field(
        None, description="Adam only; AdamW is Adam with this set"
    )


class HyperparametersPatch(Hyperparameters):
    """Change options between steps (e.g. ``lr`` from a scheduler).

    Applies to every group, or only to ``group`` when given. Fields left out are kept;
    ``foreach``/``fused`` set to ``null`` explicitly return to PyTorch's automatic choice.
    """

    group: int | None = Field(None, ge=0, description="param group index; all when omitted")


class ParamSpec(_Model):
    name: str = Field(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f]+$")
    shape: list[int] | None = Field(None, description="required in JSON create bodies")
    dtype: Dtype | None = Field(None, description="float32 when omitted in JSON bodies")
    data: Any | None = Field(
        None, description="initial values as nested lists (JSON create only); zeros if omitted"
    )


class GroupSpec(Hyperparameters):
    params: list[str] = Field(description="names of the parameters in this group")


class CreateStepper(_Model):
    """Create a stepper.

    As ``application/json`` the body lists parameter shapes and dtypes (optionally with
    small initial values); as ``application/octet-stream`` it is a safetensors body of the
    initial parameter values whose ``__metadata__["adamscope.spec"]`` holds this model as
    JSON (``params`` then names the order; shapes and dtypes come from the tensors).
    """

    name: str = Field(pattern=STEPPER_NAME_PATTERN)
    optimizer: Literal["adam", "adamw"] = "adam"
    device: str | None = Field(None, description="e.g. 'cpu', 'cuda', 'cuda:1'; server default")
    hyperparameters: Hyperparameters = Field(default_factory=lambda: Hyperparameters())
    params: list[ParamSpec] = Field(min_length=1)
    groups: list[GroupSpec] | None = Field(
        None, description="param groups with per-group options; one group of all params if omitted"
    )


class ParamInfo(_Model):
    name: str
    shape: list[int]
    dtype: str
    numel: int
    group: int
    step: float | None = Field(description="the parameter's own Adam step; null before its first")
    state: list[str] = Field(description="state tensors present (exp_avg, ...)")


class GroupInfo(_Model):
    index: int
    params: list[str]
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    foreach: bool | None
    capturable: bool
    differentiable: bool
    fused: bool | None
    decoupled_weight_decay: bool


class StepperSummary(_Model):
    name: str
    optimizer: Literal["adam", "adamw"]
    device: str
    step: int = Field(description="number of step requests applied to this stepper")
    numel: int
    state_bytes: int = Field(description="bytes held by parameters and Adam state")
    params: list[ParamInfo]
    groups: list[GroupInfo]
    created_at: float
    updated_at: float


class StepperList(_Model):
    steppers: list[StepperSummary]


class StepResult(_Model):
    stepper: str
    step: int = Field(description="the stepper's step after this request")
    stepped: list[str] = Field(description="parameters updated (those sent a gradient)")
    skipped: list[str] = Field(description="parameters left as they were (no gradient)")


class BiasCorrection(_Model):
    """Adam's bias-correction factors at step ``t``, as PyTorch's for-loop/foreach paths
    compute them (Python floats, i.e. IEEE double)."""

    step: float
    lr: float
    beta1: float
    beta2: float
    bias_correction1: float = Field(description="1 - beta1**t")
    bias_correction2: float = Field(description="1 - beta2**t")
    step_size: float | None = Field(description="lr / bias_correction1 (null at step 0)")
    bias_correction2_sqrt: float = Field(description="sqrt(bias_correction2)")


class BiasCorrectionReport(_Model):
    stepper: str
    step: int
    groups: list[BiasCorrection] = Field(
        description="per param group, at the requested step (default: the stepper's step)"
    )
    params: dict[str, BiasCorrection] = Field(
        description="per parameter at its own state step (when no step was requested)"
    )


class JsonTensor(_Model):
    dtype: str
    shape: list[int]
    data: Any


class Problem(BaseModel):
    """RFC 9457 problem details, with a stable machine-readable ``code``."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="URI naming the problem type (urn:adamscope:problem:<code>)")
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
