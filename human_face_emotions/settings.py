"""Runtime configuration: every service reads ``EMOTIONS_*`` environment variables (12-factor).

Defaults give the embedded one-machine setup (SQLite, local MLflow store under ``var/``); compose
overrides them with service URLs. Training's hyper-parameters live in Hydra configs instead.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMOTIONS_", env_file=None, extra="ignore")

    var_dir: Path = Field(
        default=Path("var"),
        description="Working directory for the embedded defaults (SQLite, MLflow store, logs).",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; falls back to MLFLOW_TRACKING_URI, then a sqlite "
        "store under var/mlflow.",
    )
    model_name: str = Field(default="face-emotion", description="Registered MLflow model name.")
    model_alias: str = Field(default="champion", description="Alias workers serve.")
    model_cache_dir: Path | None = Field(
        default=None, description="Where downloaded model versions are kept (var/model-cache)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Inference device: auto uses CUDA when present."
    )
    max_image_pixels: int = Field(
        default=40_000_000, gt=0, description="Decompression-bomb guard, pixels per image."
    )
    batch_size: int = Field(default=32, gt=0, le=4096, description="Images per micro-batch.")

    @field_validator("var_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.var_dir / 'mlflow' / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        """Artefact location for experiments created against the embedded sqlite store."""
        return self.var_dir / "mlflow" / "artifacts"

    @property
    def resolved_model_cache_dir(self) -> Path:
        return (self.model_cache_dir or self.var_dir / "model-cache").expanduser().resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests build their own ``Settings(...)`` instead of mutating this."""
    return Settings()
