"""Auxiliary models for logit fusion: loading, the vocabulary check, expert prompts.

Settings list them as ``aux_models`` (environment ``STEER_AUX_MODELS``, a JSON list)::

    [{"name": "small", "role": "small_base", "source": "/models/qwen-0.5b"},
     {"name": "coder", "role": "expert", "source": "/models/qwen-0.5b-coder.gguf",
      "template": "chat"}]

``source`` takes everything the main model's source takes (HF directory, ``.gguf`` file,
``embedded:NAME``, ``random:tiny[:SEED[:LAYERS]]``) and goes through the same loading and
GGUF→safetensors caching path. They load after the main model, on its device and dtype.
Each must match the main model's vocabulary token for token (same id → same token string,
same number of output rows); otherwise start-up fails with a message naming the first
differing id, and the server exits non-zero.

Prompt templates (experts only; proxy-tuning gives an instruction-tuned expert a
chat-formatted prompt while the base models see the raw one):

* ``"template": "same"`` (default) — the model decodes from the main model's prompt ids;
* ``"template": "chat"`` — the request's ``messages`` are rendered with the expert's own
  chat template (the one its tokenizer carries, or ``"chat_template"``, a Jinja string,
  when given) with the generation prompt appended. A request with a raw ``prompt`` is
  wrapped as one user message (a token-id prompt is decoded to text first).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.chat import chat_template_ids
from server.loading import ModelBundle, load_model

log = logging.getLogger("steerserve.aux")


class AuxModelError(RuntimeError):
    """An auxiliary model cannot be used with the main model (the message says why)."""


@dataclass
class AuxBundle:
    """A loaded auxiliary model: its settings entry and the model itself."""

    name: str
    role: str  # "small_base" | "expert"
    bundle: ModelBundle
    template: str = "same"  # "same" | "chat"
    chat_template: str | None = None

    @functools.cached_property
    def fingerprint(self) -> str:
        """The tokenizer fingerprint (equal to the main model's after the check)."""
        return self.bundle.tokenizer_fingerprint()


def vocabulary_mismatch(main: ModelBundle, aux: ModelBundle) -> str | None:
    """Why ``aux`` cannot share ``main``'s vocabulary, or None when it can."""
    if aux.vocab_size != main.vocab_size:
        return (
            f"its output layer has {aux.vocab_size} rows, the main model's {main.vocab_size}"
        )
    a = {i: t for t, i in main.tokenizer.get_vocab().items()}
    b = {i: t for t, i in aux.tokenizer.get_vocab().items()}
    if a == b:
        return None
    for idx in sorted(set(a) | set(b)):
        if a.get(idx) != b.get(idx):
            return (
                f"token id {idx} is {a.get(idx)!r} for the main model but {b.get(idx)!r} for "
                f"this model ({len(a)} vs {len(b)} tokens)"
            )
    return "the vocabularies differ"  # pragma: no cover - ids equal but maps differ


def check_aux(main: ModelBundle, aux: Sequence[AuxBundle]) -> None:
    """Refuse auxiliary models that do not fit the main model (AuxModelError)."""
    seen: set[str] = set()
    for a in aux:
        if a.name in seen:
            raise AuxModelError(f"auxiliary model name '{a.name}' is listed twice")
        seen.add(a.name)
        why = vocabulary_mismatch(main, a.bundle)
        if why is not None:
            raise AuxModelError(
                f"auxiliary model '{a.name}' ({a.bundle.source}) does not share the main "
                f"model's vocabulary: {why}. Fusion needs identical vocabularies."
            )
        if a.template == "chat" and not (
            a.chat_template or getattr(a.bundle.tokenizer, "chat_template", None)
        ):
            raise AuxModelError(
                f"auxiliary model '{a.name}' has template 'chat' but no chat template; "
                "set 'chat_template' in its settings entry"
            )


def load_aux_models(entries: Sequence[Any], main: ModelBundle, data_dir: Any) -> list[AuxBundle]:
    """Load every ``aux_models`` settings entry on the main model's device and dtype and
    check it against the main model."""
    out: list[AuxBundle] = []
    for e in entries:
        log.info("loading auxiliary model %s (%s) from %s", e.name, e.role, e.source)
        # An exact (fp32) main model keeps exact auxiliaries; a fast main model lets each
        # auxiliary pick its own fastest format (fusion combines float32 logits anyway).
        exact = main.weights == "fp32"
        bundle = load_model(e.source, data_dir, device=main.device,
                            dtype=main.dtype if exact else "auto",
                            weights="fp32" if exact else "auto", name=e.name)
        template = "chat" if e.chat_template else e.template
        out.append(AuxBundle(e.name, e.role, bundle, template, e.chat_template))
        check_aux(main, out)  # fail on the first bad one, before loading the rest
    return out


def aux_roles(aux: Sequence[AuxBundle]) -> dict[str, str]:
    """``name → role``: what ``processors.fusion`` validates against."""
    return {a.name: a.role for a in aux}


def render_prompt(
    aux: AuxBundle,
    messages: Sequence[Mapping[str, Any]] | None,
    prompt: str | Sequence[int] | None,
    main_tokenizer: Any,
) -> list[int]:
    """An expert's own prompt ids for a request (``template == "chat"``)."""
    if messages is None:
        text = prompt if isinstance(prompt, str) else main_tokenizer.decode(list(prompt or []))
        messages = [{"role": "user", "content": text}]
    tok = aux.bundle.tokenizer
    return chat_template_ids(tok, messages, chat_template=aux.chat_template)


def expert_prompts(
    steering: Sequence[Any],
    models: Sequence[AuxBundle],
    request: Any,
    main_tokenizer: Any,
    max_tokens: int,
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(name, prompt ids)`` for every model with its own template that ``steering``
    uses (``GenerationRequest.aux_prompt_ids``). ``models`` are the server's auxiliary
    models (``ServerState.aux``); ``request`` is the wire request (its
    ``messages`` or ``prompt``). Raises ParamError when a rendered prompt does not fit
    the model's context with ``max_tokens``."""
    from processors.base import ParamError
    from processors.fusion import fusion_models

    bundles = {a.name: a for a in models}
    names = sorted(n for n in fusion_models(steering) if n in bundles)
    out: list[tuple[str, tuple[int, ...]]] = []
    messages = None
    if getattr(request, "messages", None) is not None:
        messages = [m.model_dump() if hasattr(m, "model_dump") else m for m in request.messages]
    for name in names:
        aux = bundles[name]
        if aux.template != "chat":
            continue
        ids = render_prompt(aux, messages, getattr(request, "prompt", None), main_tokenizer)
        if len(ids) + max_tokens > aux.bundle.context_length:
            param = "messages" if messages is not None else "prompt"
            raise ParamError(
                param, f"the prompt rendered for expert '{name}' has {len(ids)} tokens; with "
                f"max_tokens ({max_tokens}) it exceeds that model's context length "
                f"({aux.bundle.context_length})",
            )
        out.append((name, tuple(ids)))
    return tuple(out)
