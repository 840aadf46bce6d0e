"""``/v1/control-vectors``: extract, import/export (GGUF), list, show and delete.

``POST /v1/control-vectors`` runs contrastive prompt pairs through the serving model in
batches, takes every chosen block's output at the last token (through the same hooks
that apply vectors, ``server.engine.hooks``, so "layer ℓ" means the same in both) and fits
one direction per layer (``processors.control.fit_layers``). The response reports each
layer's separation so a user can pick layers for ``steering[].layers``.

``PUT /v1/control-vectors/{name}/gguf`` imports a GGUF file (raw body) in the layout
repeng writes and llama.cpp reads; ``GET .../{name}/gguf`` exports one
(``processors.control_gguf``: ``direction.N`` ↔ block ``N``, 0-based). Vectors are stored
as artifacts (``server.artifacts``) under ``<data_dir>/control-vectors``, with the same
rules as priors: atomic, checksummed, corrupt files reported and skipped.

The extraction forwards are an engine job (``server.engine.extract``, via
:func:`engine_states`): queued with the requests (a full queue is the same 429) and run
by the engine thread between decode steps, so one loop owns the model.

Limits come before work: the name is reserved first (409), the size of every text an
extraction would build is computed from its parts (template, words, suffixes, chat
wrapper) and refused with 413 before any string is built or tokenized, and a GGUF upload
is bounded by what the serving model's geometry needs and its header is scanned before
it is parsed. Builds run within ``server.api.artifact_http.run_build``'s limits.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from processors.base import ParamError
from processors.control import (
    METHODS,
    ControlVector,
    check_layers,
    expand_template,
    fit_layers,
)
from processors.control_gguf import (
    GGUFFormatError,
    max_control_gguf_bytes,
    read_control_gguf,
    write_control_gguf,
)
from server.api.artifact_http import (
    STORED_AT,
    BuildCancelled,
    Deleted,
    Skipped,
    bad,
    build_card,
    check_artifact_name,
    check_budget_room,
    check_cancelled,
    delete_artifact,
    list_artifacts,
    record_fields,
    run_build,
    store_artifact,
    wire,
)
from server.api.artifact_http import registry as artifact_registry
from server.api.convert import longest_token_chars
from server.api.errors import APIError, artifact_or_404, error_responses
from server.api.protocol import StrictBool, StrictStr
from server.api.state import ServerState, StateDep, engine_errors
from server.artifacts import ArtifactExistsError, ArtifactRegistry
from server.engine import Engine
from server.engine.extract import EXTRACT_BATCH, ExtractionJob, JobCancelled
from server.engine.hooks import ControlHooks

log = logging.getLogger("steerserve.control")
router = APIRouter()

MAX_PAIRS = 1024  # pairs per extraction (texts run = 2 × pairs); more is a 413
MAX_TEXT_TOKENS = 512  # tokens per pair text
_ERRORS = error_responses(400, 409, 413, 429, 503, 507)  # POST/PUT (507: disk/budget)
_INLINE = re.compile(r"\{([^{}|]*)\|([^{}|]*)\}")  # expand_template's '{pos|neg}' form
_READ_ERRORS = error_responses(404, 503)
_GGUF_BODY = {
    "requestBody": {
        "required": True,
        "description": "A control-vector GGUF file (repeng / llama.cpp layout) as raw bytes.",
        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}},
    }
}


class Pair(BaseModel):
    """One contrastive pair."""

    model_config = ConfigDict(extra="forbid")

    positive: StrictStr
    negative: StrictStr


class VectorCreate(BaseModel):
    """``POST /v1/control-vectors``. Exactly one of ``pairs`` / ``template``."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(description="Artifact name: ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    pairs: list[Pair] | None = Field(None, description="Contrastive (positive, negative) texts.")
    template: StrictStr | None = Field(
        None,
        description="A text with one '{}' filled from positive_words/negative_words (zipped), "
        "or with an inline '{positive|negative}' alternative.",
    )
    positive_words: list[StrictStr] = Field(default_factory=list)
    negative_words: list[StrictStr] = Field(default_factory=list)
    suffixes: list[StrictStr] | None = Field(
        None, description="Appended to every pair text; pairs × suffixes are used."
    )
    chat: StrictBool = Field(
        False,
        description="Wrap each text (before its suffix) as a user message in the model's chat "
        "template with the assistant turn opened; the suffix starts the answer.",
    )
    layers: list[Any] | None = Field(
        None, description="Block indices (0-based) to fit; default: every block but 0."
    )
    method: StrictStr = Field("pca_diff", description="pca_diff | pca_center | mean_diff")


