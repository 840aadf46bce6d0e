"""Chat-template tokenization, shared by request conversion and the fusion experts.

``tokenizer.apply_chat_template(..., tokenize=True, return_dict=False)`` returns a list
of ids in most transformers versions but a ``BatchEncoding`` (a mapping holding
``input_ids``) in some; this is the one place that knows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def chat_template_ids(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    chat_template: str | None = None,
) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template (or
    ``chat_template`` when given), ending with the assistant generation prompt."""
    kwargs: dict[str, Any] = {}
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    ids = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
        **kwargs,
    )
    if isinstance(ids, Mapping) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]
