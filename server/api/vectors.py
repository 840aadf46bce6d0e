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
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from processors.base import ParamError
from processors.control import (
    GEOMETRY,
    METHODS,
    RESOURCE,
    ControlVector,
    check_layers,
    expand_template,
    fit_layers,
)
from processors.control_gguf import GGUFFormatError, read_control_gguf, write_control_gguf
from server.api.errors import APIError, artifact_or_404, error_responses
from server.api.protocol import StrictBool, StrictStr
from server.api.state import ServerState, StateDep
from server.artifacts import (
    ArtifactExistsError,
    ArtifactNotFoundError,
    ArtifactRegistry,
    InvalidNameError,
    check_name,
)
from server.engine.hooks import ControlHooks
from server.engine.padding import attention_mask_4d, left_pad, model_takes_4d_mask

log = logging.getLogger("steerserve.control")
router = APIRouter()

MAX_PAIRS = 1024  # pairs per extraction (texts run = 2 × pairs); more is a 413
MAX_TEXT_TOKENS = 512  # tokens per pair text
EXTRACT_BATCH = 16  # texts per forward
_ERRORS = error_responses(400, 409, 413, 503, 507)  # POST/PUT (507: disk full)
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
    reg = state.resources.get(RESOURCE)
    if reg is None:
        raise APIError(503, "the server is still loading", headers={"Retry-After": "1"})
    return reg


def _geometry(state: ServerState) -> tuple[int, int]:
    geo = state.resources.get(GEOMETRY) or {}
    return int(geo["num_layers"]), int(geo["hidden_size"])


def vector_card(
    reg: ArtifactRegistry[ControlVector], vec: ControlVector, geometry: tuple[int, int] | None
) -> dict[str, Any]:
    """The JSON description of a vector (``GET /v1/control-vectors/{name}``)."""
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
    for key in ("source", "method", "pairs", "separation", "best_layers", "build_seconds"):
        if key in info:
            card[key] = info[key]
    try:
        rec = reg.record(vec.name)
        card.update(created_at=rec.created_at, file_bytes=rec.bytes, sha256=rec.sha256)
    except KeyError:
        pass
    return card


def _bad(param: str, message: str, status: int = 400) -> APIError:
    return APIError(status, message, param=param)


def _check_name(name: str) -> None:
    try:
        check_name(name)
    except InvalidNameError as err:
        raise _bad("name", str(err)) from None


def _texts(body: VectorCreate, tokenizer: Any) -> list[tuple[str, str]]:
    """The (positive, negative) texts the body describes, chat-wrapped if asked."""
    if (body.pairs is None) == (body.template is None):
        raise _bad("pairs", "give exactly one of 'pairs' or 'template'")
    if body.pairs is not None:
        if body.positive_words or body.negative_words:
            raise _bad("positive_words", "'positive_words'/'negative_words' go with 'template'")
        base = [(p.positive, p.negative) for p in body.pairs]
        if not base:
            raise _bad("pairs", "'pairs' must not be empty")
    else:
        assert body.template is not None
        try:
            base = expand_template(body.template, body.positive_words, body.negative_words)
        except ValueError as err:
            raise _bad("template", str(err)) from None
        if not base:
            raise _bad("positive_words", "the word lists must not be empty")
    suffixes = body.suffixes if body.suffixes is not None else [""]
    if not suffixes:
        raise _bad("suffixes", "'suffixes' must not be empty (omit it for none)")
    n = len(base) * len(suffixes)
    if n > MAX_PAIRS:
        raise _bad("pairs", f"{n} pairs requested; the limit is {MAX_PAIRS}", 413)
    if body.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise _bad("chat", "this model has no chat template; send 'chat': false")

        def wrap(text: str) -> str:
            return str(tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            ))
    else:

        def wrap(text: str) -> str:
            return text

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


@torch.inference_mode()
def last_token_states(
    model: Any, prompts: list[list[int]], layers: list[int], batch_size: int = EXTRACT_BATCH
) -> dict[int, torch.Tensor]:
    """Each block's output at the last token of every prompt: layer → ``(N, D)`` float32.

    Prompts run in left-padded batches with an explicit attention mask and position ids
    from it (so padding never shifts positions). This runs on a worker thread, beside the
    engine: the hooks' steering state is per thread, so neither sees the other's.
    """
    hooks = ControlHooks.install(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(prompts), batch_size):
        padded = left_pad(prompts[start : start + batch_size], device)
        # Always the 4-D mask (no cache here, so a None mask would make transformers
        # inspect the position ids on the host); no query row is fully masked.
        mask: torch.Tensor = padded.mask
        if model_takes_4d_mask(model.config):
            mask = attention_mask_4d(padded.mask, padded.mask.shape[1], dtype)
        with hooks.capture(layers) as states:
            model(input_ids=padded.ids, attention_mask=mask, position_ids=padded.positions,
                  use_cache=False, logits_to_keep=1)
        for layer in layers:
            out[layer].append(states[layer].cpu())
    return {layer: torch.cat(parts, dim=0) for layer, parts in out.items()}