def registry(state: ServerState) -> ArtifactRegistry[ControlVector]:
    """The loaded control vectors (attached with the model), or 503 while loading."""
    return artifact_registry(state.control_vectors)


def _known_geometry(state: ServerState) -> tuple[int, int] | None:
    """``(blocks, hidden size)`` of the serving model, None while loading."""
    geo = state.geometry
    return None if geo is None else (geo.num_layers, geo.hidden_size)


def _geometry(state: ServerState) -> tuple[int, int]:
    """``(blocks, hidden size)`` of the serving model, or 503 while loading."""
    geo = _known_geometry(state)
    if geo is None:
        raise APIError(503, "the server is still loading", headers={"Retry-After": "1"})
    return geo


class LayerSeparation(BaseModel):
    """One fitted layer's report (``processors.control.LayerFit.report``)."""

    layer: int
    separation: float
    accuracy: float
    gap: float
    explained: float


class ControlVectorCard(BaseModel):
    """A stored control vector (``GET /v1/control-vectors/{name}``); the build facts
    are there when the vector has them (an imported GGUF has no separation)."""

    name: str
    object: Literal["control_vector"] = "control_vector"
    layers: list[int]
    hidden_size: int
    model_hint: str
    norms: dict[str, float] = Field(description="Each layer's direction norm (layer → L2).")
    compatible: bool | None = Field(
        None, description="Whether the serving model can apply it (hidden size, layers)."
    )
    source: str | None = Field(None, description="extracted | gguf")
    method: str | None = None
    pairs: int | None = None
    separation: list[LayerSeparation] | None = Field(
        None, description="How well each fitted layer's direction separates the pairs."
    )
    best_layers: list[int] | None = None
    build_seconds: float | None = None
    created_at: float | None = Field(None, description=STORED_AT)
    file_bytes: int | None = None
    sha256: str | None = None


class ControlVectorList(BaseModel):
    """``GET /v1/control-vectors``."""

    object: Literal["list"] = "list"
    data: list[ControlVectorCard]
    skipped: list[Skipped]


# The card keys copied from a vector's stored ``info`` (hand-editable: see build_card).
_VECTOR_FACTS = frozenset({"source", "method", "pairs", "separation", "best_layers",
                           "build_seconds"})


def vector_card(
    reg: ArtifactRegistry[ControlVector], vec: ControlVector, geometry: tuple[int, int] | None
) -> ControlVectorCard:
    """The description of a vector (``GET /v1/control-vectors/{name}``)."""
    info = dict(vec.info)
    card: dict[str, Any] = {
        "name": vec.name,
        "object": "control_vector",
        "layers": list(vec.layers),
        "hidden_size": vec.hidden_size,
        "model_hint": vec.model_hint,
        "norms": {str(k): float((v.astype("float64") ** 2).sum() ** 0.5)
                  for k, v in vec.directions.items()},
    }
    if geometry is not None:
        L, D = geometry
        card["compatible"] = vec.hidden_size == D and max(vec.layers) < L
    for key in sorted(_VECTOR_FACTS):
        if key in info:
            card[key] = info[key]
    card.update(record_fields(reg, vec.name))
    return build_card(ControlVectorCard, card, _VECTOR_FACTS, vec.name)


_bad = bad


def _base_lengths(body: VectorCreate) -> list[tuple[int, int]]:
    """``(len(positive), len(negative))`` of every base pair the body describes, from
    the parts alone (nothing is built); the checks ``expand_template`` would make."""
    if (body.pairs is None) == (body.template is None):
        raise _bad("pairs", "give exactly one of 'pairs' or 'template'")
    if body.pairs is not None:
        if body.positive_words or body.negative_words:
            raise _bad("positive_words", "'positive_words'/'negative_words' go with 'template'")
        if not body.pairs:
            raise _bad("pairs", "'pairs' must not be empty")
        return [(len(p.positive), len(p.negative)) for p in body.pairs]
    assert body.template is not None
    template, pos, neg = body.template, body.positive_words, body.negative_words
    if not pos and not neg:
        m = _INLINE.search(template)
        if m is None:
            raise _bad("template", "the template needs '{}' with word lists, or "
                       "'{positive|negative}'")
        rest = len(template) - len(m.group(0))
        if template[: m.start()].count("{}") + template[m.end():].count("{}") != 0:
            raise _bad("template", "the template must contain exactly one '{}' placeholder")
        return [(rest + len(m.group(1)), rest + len(m.group(2)))]
    if len(pos) != len(neg):
        raise _bad("template", f"positive_words and negative_words must have one length, "
                   f"got {len(pos)} and {len(neg)}")
    if template.count("{}") != 1:
        raise _bad("template", "the template must contain exactly one '{}' placeholder")
    rest = len(template) - 2
    return [(rest + len(p), rest + len(q)) for p, q in zip(pos, neg, strict=True)]


