"""The one settings object. Every field is also an environment variable ``STEER_<NAME>``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/steerserve`` (``~/.cache/steerserve``): survives fresh clones."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "steerserve"


class AuxModelSetting(BaseModel):
    """One auxiliary model for logit fusion (an entry of ``aux_models``); see
    ``server.auxiliary`` and docs/fusion.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    role: Literal["small_base", "expert"]
    source: str = Field(description="Same forms as 'model' (directory, .gguf, embedded:, "
                        "random:tiny[:SEED[:LAYERS]]).")
    template: Literal["same", "chat"] = Field(
        "same", description="'chat': experts get the conversation rendered with their own "
        "chat template instead of the main model's prompt ids.",
    )
    chat_template: str | None = Field(None, description="Jinja chat template (implies 'chat').")


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
    weights: Literal["auto", "fp32", "bf16", "int4"] = Field(
        "auto", description="Weights format: 'auto' picks the fastest path the device has "
        "(CPU + 4-bit GGUF: int4; CPU with AVX512-BF16: bf16; CUDA: bf16) and logs it; "
        "'fp32' is the exact reference path.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Legacy: with weights 'auto', an explicit dtype picks the "
        "dense format (float32 = fp32, bfloat16 = bf16, float16 = dense fp16).",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Engine and limits.
    max_batch_size: int = Field(
        32, ge=1, le=1024,
        description="Rows decoding together. Sized from memory: a row's KV cache at the "
        "model's full context is 2·layers·kv_heads·head_dim·bytes·context (embedded "
        "SmolLM2 on the bf16/int4 fast path: 180 MiB), so 32 full-context rows plus the "
        "model fit in 8 GiB of RAM; on 2 CPU cores aggregate tok/s grows little past 32 "
        "while each step gets slower (docs/fastpath.md, benchmarks/fastpath.py "
        "--batch-sweep). Lower it for fp32 weights (twice the KV bytes) or long contexts.",
    )
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
    fusion_memory_mb: int = Field(
        256,
        ge=1,
        description="Memory budget (MiB) of one chunk of dynamic fusion's grid search; the "
        "candidates are evaluated in chunks of at most this size (at least one grid point).",
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    retry_after_s: int = Field(1, ge=0)
    max_corpus_bytes: int = Field(
        32 * 1024 * 1024, ge=1, description="Largest corpus (UTF-8 bytes) a prior is built from."
    )
    max_n: int = Field(8, ge=1, le=128, description="Largest OpenAI `n` (choices per prompt).")
    max_prompts: int = Field(
        16, ge=1, description="Largest number of prompts in one /v1/completions call."
    )
    request_timeout_s: float | None = Field(
        600.0, gt=0, description="Per-request wall-clock budget from submission; a request "
        "that exceeds it ends with finish_reason 'timeout' and frees its slot. None = none.",
    )
    max_stop_chars: int = Field(
        256, ge=1, le=65536, description="Longest accepted stop string (characters); "
        "longer is a 400 naming 'stop'.",
    )
    max_connections: int | None = Field(
        1024, ge=1, description="Concurrent HTTP connections uvicorn accepts "
        "(limit_concurrency); beyond it new requests get 503. None = no limit.",
    )
    max_concurrent_builds: int = Field(
        2, ge=1, description="Prior/control-vector builds (POST /v1/priors, "
        "/v1/control-vectors, PUT .../gguf) running at once; more get 429 + Retry-After.",
    )
    build_timeout_s: float = Field(
        300.0, gt=0, description="Wall-clock limit of one artifact build; past it the "
        "build is abandoned (408) and nothing is stored.",
    )
    max_artifact_bytes: int = Field(
        1 << 30, ge=0, description="Memory budget of all loaded artifacts (priors and "
        "control vectors, by stored size); a build that would exceed it gets 507.",
    )
    max_extraction_chars: int = Field(
        4 * 1024 * 1024, ge=1, description="Total characters of the texts a control-vector "
        "extraction may build (computed from template/words/suffixes before building); "
        "more is a 413.",
    )
    artifact_tmp_grace_s: float = Field(
        300.0, ge=0, description="Scans remove a leftover temporary artifact file only when "
        "no process holds its name's lock and it is older than this (a second guard for "
        "volumes whose file locks are unreliable).",
    )
    shutdown_grace_s: float = Field(
        20.0, ge=0, description="On SIGTERM: how long in-flight requests may run on before "
        "they are aborted (new requests get 503 meanwhile).",
    )

    # Access.
    api_key: str | None = Field(
        None, description="One key or several, comma-separated (STEER_API_KEY). When set, "
        "every /v1/* call needs 'Authorization: Bearer <key>'.",
    )
    auth_exempt_paths: str = Field(
        "/health,/metrics", description="Comma-separated paths that stay open with a key set."
    )
    cors_origins: str = Field(
        "", description="Comma-separated allowed CORS origins ('*' = any); empty = CORS off."
    )

    # Logit fusion.
    aux_models: list[AuxModelSetting] = Field(
        default_factory=list, description="Auxiliary models for fusion (STEER_AUX_MODELS: a "
        'JSON list of {"name", "role", "source"[, "template", "chat_template"]}).',
    )

    @field_validator("api_key")
    @classmethod
    def _some_key(cls, value: str | None) -> str | None:
        """A key setting with no key in it (``","``, ``" , "``) is a mistake, not 'auth
        off': refuse to start rather than serve without authentication."""
        if value and not _split(value):
            raise ValueError("api_key holds no key (only commas/spaces); unset it to turn "
                             "authentication off")
        return value

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The accepted API keys (empty = authentication off)."""
        return _split(self.api_key or "")

    @property
    def auth_exempt(self) -> tuple[str, ...]:
        """Paths that never need a key."""
        return _split(self.auth_exempt_paths)

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        """Allowed CORS origins (empty = no CORS middleware)."""
        return _split(self.cors_origins)


def _split(value: str) -> tuple[str, ...]:
    """'a, b,,c' → ('a', 'b', 'c')."""
    return tuple(part.strip() for part in value.split(",") if part.strip())
