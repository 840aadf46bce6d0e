"""Internal, frozen request types and the events the engine emits.

The HTTP layer converts its pydantic wire models into these once
(``server.api.convert``); the engine never sees wire types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from processors.stack import StackEntry

# Temperatures below this decode greedily: logits / T overflows float32 for tiny T, and
# at such a T sampling is the argmax anyway (server.engine.sampler).
GREEDY_TEMPERATURE = 1e-6

FinishReason = Literal["stop", "length", "abort", "timeout", "error"]
DiagnosticsMode = Literal["off", "summary", "steps"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (validated at the boundary)."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # OpenAI semantics over the row's output tokens (server.engine.sampler).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    # Report the emitted token's logprob and this many top alternatives (None = off).
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or below the sampler's ``GREEDY_TEMPERATURE``
        (1e-6), where ``logits / T`` would overflow."""
        return self.temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the engine sees it."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    steering: tuple[StackEntry, ...] = ()
    diagnostics: DiagnosticsMode = "off"
    arrival: float = 0.0
    # Wall-clock budget from submission; None = the engine's default (a setting).
    timeout_s: float | None = None
    warnings: tuple[str, ...] = ()
    # Prompt ids for auxiliary models with their own prompt template (fusion experts):
    # (model name, ids) pairs; a model not listed decodes from ``prompt_ids``.
    aux_prompt_ids: tuple[tuple[str, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class TokenLogprob:
    """Logprob of one emitted token and the ``k`` most likely alternatives.

    Both come from ``log_softmax`` of the *steered* logits (after the processor stack,
    before the sampler's penalties, temperature and truncation), so they do not depend
    on temperature and are finite for every token.
    """

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request: ``text`` is the newly decodable text (may be '').

    ``logprobs`` (aligned with ``token_ids``) is set when the request asked for them.
    """

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class FinishEvent:
    """The request ended; ``text`` holds any text not yet sent in a TokenEvent."""

    finish_reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    diagnostics: dict[str, Any] | None = None
    # The steering receipt (processors.control.summarize_receipt) of a request with a
    # control entry; None otherwise.
    receipt: dict[str, Any] | None = None


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed inside the engine."""

    message: str
    type: str = "server_error"
    code: int = 500


EngineEvent = TokenEvent | FinishEvent | ErrorEvent
EventSink = Callable[[EngineEvent], None]


@dataclass
class RequestHandle:
    """The caller's side of a submitted request: cancel it or read its outcome."""

    request: GenerationRequest
    cancelled: bool = field(default=False)
    submitted: float = 0.0  # time.monotonic() when the engine queued it
    key: int = 0  # unique per engine, assigned at submit (keys auxiliary rows, etc.)

    def cancel(self) -> None:
        """Ask the engine to drop this request at the next step boundary."""
        self.cancelled = True
