"""End-to-end on the real embedded SmolLM2-135M-Instruct (slow; CI runs them too)."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch

from tests.conftest import live_server, run_to_completion

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def srv(real_bundle, tmp_path_factory):
    with live_server(real_bundle, tmp_path_factory.mktemp("e2e")) as s:
        yield s


def test_capital_of_france(srv):
    r = httpx.post(srv.url + "/v1/generate", timeout=120,
                   json={"messages": FRANCE, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Paris" in body["text"]
    assert body["finish_reason"] in ("stop", "length")


def test_streaming_and_non_streaming_agree(srv):
    req = {"messages": [{"role": "user", "content": "Name three colours."}],
           "max_tokens": 24, "temperature": 0}
    plain = httpx.post(srv.url + "/v1/generate", json=req, timeout=120).json()
    text, tokens = [], []
    with httpx.stream("POST", srv.url + "/v1/generate", json={**req, "stream": True},
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                text.append(ev["text"])
                tokens.extend(ev["token_ids"])
    assert tokens == plain["token_ids"]
    assert "".join(text) == plain["text"]


def test_engine_matches_generate_and_batching_keeps_outputs(real_bundle, srv):
    tok, model = real_bundle.tokenizer, real_bundle.model
    engine = srv.engine
    prompts = ["The capital of France is", "Once upon a time,", "def fibonacci(n):"]
    from tests.conftest import make_request

    reqs = [make_request(tok, p, rid=f"e{i}", max_tokens=10, temperature=0, ignore_eos=True)
            for i, p in enumerate(prompts)]
    solo = {}
    for r in reqs:
        solo[r.request_id] = run_to_completion(engine, r)[0]
        ids = torch.tensor([r.prompt_ids])
        with torch.inference_mode():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                 min_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
        assert solo[r.request_id] == ref
    out: dict[str, list[int]] = {}
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(
        r.request_id, run_to_completion(engine, r)[0])) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == solo
