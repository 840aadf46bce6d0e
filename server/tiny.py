"""A tiny random Llama model with a byte-level tokenizer, built in-process.

Used by the test suite, the fuzz/fault tests and ``--model random:tiny`` for trying the
server without any weights. Nothing is downloaded: the tokenizer is a byte-level BPE
with no merges (every byte is one token, so multi-byte characters exercise incremental
detokenization) and the model is ``LlamaForCausalLM`` with random weights from a seed.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token byte-level tokenizer: 3 special tokens, then the 256 byte symbols."""
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """A small Llama configuration; ``overrides`` change any field (e.g. layers)."""
    fields: dict[str, Any] = dict(  # heterogeneous LlamaConfig keyword values
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.3,  # peaky logits, so greedy tokens are well separated
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_model(
    seed: int = 0, **overrides: Any
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build the random model and its tokenizer deterministically from ``seed``."""
    tok = tiny_tokenizer()
    config = tiny_config(len(tok), **overrides)
    config._attn_implementation = "sdpa"
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.random.set_rng_state(gen_state)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
