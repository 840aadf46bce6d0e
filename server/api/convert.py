"""The one conversion from wire types to the engine's frozen internal types.

It tokenizes the prompt (chat template for ``messages``), applies the limits of the
settings and validates the steering stack through each processor's ``validate``. All
failures are :class:`APIError`/``ParamError`` naming the parameter.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from processors.base import ParamError, ProcessorEnv
from processors.stack import parse_stack, stack_warnings
from server.api.errors import APIError
from server.api.protocol import GenerateRequest
from server.auxiliary import AuxBundle, expert_prompts
from server.chat import chat_template_ids
from server.engine.types import DiagnosticsMode, GenerationRequest, SamplingParams
from server.loading import ModelBundle
from server.settings import Settings

_LONGEST_TOKEN: dict[int, tuple[Any, int]] = {}  # id(tokenizer) -> (tokenizer, chars)


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` can stand for: the longest
    vocabulary entry (byte-level BPE spells each byte as one character, SentencePiece
    each character as itself, so an entry's length bounds the text it covers). Computed
    once per tokenizer (~20 ms for a 49k vocabulary)."""
    hit = _LONGEST_TOKEN.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    longest = max((len(k) for k in tokenizer.get_vocab()), default=1)
    _LONGEST_TOKEN[id(tokenizer)] = (tokenizer, max(1, longest))
    return max(1, longest)


def check_prompt_chars(req: GenerateRequest, bundle: ModelBundle, max_prompt: int) -> None:
    """Refuse a text prompt that cannot fit before tokenizing it (400 naming it).

    A prompt of ``C`` characters is at least ``C / longest_token_chars`` tokens, so when
    that already reaches ``max_prompt`` the answer is known without running the
    tokenizer (which takes seconds for megabytes). Prompts under the bound are
    tokenized and checked exactly by :func:`to_generation_request`.
    """
    if isinstance(req.prompt, str):
        chars, param = len(req.prompt), "prompt"
    elif req.messages is not None:
        chars, param = sum(len(m.content) for m in req.messages), "messages"
    else:
        return
    longest = longest_token_chars(bundle.tokenizer)
    at_least = chars // longest
    if at_least >= max_prompt:
        raise APIError(
            400,
            f"the prompt has {chars} characters, so at least {at_least} tokens (no token "
            f"covers more than {longest}); the limit is {max_prompt - 1} tokens",
            param=param,
        )