def check_extraction_size(
    body: VectorCreate, tokenizer: Any, max_chars: int
) -> None:
    """Refuse an extraction that is too big from arithmetic alone (413), before any
    text is built or tokenized: at most ``MAX_PAIRS`` pairs × suffixes, at most
    ``max_chars`` characters over all texts, and no text so long that it must exceed
    ``MAX_TEXT_TOKENS`` tokens (no token covers more than the vocabulary's longest
    entry). The chat wrapper's length is measured once on an empty message."""
    base = _base_lengths(body)
    suffixes = body.suffixes if body.suffixes is not None else [""]
    if not suffixes:
        raise _bad("suffixes", "'suffixes' must not be empty (omit it for none)")
    n = len(base) * len(suffixes)
    if n > MAX_PAIRS:
        raise _bad("pairs", f"{n} pairs requested; the limit is {MAX_PAIRS}", 413)
    overhead = len(_wrapper(body, tokenizer)("")) if body.chat else 0
    suffix_chars = sum(len(x) for x in suffixes)
    total = len(suffixes) * sum(p + q + 2 * overhead for p, q in base) + 2 * len(base) * (
        suffix_chars
    )
    if total > max_chars:
        raise _bad("pairs", f"the extraction would build {total} characters of text; the "
                   f"limit (max_extraction_chars) is {max_chars}", 413)
    longest = overhead + max(max(p, q) for p, q in base) + max(len(x) for x in suffixes)
    cap = MAX_TEXT_TOKENS * longest_token_chars(tokenizer)
    if longest > cap:
        raise _bad("pairs", f"a pair text would have {longest} characters, more than "
                   f"{MAX_TEXT_TOKENS} tokens can hold ({cap}); the limit is "
                   f"{MAX_TEXT_TOKENS} tokens per text", 413)


def _wrapper(body: VectorCreate, tokenizer: Any) -> Any:
    """The function that chat-wraps one text (identity without ``chat``)."""
    if not body.chat:
        return lambda text: text
    if not getattr(tokenizer, "chat_template", None):
        raise _bad("chat", "this model has no chat template; send 'chat': false")

    def wrap(text: str) -> str:
        return str(tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        ))

    return wrap


def _texts(body: VectorCreate, tokenizer: Any) -> list[tuple[str, str]]:
    """The (positive, negative) texts the body describes, chat-wrapped if asked
    (call :func:`check_extraction_size` first: this builds them)."""
    if body.pairs is not None:
        base = [(p.positive, p.negative) for p in body.pairs]
    else:
        assert body.template is not None
        try:
            base = expand_template(body.template, body.positive_words, body.negative_words)
        except ValueError as err:
            raise _bad("template", str(err)) from None
        if not base:
            raise _bad("positive_words", "the word lists must not be empty")
    suffixes = body.suffixes if body.suffixes is not None else [""]
    wrap = _wrapper(body, tokenizer)
    return [(wrap(p) + s, wrap(q) + s) for s in suffixes for p, q in base]


def _encode(tokenizer: Any, texts: list[str], chat: bool) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=not chat, return_attention_mask=False)["input_ids"]
    for i, row in enumerate(ids):
        which = f"pair {i // 2} ({'positive' if i % 2 == 0 else 'negative'})"
        if len(row) < 2:
            # The last token is read; position 0 is an attention sink with an outlier norm
            # (~150× the others in SmolLM2) and says nothing about the contrast.
            raise _bad("pairs", f"{which} has {len(row)} token(s); at least 2 are needed")
        if len(row) > MAX_TEXT_TOKENS:
            raise _bad("pairs", f"{which} has {len(row)} tokens; the limit is {MAX_TEXT_TOKENS}",
                       413)
    return [list(r) for r in ids]


States = Callable[[list[list[int]], list[int], threading.Event | None], dict[int, torch.Tensor]]


