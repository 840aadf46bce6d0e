"""The lean decoder forward (server.engine.lean) against the transformers forward.

The oracle is transformers' own ``LlamaForCausalLM.forward`` (independent code), run by
the same runner with ``lean=False``: random Llama models built in-process (GQA and
plain multi-head attention, tied and untied embeddings, llama3 RoPE scaling), a
left-padded prefill of different lengths and several decode steps after it, logits and
cache contents compared; control-vector deltas on some rows and layers and captured
block outputs equal to the hooks' path; the bf16 and int4 conversions of one model
compared on the same quantized modules; the engine with the lean forward forced on in
fp32 gives the transformers path's tokens, and a mixed batch equals solo runs.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from processors.base import ProcessorEnv
from processors.control import ControlSpec, ControlVector, Window, build_phase
from processors.stack import parse_stack
from server import quant
from server.engine import Engine, EngineConfig
from server.engine.batch import BatchState, layer_kv
from server.engine.lean import lean_unsupported
from server.engine.runner import ModelRunner
from tests.conftest import make_request, run_to_completion

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [9], [4, 4, 8, 15, 16, 23]]

CONFIGS: dict[str, dict[str, Any]] = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-llama3-rope": dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    ),
}


def random_llama(seed: int = 0, **fields: Any) -> LlamaForCausalLM:
    """A small random Llama (hidden 64, 3 blocks; widths multiples of 32 for int4)."""
    config = LlamaConfig(**{
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "max_position_embeddings": 256, "initializer_range": 0.2,
        "pad_token_id": 0, **fields,
    })
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def run_both(
    model: Any, steps: int = 4, phases: Any = None
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], BatchState, BatchState]:
    """Prefill ``PROMPTS`` and decode ``steps`` greedy steps (the transformers path's
    tokens fed to both), once per forward; the per-step logits (transformers, lean)."""
    plain, lean = ModelRunner(model, lean=False), ModelRunner(model, lean=True)
    assert plain.lean is None and lean.lean is not None
    make = phases or (lambda _kind: None)
    a, b = plain.prefill(PROMPTS, make("prompt")), lean.prefill(PROMPTS, make("prompt"))
    out = [(a.next_logits, b.next_logits)]
    for _ in range(steps):
        tok = a.next_logits.argmax(-1)
        a.append_tokens(tok)
        b.append_tokens(tok)
        a.next_logits = plain.decode(a, tok, make("generated"))
        b.next_logits = lean.decode(b, tok, make("generated"))
        out.append((a.next_logits, b.next_logits))
    return out, a, b


def assert_caches_close(a: BatchState, b: BatchState, atol: float) -> None:
    assert a.cache is not None and b.cache is not None
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        for x, y in zip(layer_kv(la), layer_kv(lb), strict=True):
            assert x.shape == y.shape and x.dtype == y.dtype
            torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_prefill_and_decode_equal_transformers(name: str) -> None:
    model = random_llama(**CONFIGS[name])
    out, a, b = run_both(model)
    for ref, got in out:
        assert got.dtype == torch.float32 and got.shape == ref.shape == (len(PROMPTS), 96)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert_caches_close(a, b, atol=1e-5)


def test_unpadded_prefill_and_single_row() -> None:
    """No padding (mask None: SDPA's causal path) and a batch of one row."""
    model = random_llama(**CONFIGS["gqa-untied"])
    plain, lean = ModelRunner(model, lean=False), ModelRunner(model, lean=True)
    for prompts in ([[3, 1, 4, 1, 5]], [[2, 7, 1, 8], [2, 8, 1, 8]]):
        a, b = plain.prefill(prompts), lean.prefill(prompts)
        torch.testing.assert_close(b.next_logits, a.next_logits, rtol=0, atol=1e-5)
        tok = a.next_logits.argmax(-1)
        for s in (a, b):
            s.append_tokens(tok)
        torch.testing.assert_close(lean.decode(b, tok), plain.decode(a, tok), rtol=0, atol=1e-5)


def _specs(D: int) -> list[tuple[ControlSpec, ...]]:
    rng = np.random.default_rng(3)
    v = ControlVector("v", {0: rng.standard_normal(D), 2: rng.standard_normal(D)})
    w = ControlVector("w", {1: rng.standard_normal(D)})
    add = ControlSpec(v, 1.5, (0, 2))
    gen_only = ControlSpec(w, -2.0, (1,), positions=Window("generated"), preserve_norm=True)
    ablate = ControlSpec(w, 1.0, (1,), mode="ablate")
    # Row 1 and row 3 unsteered; row 0 two entries; row 2 an ablation.
    return [(add, gen_only), (), (ablate,), ()]


def test_control_deltas_and_capture_equal_the_hooks_path() -> None:
    model = random_llama(**CONFIGS["gqa-untied"])
    rows = _specs(64)

    def phases(kind: str) -> Any:
        prompt_lens = [len(p) for p in PROMPTS]
        return build_phase(rows, kind, torch.device("cpu"), prompt_lens=prompt_lens)

    out, _, _ = run_both(model, steps=3, phases=phases)
    unsteered, _, _ = run_both(model, steps=0)
    for ref, got in out:
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # The deltas did act (rows 0 and 2 moved, rows 1 and 3 did not).
    ref0, un0 = out[0][0], unsteered[0][0]
    assert bool((ref0[0] - un0[0]).abs().max() > 1e-3)
    assert bool((ref0[2] - un0[2]).abs().max() > 1e-3)
    torch.testing.assert_close(ref0[1], un0[1], rtol=0, atol=1e-6)

    plain, lean = ModelRunner(model, lean=False), ModelRunner(model, lean=True)
    with plain.hooks.capture([0, 2]) as got_plain:
        plain.prefill(PROMPTS, phases("prompt"))
    with lean.hooks.capture([0, 2]) as got_lean:
        lean.prefill(PROMPTS, phases("prompt"))
    assert sorted(got_plain) == sorted(got_lean) == [0, 2]
    for k in (0, 2):
        assert got_lean[k].shape == (len(PROMPTS), 64) and got_lean[k].dtype == torch.float32
        torch.testing.assert_close(got_lean[k], got_plain[k], rtol=0, atol=1e-5)
    assert not lean.hooks.active()


@pytest.mark.parametrize("weights", ["bf16", "int4"])
def test_low_precision_equal_transformers_on_the_same_modules(weights: str) -> None:
    """The same converted modules under both forwards: equal up to bf16 rounding of
    the activations (both compute in bf16, in a different op order)."""
    model = random_llama(**CONFIGS["gqa-untied"])
    if weights == "bf16":
        quant.to_bf16(model)
    else:
        if not quant.int4_kernel_available():
            pytest.skip("no CPU int4 kernel in this torch build")
        quant.to_int4(model, dense_rows=None)
        assert isinstance(model.model.layers[0].self_attn.q_proj, quant.Int4Slice)
    # The auto choice: lean on for low-precision weights.
    assert ModelRunner(model).lean is not None
    out, a, b = run_both(model)
    for ref, got in out:
        assert got.dtype == torch.float32
        scale = float(ref.abs().max())
        assert float((got - ref).abs().max()) <= 0.02 * scale
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert a.cache is not None and b.cache is not None
    assert layer_kv(b.cache.layers[0])[0].dtype == torch.bfloat16
    assert_caches_close(a, b, atol=0.05)


def test_fp32_default_is_transformers_and_other_models_fall_back() -> None:
    assert ModelRunner(random_llama()).lean is None  # fp32: the exact reference path
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    mistral = MistralForCausalLM(config).eval()
    assert "MistralForCausalLM" in (lean_unsupported(mistral) or "")
    runner = ModelRunner(mistral, lean=True)
    assert runner.lean is None  # falls back to the transformers forward
    assert runner.prefill([[1, 2, 3]]).next_logits.shape == (1, 64)
    gelu = random_llama(hidden_act="gelu")
    assert "activation" in (lean_unsupported(gelu) or "")


def test_engine_with_lean_forced_on_equals_transformers_and_solo(tiny_bundle: Any) -> None:
    """Greedy tokens of the engine on the lean forward (fp32) equal the transformers
    path's, solo and in a mixed batch of rows with different stacks."""
    tok = tiny_bundle.tokenizer
    env = ProcessorEnv(vocab_size=tiny_bundle.vocab_size)
    texts = ["hello", "a much longer prompt than the others, to force left padding", "x",
             "the quick brown fox"]

    def reqs() -> list[Any]:
        return [
            make_request(tok, t, rid=f"l{i}", max_tokens=10 + i, temperature=0,
                         ignore_eos=True,
                         steering=parse_stack([{"type": "logit_bias", "bias": {"70": 4.0}}],
                                              env, max_len=4) if i == 1 else ())
            for i, t in enumerate(texts)
        ]

    results: dict[str, dict[str, list[int]]] = {}
    for lean in (False, True):
        engine = Engine(tiny_bundle.model, tok, EngineConfig(max_batch_size=8, lean=lean))
        assert (engine.runner.lean is not None) == lean
        engine.start()
        try:
            solo = {r.request_id: run_to_completion(engine, r)[0] for r in reqs()}
            batched: dict[str, list[int]] = {}

            def go(r: Any, engine: Engine = engine, batched: dict[str, list[int]] = batched
                   ) -> None:
                batched[r.request_id] = run_to_completion(engine, r)[0]

            threads = [threading.Thread(target=go, args=(r,)) for r in reqs()]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert batched == solo
            results[str(lean)] = solo
        finally:
            engine.stop()
    assert results["True"] == results["False"]
