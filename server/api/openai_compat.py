"""OpenAI-compatible endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Each request becomes one native :class:`GenerateRequest` per prompt, which goes through
the same conversion as ``/v1/generate`` (``server.api.convert``: chat template, limits,
steering validation). ``n`` choices become ``n`` engine requests submitted together with
``Engine.submit_many``, so that they share one prefill; with a ``seed`` choice ``i`` uses
``seed + i``. OpenAI's ``logit_bias`` is the ``logit_bias`` steering processor, placed
first in the stack.

Logprobs are ``log_softmax`` of the *steered* logits (after the steering stack, before
the sampler's penalties, temperature and top-k/top-p/min-p truncation), see
``server.engine.types.TokenLogprob``.

Streaming answers are SSE chunks in OpenAI's shapes ending with ``data: [DONE]``; an
error after the stream began is sent in-band as ``data: {"error": ...}`` before it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from processors.base import ProcessorEnv
from server.api.convert import to_generation_request
from server.api.disconnect import cancel_on_disconnect, peek_first
from server.api.errors import APIError, clip, validation_error
from server.api.openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    UsageOut,
)
from server.api.protocol import ChatMessage, GenerateRequest
from server.api.routes import ERROR_RESPONSES, sse
from server.api.state import ServerState, StateDep, submit_all
from server.engine import Engine, GenerationRequest
from server.engine.types import (
    EngineEvent,
    ErrorEvent,
    FinishEvent,
    RequestHandle,
    TokenEvent,
    TokenLogprob,
)
from server.loading import ModelBundle

log = logging.getLogger("steerserve.openai")
router = APIRouter()

Kind = Literal["completion", "chat"]
_SEED_MOD = 2**63
_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way
_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {"content": {"text/event-stream": {}}},
}


# ----------------------------------------------------------------- conversion
def _check_model(name: str, bundle: ModelBundle) -> None:
    """``model`` must name the served model (its API name or its source)."""
    if name not in (bundle.name, bundle.source):
        raise APIError(
            404,
            f"the model '{name}' does not exist; this server serves '{bundle.name}'",
            param="model",
            code="model_not_found",
        )


def _ignored_fields(body: CompletionRequest | ChatCompletionRequest) -> list[str]:
    """The OpenAI fields we accept but do not implement (unknown extras), sorted."""
    return sorted(body.model_extra or {})


def _note_ignored(body: CompletionRequest | ChatCompletionRequest, endpoint: str) -> None:
    """Log the OpenAI fields we accept but do not implement (as vLLM does)."""
    ignored = _ignored_fields(body)
    if ignored:
        # Field names are the client's text: escaped and clipped so none forges a log line.
        shown = ", ".join(clip(k, 64) for k in ignored[:20])
        more = f" (+{len(ignored) - 20} more)" if len(ignored) > 20 else ""
        log.info("%s: ignoring unsupported fields %s%s", endpoint, shown, more)


def _common(
    body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None
) -> dict[str, Any]:
    """The native request fields both endpoints share."""
    steering: list[dict[str, Any]] = [e.model_dump() for e in body.steering]
    if body.logit_bias:
        steering.insert(0, {"type": "logit_bias", "bias": dict(body.logit_bias)})
    return {
        "max_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "stop": body.stop,
        "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos,
        "min_tokens": body.min_tokens,
        "steering": steering,
        "diagnostics": body.diagnostics,
    }


def _validate_native(fields: dict[str, Any]) -> GenerateRequest:
    """The native wire model, with its validation errors as 400s naming the field."""
    try:
        return GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _chat_messages(body: ChatCompletionRequest) -> list[ChatMessage]:
    """OpenAI messages → the native turns the chat template renders."""
    out = []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list):
            parts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise APIError(
                        400,
                        f"only text content parts are supported, got type '{part.type}'",
                        param=f"messages.{i}.content.{j}.type",
                    )
                parts.append(part.text)
            content = "".join(parts)
        else:
            content = m.content or ""
        role = "system" if m.role == "developer" else m.role
        out.append(ChatMessage(role=role, content=content))
    return out


def _remap_param(err: APIError, has_bias: bool) -> APIError:
    """Name OpenAI's fields in errors: the prepended logit_bias entry is ``logit_bias``."""
    p = err.param or ""
    if has_bias and p.startswith("steering."):
        head, _, rest = p.partition(".")[2].partition(".")
        if head == "0":
            rest = rest.removeprefix("bias").lstrip(".")
            err.param = "logit_bias" + (f".{rest}" if rest else "")
        elif head.isdigit():
            err.param = f"steering.{int(head) - 1}" + (f".{rest}" if rest else "")
    return err


