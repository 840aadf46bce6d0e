"""Wire types of the native API (pydantic). Converted once in ``server.api.convert``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

# The strict scalar types of every request model (no coercion: "1" is not 1, 1 is not
# true); one home for the native, OpenAI, priors and control-vector models.
StrictStr = Annotated[str, Strict()]
StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict(), Field(allow_inf_nan=False)]
StrictBool = Annotated[bool, Strict()]


class ChatMessage(BaseModel):
    """One chat turn; rendered with the model's chat template."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: StrictStr


class SteeringEntry(BaseModel):
    """One steering method; its fields depend on ``type`` and are checked by the
    processor's own ``validate`` (unknown fields are a 400 there)."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr = Field(
        description="ngram | control | fusion | margin | logit_bias"
    )


class GenerateRequest(BaseModel):
    """``POST /v1/generate``: one prompt, sampling settings and a steering stack."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr | list[StrictInt] | None = Field(
        None, description="Raw text or token ids. Exactly one of prompt/messages."
    )
    messages: list[ChatMessage] | None = Field(
        None, description="Chat turns, formatted with the model's chat template."
    )
    max_tokens: StrictInt | None = Field(None, ge=1, description="Defaults to a setting.")
    temperature: StrictFloat = Field(1.0, ge=0.0, le=100.0, description="0 = greedy.")
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=-1, description="0 or -1 = disabled.")
    min_p: StrictFloat = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: StrictFloat = Field(1.0, gt=0.0, le=10.0)
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)
    stream: StrictBool = False
    steering: list[SteeringEntry] = Field(default_factory=list)
    diagnostics: StrictBool | Literal["steps"] = Field(
        False, description="true = aggregate metrics; 'steps' = also per-step scalars."
    )
    logprobs: StrictInt | None = Field(
        None, ge=0, le=20,
        description="Return each token's log-probability under the steered distribution and "
        "this many top alternatives (0 = the token's own only); null = off.",
    )


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    """Non-streaming answer of ``POST /v1/generate``."""

    id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    diagnostics: dict[str, Any] | None = None
    logprobs: list[dict[str, Any]] | None = Field(
        None, description="Per token: {token_id, logprob, top: [{token_id, logprob}]}."
    )
    warnings: list[str] | None = Field(
        None, description="Legal but probably unintended request settings."
    )


class StreamEvent(BaseModel):
    """One SSE ``data:`` frame of a streaming ``/v1/generate``; the last carries
    ``finish_reason``, ``usage`` and ``diagnostics``."""

    id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    diagnostics: dict[str, Any] | None = None
    logprobs: list[dict[str, Any]] | None = None
    warnings: list[str] | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    owned_by: str = "steerserve"
    role: str
    source: str
    vocab_size: int
    context_length: int
    tokenizer_fingerprint: str
    dtype: str
    device: str


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


HealthStatus = Literal["ok", "loading", "error", "draining"]


class Health(BaseModel):
    """``GET /health``."""

    status: HealthStatus
    model: str | None = None
    detail: str | None = None
    running: int = 0
    waiting: int = 0
