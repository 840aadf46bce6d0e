"""Engine tests on the tiny random Llama: batching must never change a row's output."""

from __future__ import annotations

import queue
import random
import threading
import time

import pytest
import torch

from processors.base import ProcessorEnv
from processors.stack import parse_stack
from server.engine import (
    Engine,
    EngineConfig,
    FinishEvent,
    QueueFullError,
    TokenEvent,
)
from tests.conftest import make_request, probe, run_to_completion

PROMPTS = [
    "hello",
    "a much longer prompt than the others, to force left padding",
    "x",
    "the quick brown fox",
    "ünïcödé ✓",
    "0123456789",
]


def bias(env: ProcessorEnv, token: int, value: float = 8.0):
    return parse_stack([{"type": "logit_bias", "bias": {str(token): value}}], env, max_len=4)


def run_concurrently(engine: Engine, requests, stagger: float = 0.0):
    results: dict[str, tuple] = {}

    def go(req):
        results[req.request_id] = run_to_completion(engine, req)

    threads = []
    for req in requests:
        t = threading.Thread(target=go, args=(req,))
        t.start()
        threads.append(t)
        if stagger:
            time.sleep(stagger)
    for t in threads:
        t.join(120)
    return results


def test_greedy_matches_transformers_generate(tiny_bundle, tiny_engine):
    tok, model = tiny_bundle.tokenizer, tiny_bundle.model
    for prompt in PROMPTS[:3]:
        req = make_request(tok, prompt, max_tokens=12, temperature=0, ignore_eos=True)
        ours, _, fin = run_to_completion(tiny_engine, req)
        ids = torch.tensor([req.prompt_ids])
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
            do_sample=False,
        )[0, ids.shape[1]:].tolist()
        assert ours == ref
        assert fin.finish_reason == "length" and fin.completion_tokens == 12


def test_shuffled_mixed_batch_equals_solo_runs(tiny_bundle, tiny_engine):
    """Rows with different settings and stacks, batched in random order, equal solo."""
    tok = tiny_bundle.tokenizer
    env = ProcessorEnv(vocab_size=tiny_bundle.vocab_size)
    specs = [
        dict(temperature=0),
        dict(temperature=0, steering=bias(env, 70)),
        dict(temperature=0.9, seed=7, top_k=20),
        dict(temperature=1.2, seed=8, top_p=0.8, repetition_penalty=1.3),
        dict(temperature=0, steering=bias(env, 100, -50.0), repetition_penalty=1.5),
        dict(temperature=0.7, seed=9, min_p=0.1, steering=bias(env, 33, 3.0)),
    ]
    reqs = [
        make_request(tok, PROMPTS[i], rid=f"r{i}", max_tokens=10 + i, ignore_eos=True, **spec)
        for i, spec in enumerate(specs)
    ]
    solo = {r.request_id: run_to_completion(tiny_engine, r)[0] for r in reqs}
    seen = probe(tiny_engine)
    for trial in range(2):
        order = reqs[:]
        random.Random(trial).shuffle(order)
        batched = run_concurrently(tiny_engine, order, stagger=0.0 if trial == 0 else 0.01)
        for r in reqs:
            assert batched[r.request_id][0] == solo[r.request_id], r.request_id
    assert seen.peak_batch >= 3


def test_rows_joining_mid_decode_keep_their_outputs(tiny_bundle):
    tok = tiny_bundle.tokenizer
    engine = Engine(tiny_bundle.model, tok, EngineConfig(max_batch_size=8))
    engine.start()
    try:
        reqs = [make_request(tok, p, rid=f"j{i}", max_tokens=30, temperature=0, ignore_eos=True)
                for i, p in enumerate(PROMPTS)]
        solo = {r.request_id: run_to_completion(engine, r)[0] for r in reqs}
        out = run_concurrently(engine, reqs, stagger=0.02)
        assert {k: v[0] for k, v in out.items()} == solo
    finally:
        engine.stop()


def test_batch_size_limit_queues_the_rest(tiny_bundle):
    tok = tiny_bundle.tokenizer
    engine = Engine(tiny_bundle.model, tok, EngineConfig(max_batch_size=2, max_queue=16))
    seen = probe(engine)
    engine.start()
    try:
        reqs = [make_request(tok, "hi", rid=f"q{i}", max_tokens=8, temperature=0, ignore_eos=True)
                for i in range(5)]
        out = run_concurrently(engine, reqs)
        assert len({tuple(v[0]) for v in out.values()}) == 1
        assert seen.peak_batch == 2
    finally:
        engine.stop()