def extract_vector(
    body: VectorCreate, layers: list[int], model: Any, tokenizer: Any
) -> ControlVector:
    """Tokenize the pairs, run them, fit one direction per layer (not yet stored)."""
    t0 = time.perf_counter()
    pairs = _texts(body, tokenizer)
    flat = [t for pair in pairs for t in pair]  # positive, negative, positive, ...
    ids = _encode(tokenizer, flat, body.chat)
    log.info("control vector '%s': %d pairs, %d layers, %s", body.name, len(pairs), len(layers),
             body.method)
    states = last_token_states(model, ids, layers)
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


@router.post("/v1/control-vectors", status_code=201, responses=_ERRORS)
async def create_vector(body: VectorCreate, state: StateDep) -> JSONResponse:
    """Extract a control vector from contrastive pairs (201, with per-layer separation)."""
    bundle, _, _ = state.ready()
    reg = registry(state)
    geometry = _geometry(state)
    _check_name(body.name)
    if body.method not in METHODS:
        raise _bad("method", f"'method' must be one of {', '.join(METHODS)}, got {body.method!r}")
    layers = _layers(body, geometry[0])
    try:
        with reg.reserve(body.name):
            vec = await run_in_threadpool(
                extract_vector, body, layers, bundle.model, bundle.tokenizer
            )
            stored = await run_in_threadpool(reg.add, body.name, vec)
    except ArtifactExistsError as err:
        raise _bad("name", str(err), 409) from None
    log.info("control vector '%s': stored (%d bytes) after %.2f s", body.name, stored.bytes,
             vec.info["build_seconds"])
    return JSONResponse(vector_card(reg, vec, geometry), status_code=201)


@router.put("/v1/control-vectors/{name}/gguf", status_code=201, responses=_ERRORS,
            openapi_extra=_GGUF_BODY)
async def import_gguf(name: str, request: Request, state: StateDep) -> JSONResponse:
    """Import a control-vector GGUF file sent as the raw body (201)."""
    state.ready()
    reg = registry(state)
    geometry = _geometry(state)
    _check_name(name)
    data = await request.body()
    if not data:
        raise _bad("body", "the body is empty; send the GGUF file as the raw request body")
    try:
        vec = await run_in_threadpool(
            read_control_gguf, data, name, num_layers=geometry[0], hidden_size=geometry[1]
        )
    except GGUFFormatError as err:
        raise _bad("body", f"not a usable control-vector GGUF file: {err}") from None
    vec.info.update(source="gguf", bytes=len(data))
    try:
        with reg.reserve(name):
            await run_in_threadpool(reg.add, name, vec)
    except ArtifactExistsError as err:
        raise _bad("name", str(err), 409) from None
    return JSONResponse(vector_card(reg, vec, geometry), status_code=201)


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


@router.get("/v1/control-vectors", responses=error_responses(503))
async def list_vectors(state: StateDep) -> dict[str, Any]:
    """Every loaded vector, and the artifacts skipped as corrupt (name and reason)."""
    reg = registry(state)
    await run_in_threadpool(reg.refresh)  # replicas sharing the volume may have added some
    geometry = _geometry(state) if state.resources.get(GEOMETRY) else None
    return {
        "object": "list",
        "data": [vector_card(reg, reg[name], geometry) for name in reg],
        "skipped": [{"name": k, "reason": v} for k, v in sorted(reg.corrupt.items())],
    }


@router.get("/v1/control-vectors/{name}", responses=_READ_ERRORS)
async def get_vector(name: str, state: StateDep) -> dict[str, Any]:
    """One vector: layers, hidden size, norms, method and per-layer separation."""
    reg = registry(state)
    geometry = _geometry(state) if state.resources.get(GEOMETRY) else None
    return vector_card(reg, _lookup(reg, name), geometry)


@router.delete("/v1/control-vectors/{name}", responses=_READ_ERRORS)
async def delete_vector(name: str, state: StateDep) -> dict[str, Any]:
    """Delete a vector (also one skipped as corrupt). Running requests keep theirs."""
    reg = registry(state)
    try:
        check_name(name)
        await run_in_threadpool(reg.remove, name)
    except (InvalidNameError, ArtifactNotFoundError):
        raise _bad("name", f"unknown control vector '{name}'", 404) from None
    return {"name": name, "object": "control_vector", "deleted": True}
