"""Service settings: constructor argument > ``ADAMSCOPE_*`` environment variable > default."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adamscope.client.protocol import Durability

from .auth import TokenSpec

__all__ = ["DEFAULT_PORT", "Settings"]

DEFAULT_PORT = 8470


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ADAMSCOPE_", extra="ignore", hide_input_in_errors=True
    )  # tokens stay secret

    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    data_dir: Path = Field(Path("adamscope-data"), description="where the service keeps its files")
    device: str | None = Field(
        None, description="default device for new steppers; CUDA when available, else CPU"
    )
    max_body_bytes: int = Field(
        8 * 2**30, ge=1, description="largest request body accepted (413 above it)"
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds to wait for the next bytes of a request body, and for a whole "
        "safetensors header, before answering 408 request_timeout",
    )
    max_json_elements: int = Field(
        1_000_000, ge=1, description="largest tensor read or written as JSON instead of safetensors"
    )
    log_level: str = "info"
    # Access control (adamscope.service.auth): without tokens the CLI serves loopback only.
    tokens: list[TokenSpec] = Field(
        default_factory=list,
        description="bearer tokens, JSON list of {token, scope, prefix?, name?}",
    )
    tokens_file: Path | None = Field(None, description="JSON or TOML file of more tokens")
    insecure_no_auth: bool = Field(
        False, description="allow serving a non-loopback address without tokens"
    )
    # Quotas (adamscope.service.api.quota): None means unlimited.
    max_tensor_elements: int = Field(
        2**32, ge=1, description="largest parameter a stepper may hold, in elements (413)"
    )
    max_steppers: int | None = Field(None, ge=1, description="most steppers at once (507)")
    memory_budget_bytes: int | None = Field(
        None,
        ge=1,
        description="bytes all steppers' footprints may take (parameters, Adam state, "
        "gradient buffer, step workspace, pinned host buffers; 507); "
        "set or not, every new stepper must also fit the memory its device has available "
        "(adamscope.service.api.budget)",
    )
    # Durability (adamscope.service.persistence): the policy of steppers created without one.
    durability: Durability = Field(
        default_factory=Durability,
        description='default durability policy, e.g. {"mode": "every_n", "n": 100}',
    )

    # History, alerts, live events and metrics (adamscope.service.inspect, api.events,
    # api.routes.metrics).
    signals: bool = Field(
        True,
        description="compute per-step signals (false: steps are recorded without them; "
        "saves their cost, about 1 ms per step for a small stepper and 3 ms for 10M "
        "parameters in 129 tensors on a 2-core CPU)",
    )
    history_steps: int = Field(
        10_000,
        ge=1,
        description="steps of aggregate signals (and losses) kept raw per stepper (in "
        "memory too); older ones are downsampled into the tiers",
    )
    history_tensor_values: int = Field(
        2_000_000,
        ge=1,
        description="per-tensor signal values kept per stepper (the "
        "per-tensor history is as many steps as fit, at most history_steps)",
    )
    history_durable: bool = Field(
        True,
        description="keep each stepper's history for the whole run in the data directory "
        "(history.sqlite beside its checkpoint; it survives restarts and SIGKILL); false: "
        "in memory only, the same tiers, lost when the service stops",
    )
    history_tier_widths: list[int] = Field(
        [10, 100, 1_000, 10_000],
        description="steps per bucket of each downsampled tier of the history, increasing, "
        "each a multiple of the one before; steps older than the raw window "
        "(history_steps) are kept as min/max/mean buckets, the last tier reaching back "
        "to step 1",
    )
    history_tier_buckets: int = Field(
        1_000, ge=1, description="buckets of aggregate signals per history tier"
    )
    history_tier_tensor_values: int = Field(
        200_000,
        ge=1,
        description="per-tensor signal values (tensor x signal x bucket) per history tier",
    )
    events_heartbeat: float = Field(
        15.0, gt=0, description="seconds between keep-alive comments on /v1/events"
    )
    events_max_tensors: int = Field(
        64, ge=0, description="most tensors whose signals one step event carries"
    )
    metrics_max_steppers: int = Field(
        100, ge=0, description="steppers (first by name) with per-stepper series on /metrics"
    )

    @field_validator("history_tier_widths")
    @classmethod
    def _widths_nest(cls, w: list[int]) -> list[int]:
        if not w or w[0] < 2 or any(b <= a or b % a for a, b in zip(w, w[1:], strict=False)):
            raise ValueError("widths must be >= 2, increasing, each a multiple of the one before")
        return w

    def default_device(self) -> str:
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
