"""The wire contract: pydantic models shared by the service and the client.

The service imports these models to parse requests and build responses, and the client
imports them to build requests and parse responses, so the two cannot drift apart.
Bulk tensors never appear here: they travel as safetensors bodies (see ``adamscope.client.codec``);
the JSON models carry specifications, summaries and small tensors only.
"""

# Long: the wire contract: every request and reply model in one module (as openai-python's
# types/), imported by the service and the clients alike so that they cannot drift.

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .constants import (
    API_PREFIX,
    INT64_MAX,
    META_CHECKPOINT,
    META_GROUPS,
    META_SPEC,
    META_STEP,
    META_STEPPER,
    OPTION_NAMES,
    SNAPSHOT_NAME_PATTERN,
    STEPPER_NAME_PATTERN,
)

__all__ = [
    "ALERT_KINDS",
    "API_PREFIX",
    "ActiveAlert",
    "MemoryFootprint",
    "AlertEvent",
    "AlertRule",
    "AlertRules",
    "AlertsBrief",
    "AlertsReport",
    "HistoryReport",
    "Identity",
    "LossRecorded",
    "LossReport",
    "LossSeries",
    "Series",
    "INT64_MAX",
    "OPTION_NAMES",
    "STEPPER_NAME_PATTERN",
    "BiasCorrection",
    "BiasCorrectionReport",
    "CheckpointInfo",
    "CreateStepper",
    "Durability",
    "GroupInfo",
    "GroupSpec",
    "Hyperparameters",
    "HyperparametersPatch",
    "JsonTensor",
    "MemoryFootprint",
    "ParamInfo",
    "ParamSpec",
    "Problem",
    "SnapshotInfo",
    "SnapshotList",
    "SnapshotRequest",
    "StepResult",
    "StepperKind",
    "StepperList",
    "StepperPatch",
    "StepperSummary",
    "TopElements",
    "SNAPSHOT_NAME_PATTERN",
    "META_CHECKPOINT",
    "META_GROUPS",
    "META_SPEC",
    "META_STEP",
    "META_STEPPER",
]

Dtype = Literal["float16", "bfloat16", "float32", "float64", "complex64"]
#: What a stepper is for: ``hosted`` (stepped here) or ``frozen`` (an imported checkpoint
#: that refuses steps). A summary can also say ``watched``: a training job's own optimizer,
#: reported by ``adamscope.watch`` (created by its first report, never by a create).
StepperKind = Literal["hosted", "frozen"]
SummaryKind = Literal["hosted", "frozen", "watched"]


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


class Durability(_Model):
    """When the service writes a stepper's state to its data directory.

    * ``every_step`` (default): after every mutation, before the reply; an acknowledged step
      survives ``kill -9``.
    * ``every_n``: after every ``n`` steps (other changes ride along with the next write).
    * ``interval``: at most ``seconds`` after a change (checked after each mutation and by a
      background flusher).
    * ``manual``: only on an explicit checkpoint (``POST .../checkpoint``).

    Creating, importing and changing the policy always write; a graceful shutdown writes every
    stepper with unwritten changes except ``manual`` ones. Whatever the policy, the state on
    disk is always one complete step, never a mix.
    """

    mode: Literal["every_step", "every_n", "interval", "manual"] = "every_step"
    n: int | None = Field(None, ge=1, le=INT64_MAX, description="every_n: steps between writes")
    seconds: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="interval: longest time a change waits"
    )

    @model_validator(mode="after")
    def _parameters_match_mode(self) -> Durability:
        if self.mode == "every_n" and self.n is None:
            raise ValueError("mode 'every_n' needs n (steps between writes)")
        if self.mode == "interval" and self.seconds is None:
            raise ValueError("mode 'interval' needs seconds")
        if self.n is not None and self.mode != "every_n":
            raise ValueError("n only applies to mode 'every_n'")
        if self.seconds is not None and self.mode != "interval":
            raise ValueError("seconds only applies to mode 'interval'")
        return self


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
    durability: Durability | None = Field(
        None, description="when the state is written to disk; the service default if omitted"
    )
    kind: StepperKind = Field(
        "hosted",
        description="'hosted': stepped here; 'frozen': an imported checkpoint that "
        "refuses steps (its state and options can still be edited); see PATCH /steppers/{name}",
    )
    step: int = Field(
        0,
        ge=0,
        description="the step count to start at: an imported checkpoint's training "
        "step (each parameter's own Adam step travels in its state)",
    )


