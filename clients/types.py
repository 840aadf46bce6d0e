"""Typed request and response models for every endpoint of the native HTTP API.

Request models serialize with ``exclude_none`` so the server's own defaults apply to
anything left unset. Response models accept unknown fields (``extra="allow"``) so that an
older SDK keeps working against a newer server that adds fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

from clients.steering import SteeringLike, steering_to_wire

JSON = dict[str, Any]


class _Request(BaseModel):
    """Base of request bodies: extra fields pass through (server extensions)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_wire(self) -> JSON:
        """The JSON body, without unset (None) fields."""
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)


class _Response(BaseModel):
    """Base of response bodies: unknown fields are kept, not rejected."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


# --------------------------------------------------------------------------- generate


class ChatMessage(TypedDict):
    """One chat turn of ``messages``."""

    role: Literal["system", "user", "assistant"]
    content: str


class SamplingOptions(TypedDict, total=False):
    """Keyword arguments shared by ``generate``, ``stream`` and ``sweep`` (all optional;
    unset ones take the server's defaults). ``extra_body`` merges into the JSON body;
    ``timeout`` is this call's timeout in seconds (not sent)."""

    messages: list[ChatMessage]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    stop: str | list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    min_tokens: int
    diagnostics: bool | Literal["steps"]
    logprobs: int
    extra_body: JSON
    timeout: float


class GenerateOptions(SamplingOptions, total=False):
    """Keyword arguments of ``generate`` and ``stream``: sampling plus the steering stack."""

    steering: list[SteeringLike]


class GenerateRequest(_Request):
    """``POST /v1/generate``: one prompt (text, token ids or chat messages)."""

    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    #: OpenAI semantics over the output tokens, in [-2, 2].
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stream: bool | None = None
    steering: list[JSON] | None = None
    diagnostics: bool | Literal["steps"] | None = None
    #: Per-token log-probabilities with this many top alternatives (0 = the token's own).
    logprobs: int | None = None

    @classmethod
    def build(
        cls, prompt: str | list[int] | None, *, stream: bool = False, **options: Any
    ) -> GenerateRequest:
        """From SDK arguments: steering builders become wire dicts, ``extra_body`` merges."""
        options.pop("timeout", None)
        extra = options.pop("extra_body", None) or {}
        steering = options.pop("steering", None)
        if steering is not None:
            options["steering"] = [steering_to_wire(s) for s in steering]
        if prompt is None and options.get("messages") is None:
            raise ValueError("give a prompt or messages")
        return cls(prompt=prompt, stream=stream or None, **options, **extra)


class Usage(_Response):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    """One of the top alternatives at a position."""

    token_id: int
    logprob: float


class TokenLogprob(_Response):
    """A generated token's log-probability under the steered distribution and the most
    likely alternatives at its position (``logprobs=`` of them, most likely first)."""

    token_id: int
    logprob: float
    top: list[TopLogprob] = Field(default_factory=list)


class ReceiptLayer(_Response):
    """One touched layer of a receipt entry: the relative size of the intervention
    ``‖Δh‖/‖h‖`` (mean and max over the positions it acted on; None if none) and, for
    ``ablate``/``clamp``, of the component along the direction before the edit."""

    delta_mean: float | None = None
    delta_max: float | None = None
    component_mean: float | None = None
    component_max: float | None = None


class ReceiptEntry(_Response):
    """What one control entry did: where (layers, positions) and how much."""

    index: int
    vector: str
    mode: str
    positions: Any = None
    layers: list[int]
    prompt_positions: int
    generated_positions: int
    per_layer: dict[str, ReceiptLayer]


class Receipt(_Response):
    """The steering receipt of a response with control entries (docs/control.md)."""

    entries: list[ReceiptEntry]


class GenerateResponse(_Response):
    """The answer of a non-streaming ``POST /v1/generate``."""

    id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    diagnostics: JSON | None = None
    #: One entry per token of ``token_ids`` when ``logprobs=`` was given.
    logprobs: list[TokenLogprob] | None = None
    #: Legal but probably unintended request settings the server noticed.
    warnings: list[str] | None = None
    receipt: Receipt | None = None


class StreamEvent(_Response):
    """One SSE frame of a streaming generate: a token delta; the last one carries
    ``finish_reason``, ``usage`` and (when asked for) ``diagnostics``."""

    id: str
    model: str
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    diagnostics: JSON | None = None
    logprobs: list[TokenLogprob] | None = None
    warnings: list[str] | None = None
    receipt: Receipt | None = None


# --------------------------------------------------------------------------- sweep


class SweepRequest(_Request):
    """``POST /v1/sweep``: one generate request and a grid of dotted paths → values."""

    request: JSON
    grid: dict[str, list[Any]]


class SweepPoint(_Response):
    """One grid point of a sweep: the values applied and the generate response."""

    params: JSON
    response: GenerateResponse


class SweepResponse(_Response):
    """``POST /v1/sweep``."""

    results: list[SweepPoint]


# --------------------------------------------------------------------------- artifacts


class ListResponse(_Response):
    """``{"object": "list", "data": [...]}``; ``skipped`` names artifacts found corrupt."""

    object: str = "list"
    data: list[JSON]
    skipped: list[JSON] = Field(default_factory=list)


class Deleted(_Response):
    """The answer of a DELETE."""

    name: str
    object: str | None = None
    deleted: bool = True


class PriorCreate(_Request):
    """``POST /v1/priors``: exactly one of ``text`` (one or more documents) / ``corpus``."""

    name: str
    text: str | list[str] | None = None
    corpus: str | None = None
    max_documents: int | None = None
    estimator: str | None = None
    weights: list[float] | None = None
    add_k: float | None = None
    discount: float | None = None


class Prior(_Response):
    """A stored n-gram style prior (``GET /v1/priors/{name}``)."""

    name: str
    object: str = "prior"
    estimator: str | None = None
    orders: list[int] | None = None
    vocab_size: int | None = None
    tokenizer_fingerprint: str | None = None
    compatible: bool | None = None
    default_weights: list[float] | None = None
    corpus: Any = None
    counts: Any = None
    params: JSON | None = None
    build_seconds: float | None = None
    created_at: Any = None
    file_bytes: int | None = None
    sha256: str | None = None


class PriorList(ListResponse):
    """``GET /v1/priors``."""

    @property
    def priors(self) -> list[Prior]:
        """The entries as :class:`Prior`."""
        return [Prior.model_validate(d) for d in self.data]


class CorpusList(ListResponse):
    """``GET /v1/corpora``: named corpora and whether each is installed."""


class ContrastPair(TypedDict):
    """One contrastive prompt pair for control-vector extraction."""

    positive: str
    negative: str


class ControlVectorCreate(_Request):
    """``POST /v1/control-vectors``: extract a direction per layer from prompt pairs."""

    name: str
    pairs: list[dict[str, str]] | None = None
    #: Or let the server build the pairs: ``template`` with one ``{}`` filled from
    #: ``positive_words``/``negative_words`` (zipped), or an inline ``{positive|negative}``;
    #: every pair text gets each of ``suffixes`` appended; ``chat`` wraps texts in the
    #: model's chat template.
    template: str | None = None
    positive_words: list[str] | None = None
    negative_words: list[str] | None = None
    suffixes: list[str] | None = None
    chat: bool | None = None
    layers: list[int] | None = None
    method: str | None = None


class ControlVector(_Response):
    """A stored control vector (``GET /v1/control-vectors/{name}``)."""

    name: str
    object: str = "control_vector"
    layers: list[int] | None = None
    method: str | None = None
    hidden_size: int | None = None
    model_hint: str | None = None
    #: Each layer's direction norm (layer index as a string → L2 norm).
    norms: dict[str, float] | None = None
    #: Whether the serving model can apply it (absent while the server loads).
    compatible: bool | None = None
    source: str | None = None  # "extracted" | "gguf"
    pairs: int | None = None
    #: Per fitted layer: ``layer``, ``separation``, ``accuracy``, ``gap``, ``explained``.
    separation: list[JSON] | None = None
    best_layers: list[int] | None = None
    build_seconds: float | None = None
    created_at: Any = None
    file_bytes: int | None = None
    sha256: str | None = None


class ControlVectorList(ListResponse):
    """``GET /v1/control-vectors``."""

    @property
    def vectors(self) -> list[ControlVector]:
        """The entries as :class:`ControlVector`."""
        return [ControlVector.model_validate(d) for d in self.data]


# --------------------------------------------------------------------------- models, health


class ModelCard(_Response):
    """One model the server holds: the main model or an auxiliary one (fusion)."""

    id: str
    object: str = "model"
    owned_by: str | None = None
    role: str = "main"
    source: str | None = None
    vocab_size: int | None = None
    context_length: int | None = None
    tokenizer_fingerprint: str | None = None
    dtype: str | None = None
    device: str | None = None
    weights: str | None = None  # fp32 | bf16 | int4 (the fast path, docs/fastpath.md)


class ModelList(_Response):
    """``GET /v1/models``."""

    object: str = "list"
    data: list[ModelCard]


class Health(_Response):
    """``GET /health`` (returned for 200 and for 503; see ``ready``)."""

    status: str
    model: str | None = None
    detail: str | None = None
    running: int = 0
    waiting: int = 0
    weights: str | None = None

    @property
    def ready(self) -> bool:
        """True when the server accepts generation requests."""
        return self.status == "ok"