def last_token_states(
    model: Any,
    prompts: list[list[int]],
    layers: list[int],
    batch_size: int = EXTRACT_BATCH,
    cancel: threading.Event | None = None,
) -> dict[int, torch.Tensor]:
    """Each block's output at the last token of every prompt: layer → ``(N, D)`` float32,
    run on the calling thread — for offline use (benchmarks, tests) where no engine
    decodes with this model; the server runs the same job through the engine
    (:func:`engine_states`). Stops between forwards once ``cancel`` is set."""
    hooks = ControlHooks.install(model)
    job = ExtractionJob(prompts, tuple(layers), batch_size)
    while not job.finished:
        check_cancelled(cancel)
        job.run_chunk(model, hooks, max_tokens=batch_size * MAX_TEXT_TOKENS)
    return job.wait()


def engine_states(
    state: ServerState,
    engine: Engine,
    prompts: list[list[int]],
    layers: list[int],
    cancel: threading.Event | None = None,
) -> dict[int, torch.Tensor]:
    """:func:`last_token_states` as an engine job (``server.engine.extract``): queued
    with the requests (a full queue is the 429 a generation gets, a stopped engine the
    503), its forwards run by the engine thread between decode steps, and abandoned —
    before its next forward — once ``cancel`` is set (disconnect, ``build_timeout_s``).
    Blocks the calling (build worker) thread until the job resolves."""
    job = ExtractionJob(prompts, tuple(layers), cancel=cancel or threading.Event())
    with engine_errors(state):
        engine.submit_job(job)
        try:
            return job.wait()
        except JobCancelled:
            raise BuildCancelled from None