class StepperPatch(_Model):
    """Change what a stepper is for: freeze an imported checkpoint, or make it steppable."""

    kind: StepperKind = Field(description="'hosted' (steps run) or 'frozen' (steps refused)")


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


class MemoryFootprint(_Model):
    """Bytes a stepper holds once every parameter has stepped (what the memory budget
    counts, ``total``; see docs/reference/configuration.md, Memory)."""

    state: int = Field(description="parameters and Adam state (exp_avg, exp_avg_sq, ...)")
    gradients: int = Field(description="the buffer a step's gradients are received into")
    workspace: int = Field(description="temporaries PyTorch's step allocates and frees")
    pinned: int = Field(description="page-locked host buffers of a GPU stepper")
    on_device: int = Field(description="state + gradients + workspace, on its device")
    total: int = Field(description="on_device + pinned")


class StepperSummary(_Model):
    name: str
    kind: SummaryKind = Field(
        "hosted",
        description="'hosted': stepped by this service; 'frozen': an imported "
        "checkpoint that refuses steps until made 'hosted'; 'watched': a training job's "
        "own optimizer, reported by adamscope.watch",
    )
    optimizer: Literal["adam", "adamw"]
    device: str
    step: int = Field(description="number of step requests applied to this stepper")
    numel: int
    state_bytes: int = Field(description="bytes held by parameters and Adam state")
    footprint: MemoryFootprint | None = Field(
        None, description="the memory the stepper holds, by kind, under its current options"
    )
    params: list[ParamInfo]
    groups: list[GroupInfo]
    created_at: float
    updated_at: float
    durability: Durability | None = Field(None, description="the stepper's durability policy")
    persisted_step: int | None = Field(
        None, description="step of the checkpoint on disk (null: none written yet)"
    )
    persisted_at: float | None = Field(None, description="when that checkpoint was written")
    dirty: bool | None = Field(None, description="whether changes are not yet on disk")
    alerts: AlertsBrief | None = Field(None, description="alerts raised by its signals")
    placement: dict[str, Any] | None = Field(
        None,
        description="distributed mode (serve --ray): the slots (Ray actors) holding "
        "the stepper or its shards, and its recoveries",
    )


class StepperList(_Model):
    steppers: list[StepperSummary]


class StepResult(_Model):
    stepper: str
    step: int = Field(description="the stepper's step after this request")
    stepped: list[str] = Field(description="parameters updated (those sent a gradient)")
    skipped: list[str] = Field(description="parameters left as they were (no gradient)")
    replayed: bool = Field(
        False,
        description="this key's step had been applied before: "
        "the original result, not applied again",
    )
    applied: bool = Field(True, description="false: a contribution waiting for the others")
    pending: list[int] = Field(
        default_factory=list, description="accumulate mode: workers that have contributed"
    )


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


class SnapshotRequest(_Model):
    name: str | None = Field(
        None,
        pattern=STEPPER_NAME_PATTERN,
        description="snapshot name; 'step<N>-<UTC time>' when omitted",
    )


class SnapshotInfo(_Model):
    name: str
    stepper: str
    step: int | None = Field(description="the stepper's step in the snapshot (null: unreadable)")
    size: int = Field(description="bytes of the snapshot file")
    created_at: float | None = Field(description="when the snapshot was taken")
    error: str | None = Field(None, description="why the file could not be read, if it cannot")


