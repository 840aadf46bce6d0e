"""The fast path on the real embedded model (slow): the int4 codes are the GGUF's own,
row for row, the server reports its weights, and steering works on int4 (tolerance-based:
nothing here compares low-precision outputs for equality)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from server import quant
from server.loading import ModelBundle, embedded_gguf_path, load_model
from tests.conftest import EMBEDDED, LiveServer, live_server, real_data_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not quant.int4_kernel_available(), reason="no int4 kernel"),
]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def int4_bundle() -> ModelBundle:
    return load_model(EMBEDDED, real_data_dir(), weights="int4")


def test_int4_codes_are_the_files_blocks(real_bundle: ModelBundle) -> None:
    """Our decoded and un-permuted Q4_1 blocks equal transformers' fp32 dequantization of
    the same GGUF (its own reader and its own Q/K un-permutation) for all 210 linears."""
    blocks = quant.read_gguf_q4(embedded_gguf_path("smollm2-135m-instruct"),
                                real_bundle.model.config)
    assert len(blocks) == 30 * 7
    for name, (codes, scale, zero) in blocks.items():
        w = real_bundle.model.get_submodule(name).weight
        q = torch.from_numpy(codes).double().reshape(w.shape[0], -1, 32)
        ours = (q - 8) * torch.from_numpy(scale).double()[..., None] \
            + torch.from_numpy(zero).double()[..., None]
        assert torch.allclose(ours.reshape(w.shape), w.double(), rtol=0, atol=1e-6), name


@torch.inference_mode()
def test_int4_teacher_forced_close_to_fp32(real_bundle: ModelBundle,
                                           int4_bundle: ModelBundle) -> None:
    """int4 (with the server's int8 head) reads fp32's greedy continuations: top-1
    agreement and KL within the issue's targets, pooled over two prompts × 32 forced
    steps (EOS ignored: the France answer alone ends after 8 tokens, where one near-tie
    is 12 % of the steps). Measured ≈ 0.97 and ≈ 0.0017 nats on the benchmark's prompts."""
    assert int4_bundle.weights == "int4"
    assert isinstance(int4_bundle.model.lm_head, quant.Int8Head | quant.Float32Head)
    tok = real_bundle.tokenizer
    a_all, b_all = [], []
    for msgs in (FRANCE, [{"role": "user", "content": "Describe a storm at sea."}]):
        ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                           return_dict=False))
        x = torch.tensor([ids])
        cont = real_bundle.model.generate(x, attention_mask=torch.ones_like(x),
                                          max_new_tokens=32, min_new_tokens=32,
                                          do_sample=False)
        a_all.append(real_bundle.model(input_ids=cont).logits[0, len(ids) - 1 : -1])
        b_all.append(int4_bundle.model(input_ids=cont).logits[0, len(ids) - 1 : -1])
    a, b = torch.cat(a_all), torch.cat(b_all)
    assert b.dtype == torch.float32 and a.shape[0] == 64
    lp, lq = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    assert kl < 0.02, kl
    assert top1 >= 0.9, top1


@pytest.fixture(scope="module")
def int4_srv(int4_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[LiveServer]:
    with live_server(int4_bundle, tmp_path_factory.mktemp("fast")) as s:
        yield s


def test_weights_reported_and_answers_sensible(int4_srv: LiveServer) -> None:
    models = httpx.get(int4_srv.url + "/v1/models").json()["data"]
    assert models[0]["weights"] == "int4" and models[0]["dtype"] == "bfloat16"
    assert httpx.get(int4_srv.url + "/health").json()["weights"] == "int4"
    r = httpx.post(int4_srv.url + "/v1/generate", timeout=120,
                   json={"messages": FRANCE, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["text"]


def test_steering_works_on_int4(int4_srv: LiveServer, tmp_path: Path) -> None:
    """A logit-bias of +100 forces its token on every step; an n-gram prior at λ = 1 moves
    the text, with diagnostics, on the int4 path."""
    url = int4_srv.url
    base = {"messages": FRANCE, "max_tokens": 8, "temperature": 0}
    forced = httpx.post(url + "/v1/generate", timeout=120,
                        json={**base, "steering": [{"type": "logit_bias",
                                                    "bias": {"28": 100}}]}).json()
    assert forced["token_ids"] == [28] * 8
    r = httpx.post(url + "/v1/priors", timeout=300,
                   json={"name": "fast-style", "corpus": "kjv", "max_documents": 2000})
    assert r.status_code == 201, r.text

    def gen(lam: float) -> dict:
        return httpx.post(url + "/v1/generate", timeout=120, json={
            **base, "max_tokens": 16, "diagnostics": True,
            "steering": [{"type": "ngram", "prior": "fast-style", "lambda": lam}]}).json()

    off, on = gen(0.0), gen(1.0)
    assert on["token_ids"] != off["token_ids"]
    assert on["diagnostics"]["style_ppl"] < off["diagnostics"]["style_ppl"]


@torch.inference_mode()
def test_lean_forward_close_to_transformers_on_int4(int4_bundle: ModelBundle) -> None:
    """The lean forward (server.engine.lean, the fast path's default) against
    transformers' forward on the same int4 modules: two left-padded prompts, prefill and
    32 decode steps each fed the transformers path's greedy token (teacher forcing).
    Both compute in bf16; the lean forward is free to order its ops differently, so the
    bounds are tolerances (top-1 agreement, KL), not equality. Measured on this torch:
    top-1 1.000, KL 0 (the two give the same logits)."""
    from server.engine.runner import ModelRunner

    tok = int4_bundle.tokenizer
    prompts = [
        list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                     return_dict=False))
        for m in (FRANCE, [{"role": "user", "content": "Describe a storm at sea."}])
    ]
    plain = ModelRunner(int4_bundle.model, lean=False)
    lean = ModelRunner(int4_bundle.model)  # int4: lean by default
    assert plain.lean is None and lean.lean is not None
    a, b = plain.prefill(prompts), lean.prefill(prompts)
    ref, got = [a.next_logits], [b.next_logits]
    for _ in range(32):
        token = a.next_logits.argmax(-1)
        a.append_tokens(token)
        b.append_tokens(token)
        a.next_logits, b.next_logits = plain.decode(a, token), lean.decode(b, token)
        ref.append(a.next_logits)
        got.append(b.next_logits)
    p, q = torch.cat(ref), torch.cat(got)  # (2 · 33, V)
    assert q.dtype == torch.float32 and p.shape == q.shape == (66, p.shape[1])
    lp, lq = F.log_softmax(p.double(), -1), F.log_softmax(q.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    print(f"lean vs transformers int4: top1 {top1:.3f} KL {kl:.2e}")
    assert top1 >= 0.95, top1
    assert kl < 1e-3, kl