@dataclass(frozen=True)
class _Plan:
    """What one OpenAI call asks of the engine."""

    requests: list[GenerationRequest]
    n_prompts: int
    logprobs: int | None
    include_usage: bool
    stream: bool


def _plan(
    kind: Kind,
    body: CompletionRequest | ChatCompletionRequest,
    bundle: ModelBundle,
    state: ServerState,
    env: ProcessorEnv,
    base_id: str,
) -> _Plan:
    """Validate and convert (runs on a worker thread: it tokenizes)."""
    s = state.settings
    if body.n > s.max_n:
        raise APIError(400, f"'n' must be at most {s.max_n}, got {body.n}", param="n")
    if body.stream_options is not None and not body.stream:
        raise APIError(
            400, "'stream_options' is only allowed with stream: true", param="stream_options"
        )
    natives: list[GenerateRequest]
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise APIError(400, "'echo' is not supported", param="echo")
        if body.suffix:
            raise APIError(400, "'suffix' is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "'best_of' must equal 'n' (or be omitted)", param="best_of")
        prompts = _prompt_list(body.prompt)
        if len(prompts) > s.max_prompts:
            raise APIError(
                400, f"at most {s.max_prompts} prompts per request, got {len(prompts)}",
                param="prompt",
            )
        common = _common(body, body.max_tokens)
        natives = [_validate_native({**common, "prompt": p}) for p in prompts]
        logprobs = body.logprobs
    else:
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        max_tokens = body.max_completion_tokens or body.max_tokens
        natives = [_validate_native({**_common(body, max_tokens),
                                     "messages": _chat_messages(body)})]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    total = len(natives) * body.n
    if total > max(1, s.max_queue):  # could never be queued: retrying would not help
        raise APIError(
            400, f"{total} choices exceed the request queue ({s.max_queue})", param="n"
        )
    # Accepted but ignored fields are reported in the response's warnings, not only logged.
    ignored = tuple(
        f"{name}: accepted but ignored (not implemented by this server)"
        for name in _ignored_fields(body)
    )
    requests: list[GenerationRequest] = []
    for p, native in enumerate(natives):
        try:
            base = to_generation_request(native, bundle, s, env, request_id=base_id,
                                         aux=state.aux)
        except APIError as err:
            raise _remap_param(err, bool(body.logit_bias)) from None
        if ignored:
            base = replace(base, warnings=base.warnings + ignored)
        for i in range(body.n):
            seed = None if body.seed is None else (body.seed + i) % _SEED_MOD
            sampling = replace(base.sampling, seed=seed, logprobs=logprobs)
            requests.append(replace(base, request_id=f"{base_id}-{p * body.n + i}",
                                    sampling=sampling))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _Plan(requests, len(natives), logprobs, include_usage, body.stream)


def _prompt_list(prompt: str | list[int] | list[str] | list[list[int]]) -> list[Any]:
    """One entry per prompt: a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "'prompt' must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


# ------------------------------------------------------------------ the engine
class ChoiceStreams:
    """Events of several engine requests (the choices of one call) on one asyncio queue.

    The engine calls the per-choice sinks on its thread; they hop onto the event loop
    with ``call_soon_threadsafe`` (a closed loop raises, which the engine treats as a
    gone consumer).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, EngineEvent]] = asyncio.Queue()
        self.handles: list[RequestHandle] = []
        self.done = [False] * n

    def sink(self, index: int) -> Callable[[EngineEvent], None]:
        """The engine-side callback of choice ``index``."""

        def put(event: EngineEvent) -> None:
            if self.loop.is_closed():
                raise RuntimeError("event loop closed")
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return put

    async def events(self) -> AsyncIterator[tuple[int, EngineEvent]]:
        """``(choice index, event)`` until every choice finished or failed."""
        while not all(self.done):
            index, ev = await self.queue.get()
            if isinstance(ev, (FinishEvent, ErrorEvent)):
                self.done[index] = True
            yield index, ev

    def cancel(self) -> None:
        """Drop every choice still running (no-op for finished ones)."""
        for handle, done in zip(self.handles, self.done, strict=True):
            if not done:
                handle.cancel()


def _submit(state: ServerState, engine: Engine, requests: Sequence[GenerationRequest]
            ) -> ChoiceStreams:
    """Submit all choices atomically; a full queue is 429, a stopped engine 503."""
    streams = ChoiceStreams(asyncio.get_running_loop(), len(requests))
    streams.handles = submit_all(
        state, engine, [(r, streams.sink(i)) for i, r in enumerate(requests)]
    )
    return streams