class SnapshotList(_Model):
    stepper: str
    snapshots: list[SnapshotInfo] = Field(description="oldest first")


class CheckpointInfo(_Model):
    stepper: str
    step: int = Field(description="the step now on disk")
    persisted_at: float
    size: int = Field(description="bytes of the checkpoint file")


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


# ---------------------------------------------------------------------- history, alerts, loss

#: Alert rule kinds: relative change step to step, a value above or below a threshold, and
#: NaN/Inf appearing in a tensor's gradient or moments.
ALERT_KINDS = ("swing", "above", "below", "nonfinite")


class _Floats(_Model):
    """A model whose floats may be NaN or infinite: in JSON those are the strings ``"NaN"``,
    ``"Infinity"`` and ``"-Infinity"`` (protobuf's JSON convention), as numbers cannot be."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


class AlertRule(_Floats):
    """A condition on a per-step signal (``adamscope.service.inspect.signals``) that raises an alert
    event when it starts to hold (edge-triggered: once per episode, per tensor).

    * ``swing``: ``|x_t - x_prev| / |x_prev| > threshold`` (relative change step to step);
    * ``above`` / ``below``: ``x_t > threshold`` / ``x_t < threshold``;
    * ``nonfinite``: the tensor's ``nan_count + inf_count`` (NaN/Inf in its gradient or
      moments) is above 0, or, with ``signal``, that signal is NaN or infinite.
    """

    kind: Literal["swing", "above", "below", "nonfinite"]
    signal: str | None = Field(
        None, min_length=1, max_length=64, description="signal name (required except for nonfinite)"
    )
    tensor: str | None = Field(
        "*",
        max_length=512,
        description="'*': every parameter tensor; a name: that tensor; null: the stepper's "
        "aggregate signals",
    )
    threshold: float | None = Field(
        None, allow_inf_nan=False, description="required for swing, above and below"
    )
    after_step: int = Field(
        0,
        ge=0,
        le=INT64_MAX,
        description="only evaluated at steps after this one (skip the bias-correction warm-up)",
    )
    name: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="label of the rule; derived from it when omitted",
    )

    @model_validator(mode="after")
    def _complete(self) -> AlertRule:
        if self.kind == "nonfinite":
            if self.threshold is not None:
                raise ValueError("a nonfinite rule takes no threshold")
            return self
        if self.signal is None or self.threshold is None:
            raise ValueError(f"a {self.kind!r} rule needs a signal and a threshold")
        if self.kind == "swing" and self.threshold <= 0:
            raise ValueError("a swing threshold is a relative change > 0 (0.5 = 50%)")
        return self

    def label(self) -> str:
        """The rule's name, or one derived from it (e.g. ``lr_eff_p99 swing > 0.5``)."""
        if self.name:
            return self.name
        if self.kind == "nonfinite":
            return f"nonfinite {self.signal}" if self.signal else "nonfinite"
        op = "<" if self.kind == "below" else ">"
        what = "swing " if self.kind == "swing" else ""
        return f"{self.signal} {what}{op} {self.threshold:g}"


class AlertRules(_Model):
    """``PUT .../alerts``: the stepper's rules (replacing all), or ``null`` for the defaults."""

    rules: list[AlertRule] | None = Field(max_length=100)


class TopElements(_Model):
    """Elements of a tensor, largest first: flat indices into the tensor (row-major; for a
    2-D tensor of ``cols`` columns, row ``index // cols``, column ``index % cols``) and
    their values."""

    index: list[int]
    value: list[float]


