"""Service settings: constructor argument > ``ADAMSCOPE_*`` environment variable > default."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_PORT", "Settings"]

DEFAULT_PORT = 8470


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAMSCOPE_", extra="ignore")

    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    data_dir: Path = Field(Path("adamscope-data"), description="where the service keeps its files")
    device: str | None = Field(
        None, description="default device for new steppers; CUDA when available, else CPU"
    )
    max_body_bytes: int = Field(
        8 * 2**30, ge=1, description="largest request body accepted (413 above it)"
    )
    max_json_elements: int = Field(
        1_000_000, ge=1, description="largest tensor read or written as JSON instead of safetensors"
    )
    log_level: str = "info"

    def default_device(self) -> str:
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