# ------------------------------------------------------------------- formatting
class TokenStrings:
    """Token id → its text (as OpenAI reports logprob tokens), cached per call."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self.cache[token_id] = text
        return text


def _lp(value: float) -> float:
    """A JSON-safe logprob (no -inf)."""
    return max(float(value), _MIN_LOGPROB)


@dataclass
class _ChoiceState:
    """One choice being assembled."""

    text: list[str] = field(default_factory=list)
    logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)
    finish: FinishEvent | None = None
    offset: int = 0  # completions' text_offset of the next logprob token


def completion_logprobs(
    items: Sequence[tuple[int, TokenLogprob]], strings: TokenStrings, offset: int
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for these tokens."""
    tokens, values, tops, offsets = [], [], [], []
    for token_id, lp in items:
        s = strings(token_id)
        tokens.append(s)
        values.append(_lp(lp.logprob))
        tops.append({strings(t): _lp(v) for t, v in lp.top})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(
    items: Sequence[tuple[int, TokenLogprob]], strings: TokenStrings
) -> dict[str, Any]:
    """The chat ``logprobs`` object (``content``: one entry per token)."""

    def entry(token_id: int, value: float) -> dict[str, Any]:
        s = strings(token_id)
        return {"token": s, "logprob": _lp(value), "bytes": list(s.encode("utf-8"))}

    content = [
        {**entry(t, lp.logprob), "top_logprobs": [entry(a, v) for a, v in lp.top]}
        for t, lp in items
    ]
    return {"content": content, "refusal": None}


def _usage(states: Sequence[_ChoiceState], n: int) -> UsageOut:
    """Usage of a call: each prompt counted once, every choice's completion tokens."""
    prompt = sum(s.finish.prompt_tokens for s in states[::n] if s.finish)
    completion = sum(s.finish.completion_tokens for s in states if s.finish)
    return UsageOut(prompt_tokens=prompt, completion_tokens=completion,
                    total_tokens=prompt + completion)


def _logprob_items(ev: TokenEvent) -> list[tuple[int, TokenLogprob]]:
    """``(token id, logprob)`` pairs of an event (empty when none were asked for)."""
    if ev.logprobs is None:
        return []
    return list(zip(ev.token_ids, ev.logprobs, strict=True))


