"""Wire types of the OpenAI-compatible endpoints (pydantic).

``POST /v1/completions`` and ``POST /v1/chat/completions`` take OpenAI's request shapes
plus steerserve's ``steering`` and ``diagnostics`` (what the ``openai`` client sends with
``extra_body``) and a few vLLM-style sampling extras. Fields OpenAI defines that this
server does not implement are accepted (``extra="allow"``), logged and ignored; values
of the right field with the wrong type or range are a 400. Conversion into the engine's
frozen types happens once, in ``server.api.openai_compat``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.protocol import SteeringEntry, StrictBool, StrictFloat, StrictInt, StrictStr

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI allows 5 / 20, vLLM 20)


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with ``usage``."""

    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = False


class _OpenAIRequest(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(description="The served model's name (see GET /v1/models).")
    temperature: StrictFloat | None = Field(None, ge=0.0, le=100.0, description="Default 1.")
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, description="Choices per prompt (limit: a setting).")
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(
        None, ge=-(2**63), le=2**63 - 1, description="Choice i uses seed + i."
    )
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, StrictFloat] | None = Field(
        None, description="token id → bias in [-100, 100]; runs first in the steering stack."
    )
    presence_penalty: StrictFloat = Field(
        0.0, ge=-2.0, le=2.0, description="Subtracted from tokens already in the output."
    )
    frequency_penalty: StrictFloat = Field(
        0.0, ge=-2.0, le=2.0, description="Times the token's count in the output, subtracted."
    )
    user: StrictStr | None = Field(None, description="Ignored.")
    # steerserve extras (send them with the openai client's extra_body).
    steering: list[SteeringEntry] = Field(default_factory=list)
    diagnostics: StrictBool | Literal["steps"] = False
    # vLLM-style sampling extras.
    top_k: StrictInt = Field(0, ge=-1)
    min_p: StrictFloat = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: StrictFloat = Field(1.0, gt=0.0, le=10.0)
    min_tokens: StrictInt = Field(0, ge=0)
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None


class CompletionRequest(_OpenAIRequest):
    """``POST /v1/completions``."""

    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]] = Field(
        description="A string, token ids, or a list of either (one choice set per prompt)."
    )
    max_tokens: StrictInt | None = Field(16, ge=1, description="OpenAI's default: 16.")
    logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Top alternatives per token (0 = only the "
        "chosen token's logprob)."
    )
    echo: StrictBool = Field(False, description="Not supported: true is a 400.")
    suffix: StrictStr | None = Field(None, description="Not supported: a value is a 400.")
    best_of: StrictInt | None = Field(None, ge=1, description="Only best_of == n.")


class TextPart(BaseModel):
    """One part of a message's content list; only text parts are supported."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None


class ChatMessageIn(BaseModel):
    """One chat turn in OpenAI's shape (``name`` and tool fields are ignored)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(_OpenAIRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, description="Deprecated OpenAI name.")
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)


# Non-streaming responses are built from these models (their shapes are OpenAI's, plus
# steerserve's ``diagnostics``/``warnings`` extras, sent only when set); see
# ``openai_compat.response_json``.


class CompletionChoice(BaseModel):
    """One choice of a text completion."""

    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    diagnostics: dict[str, Any] | None = Field(
        None, description="steerserve extra: steering diagnostics (sent when asked for)."
    )


class UsageOut(BaseModel):
    """Token counts (the prompt counted once however many choices)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """``POST /v1/completions`` (non-streaming)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut
    system_fingerprint: str | None = None
    warnings: list[str] | None = Field(
        None, description="steerserve extra: notes on the steering stack (sent when any)."
    )


class ChatMessageOut(BaseModel):
    """The assistant's reply."""

    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    diagnostics: dict[str, Any] | None = Field(
        None, description="steerserve extra: steering diagnostics (sent when asked for)."
    )


class ChatCompletionResponse(BaseModel):
    """``POST /v1/chat/completions`` (non-streaming)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut
    system_fingerprint: str | None = None
    warnings: list[str] | None = Field(
        None, description="steerserve extra: notes on the steering stack (sent when any)."
    )


# Streaming chunks (SSE ``data:`` frames), serialized with ``exclude_unset``: a key is on
# the wire exactly when the server set it — ``delta.role`` on a choice's first chunk,
# ``delta.content`` when there is text, ``diagnostics`` on the finishing chunk when asked
# for, ``usage`` (null, then the totals on a last chunk with no choices) only with
# ``stream_options.include_usage`` — as OpenAI's chunks do. See ``openai_compat._stream``.


class CompletionChunkChoice(BaseModel):
    """One choice's piece of a streaming text completion."""

    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    diagnostics: dict[str, Any] | None = Field(
        None, description="steerserve extra: steering diagnostics (on the finishing chunk)."
    )


class CompletionChunk(BaseModel):
    """One SSE frame of a streaming ``POST /v1/completions``."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: UsageOut | None = Field(
        None, description="Only with stream_options.include_usage: null on every chunk, "
        "the call's totals on a last chunk with no choices.",
    )


class ChatDelta(BaseModel):
    """What a chat chunk adds to the assistant's message."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """One choice's piece of a streaming chat completion."""

    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    diagnostics: dict[str, Any] | None = Field(
        None, description="steerserve extra: steering diagnostics (on the finishing chunk)."
    )


class ChatCompletionChunk(BaseModel):
    """One SSE frame of a streaming ``POST /v1/chat/completions``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageOut | None = Field(
        None, description="Only with stream_options.include_usage: null on every chunk, "
        "the call's totals on a last chunk with no choices.",
    )