def test_queue_full_raises(tiny_bundle):
    tok = tiny_bundle.tokenizer
    engine = Engine(tiny_bundle.model, tok, EngineConfig(max_batch_size=1, max_queue=1))
    engine.start()
    try:
        long = make_request(tok, "a", max_tokens=400, temperature=0, ignore_eos=True)
        h1 = engine.submit(long, lambda ev: None)
        deadline = time.monotonic() + 10
        while engine.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        h2 = engine.submit(long, lambda ev: None)  # waits in the queue
        with pytest.raises(QueueFullError):
            engine.submit(long, lambda ev: None)
        h1.cancel()
        h2.cancel()
    finally:
        engine.stop()


def test_cancel_frees_the_slot_at_the_next_step(tiny_bundle, tiny_engine):
    tok = tiny_bundle.tokenizer
    q: queue.Queue = queue.Queue()
    handle = tiny_engine.submit(
        make_request(tok, "a", max_tokens=500, temperature=0, ignore_eos=True), q.put
    )
    assert isinstance(q.get(timeout=10), TokenEvent)
    handle.cancel()
    while True:
        ev = q.get(timeout=10)
        if isinstance(ev, FinishEvent):
            break
    assert ev.finish_reason == "abort" and ev.completion_tokens < 500
    deadline = time.monotonic() + 5
    while tiny_engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tiny_engine.running == 0


def test_stop_sequences_eos_and_min_tokens(tiny_bundle, tiny_engine):
    tok = tiny_bundle.tokenizer
    base = make_request(tok, "the quick brown fox", max_tokens=20, temperature=0, ignore_eos=True)
    tokens, text, _ = run_to_completion(tiny_engine, base)
    # A stop string taken from the middle of the greedy output cuts the text before it.
    stop = text[3:5]
    cut = text.find(stop)
    req = make_request(tok, "the quick brown fox", max_tokens=20, temperature=0,
                       ignore_eos=True, stop=(stop,))
    _, text2, fin = run_to_completion(tiny_engine, req)
    assert fin.finish_reason == "stop" and text2 == text[:cut]
    # A stop token id ends the request on that token.
    req = make_request(tok, "the quick brown fox", max_tokens=20, temperature=0,
                       stop_token_ids=(tokens[4],))
    t3, _, fin = run_to_completion(tiny_engine, req)
    assert fin.finish_reason == "stop" and t3 == tokens[: tokens.index(tokens[4]) + 1]
    # Forcing EOS with a bias ends at once, unless min_tokens/ignore_eos forbid it.
    env = ProcessorEnv(vocab_size=tiny_bundle.vocab_size)
    eos = tok.eos_token_id
    forced = bias(env, eos, 100.0)
    t4, _, fin = run_to_completion(
        tiny_engine, make_request(tok, "x", steering=forced, max_tokens=9, temperature=0))
    assert t4 == [eos] and fin.finish_reason == "stop"
    t5, _, fin = run_to_completion(tiny_engine, make_request(
        tok, "x", steering=forced, max_tokens=9, temperature=0, min_tokens=3))
    assert len(t5) == 4 and t5[-1] == eos and eos not in t5[:3]
    t6, _, fin = run_to_completion(tiny_engine, make_request(
        tok, "x", steering=forced, max_tokens=9, temperature=0, ignore_eos=True))
    assert len(t6) == 9 and eos not in t6 and fin.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_bundle, tiny_engine):
    tok = tiny_bundle.tokenizer

    def mk(seed):
        return make_request(tok, "hello", max_tokens=16, temperature=1.0, seed=seed,
                            ignore_eos=True)

    a = run_to_completion(tiny_engine, mk(1))[0]
    assert run_to_completion(tiny_engine, mk(1))[0] == a
    assert run_to_completion(tiny_engine, mk(2))[0] != a


