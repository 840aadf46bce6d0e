"""Native endpoints: ``/v1/generate``, ``/v1/models``, ``/health``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import PurePath
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.api.convert import to_generation_request
from server.api.disconnect import cancel_on_disconnect, peek_first
from server.api.errors import APIError, error_responses
from server.api.protocol import (
    GenerateRequest,
    GenerateResponse,
    Health,
    HealthStatus,
    ModelCard,
    ModelList,
    StreamEvent,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from server.api.state import EventStream, StateDep, submit
from server.engine.types import EngineEvent, ErrorEvent, FinishEvent, TokenEvent

router = APIRouter()

ERROR_RESPONSES = error_responses(400, 404, 413, 429, 503)


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event frame."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def usage_of(ev: FinishEvent) -> Usage:
    """The token counts of a finished request (native response and final stream frame)."""
    return Usage(
        prompt_tokens=ev.prompt_tokens,
        completion_tokens=ev.completion_tokens,
        total_tokens=ev.prompt_tokens + ev.completion_tokens,
    )


def logprob_entries(ev: TokenEvent) -> list[TokenLogprob]:
    """The native wire form of a token event's logprobs (aligned with its token ids)."""
    return [
        TokenLogprob(token_id=t, logprob=lp.logprob,
                     top=[TopLogprob(token_id=a, logprob=v) for a, v in lp.top])
        for t, lp in zip(ev.token_ids, ev.logprobs or (), strict=False)
    ]


def error_payload(ev: ErrorEvent) -> dict[str, Any]:
    """An engine error as the envelope (sent in-band when a stream already started)."""
    return APIError(ev.code, ev.message, type=ev.type).body()


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def generate(body: GenerateRequest, request: Request, state: StateDep) -> Any:
    """Generate from one prompt with a per-request steering stack (SSE with stream)."""
    bundle, engine, env = state.ready()
    req = await run_in_threadpool(
        lambda: to_generation_request(body, bundle, state.settings, env, aux=state.aux)
    )
    stream = submit(state, engine, req)
    model = bundle.name

    if body.stream:
        # Headers wait for the first engine event, so an error before any token (e.g. a
        # stack that made the logits non-finite: 422) is the response's status.
        first, events = await peek_first(request, stream.events(), stream.cancel)
        if isinstance(first, ErrorEvent):
            stream.cancel()
            raise APIError(first.code, first.message, type=first.type)
        return StreamingResponse(
            _stream_frames(stream, req.request_id, model, req.warnings, events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async with cancel_on_disconnect(request, stream.cancel):
        response = await collect(stream, req.request_id, model, req.warnings)
    return JSONResponse(response.model_dump(exclude_none=True))


async def collect(
    stream: EventStream, request_id: str, model: str, warnings: tuple[str, ...] = ()
) -> GenerateResponse:
    """Wait for a request's events and assemble the non-streaming response."""
    tokens: list[int] = []
    text: list[str] = []
    logprobs: list[TokenLogprob] | None = None
    async for ev in stream.events():
        if isinstance(ev, TokenEvent):
            tokens.extend(ev.token_ids)
            text.append(ev.text)
            if ev.logprobs is not None:
                logprobs = [] if logprobs is None else logprobs
                logprobs.extend(logprob_entries(ev))
        elif isinstance(ev, FinishEvent):
            text.append(ev.text)
            return GenerateResponse(
                id=request_id,
                model=model,
                text="".join(text),
                token_ids=tokens,
                finish_reason=ev.finish_reason,
                usage=usage_of(ev),
                diagnostics=ev.diagnostics,
                receipt=ev.receipt,
                logprobs=logprobs,
                warnings=list(warnings) or None,
            )
        else:
            assert isinstance(ev, ErrorEvent)
            raise APIError(ev.code, ev.message, type=ev.type)
    raise APIError(500, "the engine ended the request without a result")


async def _stream_frames(
    stream: EventStream, request_id: str, model: str, warnings: tuple[str, ...] = (),
    events: AsyncIterator[EngineEvent] | None = None,
) -> AsyncIterator[bytes]:
    """SSE frames (each a :class:`StreamEvent`) for one request (``events``: the
    request's events when the caller already peeked at them); cancels the engine row if
    the client disconnects."""
    try:
        async for ev in events if events is not None else stream.events():
            if isinstance(ev, TokenEvent):
                yield stream_frame(StreamEvent(
                    id=request_id, model=model, text=ev.text, token_ids=list(ev.token_ids),
                    logprobs=None if ev.logprobs is None else logprob_entries(ev),
                ))
            elif isinstance(ev, FinishEvent):
                yield stream_frame(StreamEvent(
                    id=request_id, model=model, text=ev.text, token_ids=[],
                    finish_reason=ev.finish_reason,
                    usage=usage_of(ev),
                    diagnostics=ev.diagnostics,
                    receipt=ev.receipt,
                    warnings=list(warnings) or None,
                ))
            else:
                assert isinstance(ev, ErrorEvent)
                yield sse(error_payload(ev))
        yield sse("[DONE]")
    finally:
        stream.cancel()


def public_source(source: str) -> str:
    """What ``/v1/models`` says about where a model came from: ``embedded:``/``random:``
    sources as they are, a filesystem path only by its last component (the layout of
    the server's disks is not the client's business)."""
    if source.startswith(("embedded:", "random:")):
        return source
    return PurePath(source.rstrip("/\\")).name or "local"


def stream_frame(event: StreamEvent) -> bytes:
    """One ``StreamEvent`` as an SSE frame: ``finish_reason`` is always present (``null``
    until the last frame); the optional extras only when set."""
    extras = ("usage", "diagnostics", "receipt", "logprobs", "warnings")
    return sse(event.model_dump(exclude={k for k in extras if getattr(event, k) is None}))


@router.get("/v1/models", response_model=ModelList, responses=error_responses(503))
async def list_models(state: StateDep) -> ModelList:
    """The main model and every auxiliary (fusion) model with its role and vocabulary."""
    bundle, _, env = state.ready()
    card = ModelCard(
        id=bundle.name,
        role="main",
        source=public_source(bundle.source),
        vocab_size=bundle.vocab_size,
        context_length=bundle.context_length,
        tokenizer_fingerprint=env.tokenizer_fingerprint,
        dtype=bundle.dtype,
        device=bundle.device,
        weights=bundle.weights,
    )
    aux = [
        ModelCard(
            id=a.name,
            role=a.role,
            source=public_source(a.bundle.source),
            vocab_size=a.bundle.vocab_size,
            context_length=a.bundle.context_length,
            tokenizer_fingerprint=a.fingerprint,
            dtype=a.bundle.dtype,
            device=a.bundle.device,
            weights=a.bundle.weights,
        )
        for a in state.aux
    ]
    return ModelList(data=[card, *aux])


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(state: StateDep) -> JSONResponse:
    """200 when the engine is ready; 503 while loading, draining or after a failure."""
    engine = state.engine
    status: HealthStatus
    detail: str | None
    if state.status == "ok" and engine is not None and not engine.alive:
        status, detail = "error", engine.dead or "the engine stopped"
    else:
        status, detail = state.status, state.detail
    body = Health(
        status=status,
        model=state.bundle.name if state.bundle else None,
        weights=state.bundle.weights if state.bundle else None,
        detail=detail,
        running=engine.running if engine else 0,
        waiting=engine.waiting if engine else 0,
    )
    code = 200 if status == "ok" else 503
    return JSONResponse(body.model_dump(exclude_none=True), status_code=code)