class AlertEvent(_Floats):
    """A rule that started to hold at ``step``."""

    seq: int = Field(description="the step event's sequence number (SSE id)")
    stepper: str
    step: int
    time: float
    rule: str = Field(description="the rule's label")
    kind: Literal["swing", "above", "below", "nonfinite"]
    signal: str | None
    tensor: str | None = Field(description="null: the stepper's aggregate")
    value: float
    previous: float | None = Field(None, description="swing: the value it changed from")
    threshold: float | None = None
    top: dict[str, TopElements] | None = Field(
        None,
        description="the tensor's top elements at this step, as the localized signals "
        "recorded them (``lr_change``: by change of the effective LR, the ratio new/old "
        "net of the schedule; ``shock``: by g^2 / v_hat(t-1)); kept with the event. "
        "Absent where that step recorded none: the localized signals find top elements "
        "only at a step where some element's effective LR moved by more than 2x, and "
        "only for the tensors within their budget",
    )


class ActiveAlert(_Model):
    rule: str
    tensor: str | None
    since_step: int


class AlertsBrief(_Floats):
    """In a stepper's summary: alerts raised since the service started."""

    count: int
    active: int = Field(description="rules (per tensor) that hold at the latest step")
    latest: AlertEvent | None


class AlertsReport(_Floats):
    stepper: str
    rules: list[AlertRule]
    defaults: bool = Field(description="whether these are the default rules")
    count: int = Field(description="alert events raised since the service started")
    active: list[ActiveAlert]
    events: list[AlertEvent] = Field(description="the latest events, oldest first (bounded)")


class LossReport(_Floats):
    """``POST .../loss``: a training loss to record in the history (NaN/Inf allowed)."""

    step: int | None = Field(
        None,
        ge=0,
        le=INT64_MAX,
        description="the step it belongs to; default: the stepper's current step",
    )
    loss: float


class LossRecorded(_Floats):
    stepper: str
    step: int
    loss: float
    time: float


class Series(_Floats):
    """One time series block: the steps, and per signal its values at those steps.

    A whole-run query (``from``/``to``/``max_points``) answers points that may each cover
    several steps (``first_steps[i]`` to ``steps[i]``, ``counts[i]`` of them recorded):
    ``values`` is then the mean over them, with ``min`` and ``max`` (NaN values left out).
    """

    steps: list[int]
    time: list[float]
    values: dict[str, list[float]]
    first_steps: list[int] | None = Field(None, description="whole-run queries: first step")
    counts: list[int] | None = Field(None, description="whole-run queries: steps recorded")
    min: dict[str, list[float]] | None = Field(None, description="whole-run queries")
    max: dict[str, list[float]] | None = Field(None, description="whole-run queries")


class LossSeries(_Floats):
    """Losses by step (whole-run queries: the mean loss of each point, by its last step)."""

    steps: list[int]
    values: list[float]


class HistoryReport(_Floats):
    """A stepper's retained signal history (``GET .../history``)."""

    stepper: str
    capacity: int = Field(description="steps of aggregate signals kept")
    tensor_capacity: int = Field(description="steps of per-tensor signals kept")
    signals: list[str] = Field(description="signals present in this reply")
    aggregate: Series
    tensors: dict[str, Series]
    loss: LossSeries
    first_step: int | None = Field(
        None, description="whole-run queries: the earliest step the history reaches"
    )


# ---------------------------------------------------------------------- identity


class Identity(_Model):
    """``GET /v1/whoami``: what the request's token may do (never the token itself), so a
    user interface can offer only the controls the token allows."""

    name: str = Field(description="the token's label (its configured name)")
    scope: Literal["read", "write", "admin"] = Field(description="read < write < admin")
    prefix: str | None = Field(
        description="the token's stepper-name namespace: the name "
        "itself and names continuing it after a separator "
        "(- . _); null: all"
    )
    reaches: str | None = Field(
        None,
        description="which steppers the token reaches, in words "
        "(e.g. \"the stepper 'team-a' and steppers "
        "whose name starts with 'team-a-', 'team-a.' "
        "or 'team-a_'\")",
    )
    tokens: bool = Field(
        description="whether the service checks tokens (false: every "
        "client on its loopback address is an admin)"
    )