def test_diagnostics_are_scalars_per_step(tiny_bundle, tiny_engine):
    tok = tiny_bundle.tokenizer
    env = ProcessorEnv(vocab_size=tiny_bundle.vocab_size)
    req = make_request(tok, "hello", max_tokens=5, temperature=0, ignore_eos=True,
                       steering=bias(env, 70, 3.0), diagnostics="steps")
    _, _, fin = run_to_completion(tiny_engine, req)
    d = fin.diagnostics
    assert d["steps"] == 5 and d["base_ppl"] > 1 and d["js_mean"] > 0
    assert len(d["per_step"]["kl_base_steered"]) == 5
    assert len(d["per_step"]["token_id"]) == 5
    # Unsteered: divergences are exactly zero.
    _, _, fin = run_to_completion(tiny_engine, make_request(
        tok, "hello", max_tokens=3, temperature=0, diagnostics="summary"))
    assert fin.diagnostics["js_max"] < 1e-6 and fin.diagnostics["argmax_flip_rate"] == 0.0
    assert fin.diagnostics["kl_base_steered_max"] < 1e-6


def test_overlapped_decode_equals_plain_and_never_emits_an_extra_token(tiny_bundle, tiny_engine):
    """With the next decode launched before emit (EngineConfig.overlap, issue 20.6) the
    rows of a mixed batch — stop strings, stop ids, forced EOS, max_tokens, penalties,
    sampling — give exactly their solo outputs from the plain engine, and nothing
    arrives after a FinishEvent (a finished row's extra forward is dropped)."""
    tok, model = tiny_bundle.tokenizer, tiny_bundle.model
    env = ProcessorEnv(vocab_size=tiny_bundle.vocab_size)
    prompt = "the quick brown fox"
    _, text, _ = run_to_completion(tiny_engine, make_request(
        tok, prompt, max_tokens=20, temperature=0, ignore_eos=True))
    greedy = run_to_completion(tiny_engine, make_request(
        tok, prompt, max_tokens=20, temperature=0, ignore_eos=True))[0]
    specs = [
        dict(temperature=0, ignore_eos=True, max_tokens=20, stop=(text[3:5],)),
        dict(temperature=0, max_tokens=20, stop_token_ids=(greedy[4],)),
        dict(temperature=0, max_tokens=9, steering=bias(env, tok.eos_token_id, 100.0)),
        dict(temperature=0.9, seed=3, top_k=20, ignore_eos=True, max_tokens=7),
        dict(temperature=0, ignore_eos=True, max_tokens=12, repetition_penalty=1.4,
             steering=bias(env, 70, 3.0)),
        dict(temperature=1.1, seed=4, top_p=0.8, ignore_eos=True, max_tokens=3),
    ]
    reqs = [make_request(tok, prompt if i < 3 else PROMPTS[i], rid=f"o{i}", **spec)
            for i, spec in enumerate(specs)]
    solo = {r.request_id: run_to_completion(tiny_engine, r) for r in reqs}
    threads: set[str] = set()
    handle = model.register_forward_pre_hook(
        lambda *_: threads.add(threading.current_thread().name))
    engine = Engine(model, tok, EngineConfig(max_batch_size=8, overlap=True))
    engine.start()
    try:
        queues = [queue.Queue() for _ in reqs]
        engine.submit_many([(r, q.put) for r, q in zip(reqs, queues, strict=True)])
        for r, q in zip(reqs, queues, strict=True):
            tokens, texts = [], []
            while not isinstance(ev := q.get(timeout=60), FinishEvent):
                tokens.extend(ev.token_ids)
                texts.append(ev.text)
            texts.append(ev.text)
            want_tokens, want_text, want_fin = solo[r.request_id]
            assert (tokens, "".join(texts)) == (want_tokens, want_text), r.request_id
            assert ev.finish_reason == want_fin.finish_reason
            assert ev.completion_tokens == len(tokens)
        time.sleep(0.2)
        assert all(q.empty() for q in queues)  # nothing after the FinishEvent
        # A cancelled row ends with "abort", its token count matching what was sent.
        q = queue.Queue()
        h = engine.submit(make_request(tok, "a", max_tokens=500, temperature=0,
                                       ignore_eos=True), q.put)
        got = [q.get(timeout=10)]
        h.cancel()
        while not isinstance(got[-1], FinishEvent):
            got.append(q.get(timeout=10))
        assert got[-1].finish_reason == "abort"
        assert got[-1].completion_tokens == sum(len(e.token_ids) for e in got[:-1])
    finally:
        engine.stop()
        handle.remove()
    assert "steer-forward_0" in threads  # the decodes really ran beside the host work