def tokenize_prompt(req: GenerateRequest, bundle: ModelBundle) -> list[int]:
    """Token ids of the request's prompt (exactly one of ``prompt``/``messages``)."""
    tok = bundle.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
    if req.messages is not None:
        if not req.messages:
            raise APIError(400, "'messages' must not be empty", param="messages")
        if not getattr(tok, "chat_template", None):
            raise APIError(
                400, "this model has no chat template; send 'prompt' instead", param="messages"
            )
        return chat_template_ids(tok, [m.model_dump() for m in req.messages])
    if isinstance(req.prompt, list):
        if not req.prompt:
            raise APIError(400, "'prompt' must not be empty", param="prompt")
        bad = [t for t in req.prompt if not 0 <= t < bundle.vocab_size]
        if bad:
            raise APIError(
                400,
                f"token id {bad[0]} in 'prompt' is outside the vocabulary "
                f"[0, {bundle.vocab_size})",
                param="prompt",
            )
        return list(req.prompt)
    assert isinstance(req.prompt, str)
    if not req.prompt:
        raise APIError(400, "'prompt' must not be empty", param="prompt")
    ids = tok(req.prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise APIError(400, "'prompt' produced no tokens", param="prompt")
    return [int(i) for i in ids]


def _stop_list(req: GenerateRequest, settings: Settings) -> tuple[str, ...]:
    if req.stop is None:
        return ()
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if len(stops) > settings.max_stop_sequences:
        raise APIError(
            400,
            f"at most {settings.max_stop_sequences} stop sequences, got {len(stops)}",
            param="stop",
        )
    if any(not s for s in stops):
        raise APIError(400, "stop sequences must not be empty strings", param="stop")
    longest = max(len(s) for s in stops)
    if longest > settings.max_stop_chars:
        raise APIError(
            400,
            f"stop sequences must be at most {settings.max_stop_chars} characters "
            f"(max_stop_chars), got one of {longest}",
            param="stop",
        )
    return tuple(stops)


def to_generation_request(
    req: GenerateRequest,
    bundle: ModelBundle,
    settings: Settings,
    env: ProcessorEnv,
    *,
    request_id: str | None = None,
    prompt_cache: dict[str, list[int]] | None = None,
    aux: Sequence[AuxBundle] = (),
) -> GenerationRequest:
    """Validate ``req`` against the model and limits; build the engine request.

    The checks that need no tokenizer run first, so an oversized prompt or stop list is
    refused before any tokenizing work is done. ``prompt_cache`` (a sweep's points
    mostly share one prompt) maps a prompt's JSON to its ids, so each distinct prompt
    is tokenized once. ``aux`` are the server's auxiliary models (``ServerState.aux``):
    a fusion expert with its own chat template gets its own prompt ids."""
    stops = _stop_list(req, settings)
    max_prompt = min(settings.max_prompt_tokens or bundle.context_length, bundle.context_length)
    check_prompt_chars(req, bundle, max_prompt)
    if prompt_cache is None:
        prompt_ids = tokenize_prompt(req, bundle)
    else:
        key = json.dumps([req.prompt, None if req.messages is None
                          else [m.model_dump() for m in req.messages]])
        if key not in prompt_cache:
            prompt_cache[key] = tokenize_prompt(req, bundle)
        prompt_ids = prompt_cache[key]
    prompt_param = "messages" if req.messages is not None else "prompt"
    if len(prompt_ids) >= max_prompt:
        raise APIError(
            400,
            f"the prompt has {len(prompt_ids)} tokens; the limit is {max_prompt - 1} "
            f"(model context {bundle.context_length})",
            param=prompt_param,
        )
    room = bundle.context_length - len(prompt_ids)
    if req.max_tokens is None:
        max_tokens = min(settings.default_max_tokens, room)
    else:
        max_tokens = req.max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise APIError(
                400,
                f"'max_tokens' must be at most {settings.max_tokens_limit}, got {max_tokens}",
                param="max_tokens",
            )
        if max_tokens > room:
            raise APIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's context length ({bundle.context_length})",
                param="max_tokens",
            )
    if req.min_tokens > max_tokens:
        raise APIError(
            400,
            f"'min_tokens' ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
            param="min_tokens",
        )
    stop_ids = tuple(req.stop_token_ids or ())
    for t in stop_ids:
        if not 0 <= t < bundle.vocab_size:
            raise APIError(
                400, f"stop token id {t} is outside the vocabulary", param="stop_token_ids"
            )
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=float(req.temperature),
        top_p=float(req.top_p),
        top_k=max(0, req.top_k),
        min_p=float(req.min_p),
        repetition_penalty=float(req.repetition_penalty),
        presence_penalty=float(req.presence_penalty),
        frequency_penalty=float(req.frequency_penalty),
        seed=req.seed,
        stop=stops,
        stop_token_ids=stop_ids,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=req.logprobs,
    )
    entries: list[dict[str, Any]] = [e.model_dump() for e in req.steering]
    try:
        steering = parse_stack(entries, env, max_len=settings.max_steering_entries)
        # Fusion experts with their own prompt template get their own prompt ids.
        aux_prompts = expert_prompts(steering, aux, req, bundle.tokenizer, max_tokens)
    except ParamError as err:
        raise APIError.from_param_error(err) from None
    diagnostics: DiagnosticsMode = "off"
    if req.diagnostics == "steps":
        diagnostics = "steps"
    elif req.diagnostics:
        diagnostics = "summary"
    return GenerationRequest(
        request_id=request_id or f"gen-{uuid.uuid4().hex[:24]}",
        prompt_ids=tuple(prompt_ids),
        sampling=sampling,
        steering=steering,
        diagnostics=diagnostics,
        arrival=time.monotonic(),
        warnings=tuple(stack_warnings(steering)),
        aux_prompt_ids=aux_prompts,
    )