# ------------------------------------------------------------------- responses
async def _collect(
    kind: Kind, plan: _Plan, streams: ChoiceStreams, call_id: str, created: int,
    model: str, strings: TokenStrings,
) -> CompletionResponse | ChatCompletionResponse:
    """Wait for every choice and build the non-streaming response."""
    states = [_ChoiceState() for _ in plan.requests]
    async for i, ev in streams.events():
        st = states[i]
        if isinstance(ev, TokenEvent):
            st.text.append(ev.text)
            st.logprobs.extend(_logprob_items(ev))
        elif isinstance(ev, FinishEvent):
            st.text.append(ev.text)
            st.finish = ev
        else:
            streams.cancel()
            raise APIError(ev.code, ev.message, type=ev.type)
    finished: list[tuple[int, str, FinishEvent, dict[str, Any] | None]] = []
    for i, st in enumerate(states):
        assert st.finish is not None
        lp: dict[str, Any] | None = None
        if plan.logprobs is not None:
            lp = (completion_logprobs(st.logprobs, strings, 0) if kind == "completion"
                  else chat_logprobs(st.logprobs, strings))
        finished.append((i, "".join(st.text), st.finish, lp))
    usage = _usage(states, len(plan.requests) // plan.n_prompts)
    warnings = _warnings(plan) or None  # steerserve extra, like the native API's
    if kind == "completion":
        return CompletionResponse(
            id=call_id, created=created, model=model, usage=usage, warnings=warnings,
            choices=[
                CompletionChoice(index=i, text=text, logprobs=lp,
                                 finish_reason=fin.finish_reason, diagnostics=fin.diagnostics)
                for i, text, fin, lp in finished
            ],
        )
    return ChatCompletionResponse(
        id=call_id, created=created, model=model, usage=usage, warnings=warnings,
        choices=[
            ChatChoice(index=i, message=ChatMessageOut(content=text), logprobs=lp,
                       finish_reason=fin.finish_reason, diagnostics=fin.diagnostics)
            for i, text, fin, lp in finished
        ],
    )


def response_json(response: CompletionResponse | ChatCompletionResponse) -> dict[str, Any]:
    """The wire form: OpenAI's fields always (``null`` included, as OpenAI sends them);
    the steerserve extras (``warnings``, a choice's ``diagnostics``) only when set."""
    out = response.model_dump()
    if out["warnings"] is None:
        del out["warnings"]
    for choice in out["choices"]:
        if choice["diagnostics"] is None:
            del choice["diagnostics"]
    return out


def _warnings(plan: _Plan) -> list[str]:
    """The steering-stack warnings of the call (the same for every choice of a prompt)."""
    seen: list[str] = []
    for req in plan.requests:
        seen.extend(w for w in req.warnings if w not in seen)
    return seen


async def _stream(
    kind: Kind, plan: _Plan, streams: ChoiceStreams, call_id: str, created: int,
    model: str, strings: TokenStrings, events: AsyncIterator[tuple[int, EngineEvent]],
) -> AsyncIterator[bytes]:
    """SSE chunks for every choice, interleaved (``events``: the choices' events, the
    first already peeked at); cancels the rest if the client leaves."""
    states = [_ChoiceState() for _ in plan.requests]
    # ``usage`` is on every chunk (null) only when asked for (``exclude_unset`` below).
    extra: dict[str, Any] = {"usage": None} if plan.include_usage else {}

    def frame(choices: list[Any], **fields: Any) -> bytes:
        top = dict(id=call_id, created=created, model=model, **fields)
        chunk: CompletionChunk | ChatCompletionChunk
        if kind == "completion":
            chunk = CompletionChunk(object="text_completion", choices=choices, **top)
        else:
            chunk = ChatCompletionChunk(object="chat.completion.chunk", choices=choices, **top)
        return sse(chunk.model_dump(exclude_unset=True))

    def chunk(index: int, text: str | None, items: Sequence[tuple[int, TokenLogprob]],
              finish: str | None, role: bool = False) -> bytes:
        st = states[index]
        lp: dict[str, Any] | None = None
        if plan.logprobs is not None and items:
            if kind == "completion":
                lp = completion_logprobs(items, strings, st.offset)
                st.offset += sum(len(t) for t in lp["tokens"])
            else:
                lp = chat_logprobs(items, strings)
        common: dict[str, Any] = dict(index=index, logprobs=lp, finish_reason=finish)
        if st.finish is not None and st.finish.diagnostics is not None:
            common["diagnostics"] = st.finish.diagnostics
        choice: CompletionChunkChoice | ChatChunkChoice
        if kind == "completion":
            choice = CompletionChunkChoice(text=text or "", **common)
        else:
            delta = ChatDelta(role="assistant") if role else ChatDelta()
            if text is not None:
                delta.content = text  # assignment marks it set: it goes on the wire
            choice = ChatChunkChoice(delta=delta, **common)
        return frame([choice], **extra)

    try:
        if kind == "chat":
            for i in range(len(states)):
                yield chunk(i, "", [], None, role=True)
        async for i, ev in events:
            if isinstance(ev, TokenEvent):
                items = _logprob_items(ev)
                if ev.text or items:
                    yield chunk(i, ev.text, items, None)
            elif isinstance(ev, FinishEvent):
                states[i].finish = ev
                yield chunk(i, ev.text if (ev.text or kind == "completion") else None, [],
                            ev.finish_reason)
            else:
                streams.cancel()
                yield sse(APIError(ev.code, ev.message, type=ev.type).body())
                break
        else:
            if plan.include_usage:
                yield frame([], usage=_usage(states, len(plan.requests) // plan.n_prompts))
        yield sse("[DONE]")
    finally:
        streams.cancel()


async def _serve(
    kind: Kind, body: CompletionRequest | ChatCompletionRequest, request: Request,
    state: ServerState,
) -> Any:
    """Both endpoints: validate, submit every choice, answer as JSON or SSE."""
    bundle, engine, env = state.ready()
    _check_model(body.model, bundle)
    endpoint = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    _note_ignored(body, endpoint)
    call_id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
    plan = await run_in_threadpool(_plan, kind, body, bundle, state, env, call_id)
    streams = _submit(state, engine, plan.requests)
    created = int(time.time())
    strings = TokenStrings(bundle.tokenizer)
    if plan.stream:
        # Headers wait for the first event: an error before any token is the status.
        first, events = await peek_first(request, streams.events(), streams.cancel)
        if isinstance(first[1], ErrorEvent):
            streams.cancel()
            raise APIError(first[1].code, first[1].message, type=first[1].type)
        return StreamingResponse(
            _stream(kind, plan, streams, call_id, created, bundle.name, strings, events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    async with cancel_on_disconnect(request, streams.cancel):
        result = await _collect(kind, plan, streams, call_id, created, bundle.name, strings)
    return JSONResponse(response_json(result))


@router.post("/v1/completions", response_model=CompletionResponse, responses=_STREAM_RESPONSES)
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> Any:
    """OpenAI text completions, with ``steering``/``diagnostics`` as extra fields."""
    return await _serve("completion", body, request, state)


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, responses=_STREAM_RESPONSES
)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep
                           ) -> Any:
    """OpenAI chat completions (the model's chat template), with steering extras."""
    return await _serve("chat", body, request, state)