def extract_vector(
    body: VectorCreate,
    layers: list[int],
    model: Any,
    tokenizer: Any,
    cancel: threading.Event | None = None,
    states_of: States | None = None,
) -> ControlVector:
    """Tokenize the pairs, run them, fit one direction per layer (not yet stored).
    ``states_of(ids, layers, cancel)`` runs the forwards (the server passes
    :func:`engine_states`; default :func:`last_token_states` on this thread). Stops at
    the next stage once ``cancel`` is set."""
    t0 = time.perf_counter()
    pairs = _texts(body, tokenizer)
    flat = [t for pair in pairs for t in pair]  # positive, negative, positive, ...
    check_cancelled(cancel)
    ids = _encode(tokenizer, flat, body.chat)
    log.info("control vector '%s': %d pairs, %d layers, %s", body.name, len(pairs), len(layers),
             body.method)
    if states_of is None:
        states = last_token_states(model, ids, layers, cancel=cancel)
    else:
        states = states_of(ids, layers, cancel)
    pos = {k: v[0::2] for k, v in states.items()}
    neg = {k: v[1::2] for k, v in states.items()}
    fits = fit_layers(pos, neg, body.method)
    separation = [{"layer": k, **f.report()} for k, f in fits.items()]
    best = sorted(fits, key=lambda k: -fits[k].separation)[:3]
    info = {
        "source": "extracted",
        "method": body.method,
        "pairs": len(pairs),
        "separation": separation,
        "best_layers": sorted(best),
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    model_hint = str(getattr(model.config, "model_type", ""))
    return ControlVector(body.name, {k: f.vector for k, f in fits.items()}, model_hint, info)


def _layers(body: VectorCreate, num_layers: int) -> list[int]:
    if body.layers is None:
        return list(range(1, num_layers)) or [0]
    try:
        layers = list(check_layers(body.layers, "layers"))
    except ParamError as err:
        raise APIError.from_param_error(err) from None
    bad = [x for x in layers if x >= num_layers]
    if bad:
        raise _bad("layers", f"layer {bad[0]} does not exist: the model has {num_layers} blocks "
                   f"(0-{num_layers - 1})")
    return layers


@router.post("/v1/control-vectors", status_code=201, response_model=ControlVectorCard,
             responses=_ERRORS)
async def create_vector(body: VectorCreate, request: Request, state: StateDep) -> JSONResponse:
    """Extract a control vector from contrastive pairs (201, with per-layer separation)."""
    bundle, engine, _ = state.ready()
    reg = registry(state)
    geometry = _geometry(state)
    check_artifact_name(body.name)
    if body.method not in METHODS:
        raise _bad("method", f"'method' must be one of {', '.join(METHODS)}, got {body.method!r}")
    layers = _layers(body, geometry[0])
    try:
        with reg.reserve(body.name):  # 409 before any work, across replicas too
            check_extraction_size(body, bundle.tokenizer, state.settings.max_extraction_chars)
            check_budget_room(state)
            vec = await run_build(
                state, request, f"control vector '{body.name}'",
                lambda cancel: extract_vector(
                    body, layers, bundle.model, bundle.tokenizer, cancel,
                    states_of=lambda ids, ls, c: engine_states(state, engine, ids, ls, c),
                ),
            )
            stored = await store_artifact(state, reg, body.name, vec)
    except ArtifactExistsError as err:
        raise _bad("name", str(err), 409) from None
    log.info("control vector '%s': stored (%d bytes) after %.2f s", body.name, stored.bytes,
             vec.info["build_seconds"])
    return wire(vector_card(reg, vec, geometry), 201)


@router.put("/v1/control-vectors/{name}/gguf", status_code=201,
            response_model=ControlVectorCard, responses=_ERRORS, openapi_extra=_GGUF_BODY)
async def import_gguf(name: str, request: Request, state: StateDep) -> JSONResponse:
    """Import a control-vector GGUF file sent as the raw body (201).

    Order matters: the name is checked and reserved (409) before the body is read; the
    body is bounded by what a file for this model's geometry can need (413); its header
    counts are scanned before the GGUF parser runs (``read_control_gguf``)."""
    state.ready()
    reg = registry(state)
    geometry = _geometry(state)
    check_artifact_name(name)
    limit = max_control_gguf_bytes(*geometry)
    try:
        with reg.reserve(name):
            data = await _bounded_body(request, limit)
            if not data:
                raise _bad("body", "the body is empty; send the GGUF file as the raw request "
                           "body")
            check_budget_room(state)

            def parse(cancel: threading.Event) -> ControlVector:
                return read_control_gguf(data, name, num_layers=geometry[0],
                                         hidden_size=geometry[1])

            try:
                vec = await run_build(state, request, f"control vector '{name}'", parse)
            except GGUFFormatError as err:
                raise _bad("body", f"not a usable control-vector GGUF file: {err}") from None
            vec.info.update(source="gguf", bytes=len(data))
            await store_artifact(state, reg, name, vec)
    except ArtifactExistsError as err:
        raise _bad("name", str(err), 409) from None
    return wire(vector_card(reg, vec, geometry), 201)


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The raw body, or 413 as soon as it is known to exceed ``limit`` bytes (from
    Content-Length, else while streaming: nothing past the limit is buffered)."""
    too_big = _bad("body", f"a control-vector GGUF file for this model is at most {limit} "
                   "bytes (its layers x hidden size, plus header room)", 413)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _lookup(reg: ArtifactRegistry[ControlVector], name: str) -> ControlVector:
    return artifact_or_404(reg, name, "control vector")


@router.get("/v1/control-vectors/{name}/gguf", responses={**_READ_ERRORS, 200: {
    "content": {"application/octet-stream": {}}}})
async def export_gguf(name: str, state: StateDep) -> Response:
    """Export a vector as a GGUF file (repeng / llama.cpp layout)."""
    vec = _lookup(registry(state), name)
    data = await run_in_threadpool(write_control_gguf, vec)
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{name}.gguf"'},
    )


@router.get("/v1/control-vectors", response_model=ControlVectorList,
            responses=error_responses(503))
async def list_vectors(state: StateDep) -> JSONResponse:
    """Every loaded vector, and the artifacts skipped as corrupt (name and reason)."""
    reg = registry(state)
    geometry = _known_geometry(state)
    cards, skipped = await list_artifacts(reg, lambda vec: vector_card(reg, vec, geometry))
    return wire(ControlVectorList(object="list", data=cards, skipped=skipped))


@router.get("/v1/control-vectors/{name}", response_model=ControlVectorCard,
            responses=_READ_ERRORS)
async def get_vector(name: str, state: StateDep) -> JSONResponse:
    """One vector: layers, hidden size, norms, method and per-layer separation."""
    reg = registry(state)
    geometry = _known_geometry(state)
    return wire(vector_card(reg, _lookup(reg, name), geometry))


@router.delete("/v1/control-vectors/{name}", response_model=Deleted, responses=_READ_ERRORS)
async def delete_vector(name: str, state: StateDep) -> JSONResponse:
    """Delete a vector (also one skipped as corrupt). Running requests keep theirs."""
    return await delete_artifact(registry(state), name, "control vector", "control_vector")
