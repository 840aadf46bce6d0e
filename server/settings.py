"""The one settings object. Every field is also an environment variable ``STEER_<NAME>``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/steerserve`` (``~/.cache/steerserve``): survives fresh clones."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "steerserve"


class Settings(BaseSettings):
    """Server configuration; see README.md for the table of settings."""

    model_config = SettingsConfigDict(env_prefix="STEER_", extra="ignore")

    model: str = Field(
        DEFAULT_MODEL,
        description="Local HF directory, a .gguf file, 'embedded:smollm2-135m-instruct' "
        "or 'random:tiny' (random weights, for tests).",
    )
    model_name: str | None = Field(None, description="Name reported by the API.")
    data_dir: Path = Field(default_factory=default_data_dir)
    device: str = Field("auto", description="'auto' (CUDA if available), 'cpu', 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Engine and limits.
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_queue: int = Field(64, ge=0)
    max_prefill_tokens: int = Field(8192, ge=1)
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Defaults to the model's context length."
    )
    max_tokens_limit: int = Field(4096, ge=1, description="Largest accepted max_tokens.")
    default_max_tokens: int = Field(128, ge=1)
    max_steering_entries: int = Field(8, ge=0)
    max_stop_sequences: int = Field(8, ge=0)
    max_sweep_points: int = Field(64, ge=1, description="Largest /v1/sweep grid.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    retry_after_s: int = Field(1, ge=0)
    max_corpus_bytes: int = Field(
        32 * 1024 * 1024, ge=1, description="Largest corpus (UTF-8 bytes) a prior is built from."
    )
