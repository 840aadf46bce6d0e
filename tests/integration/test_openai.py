"""The official ``openai`` client, unmodified (only base_url and api_key), against a real
uvicorn serving the tiny random model."""

from __future__ import annotations

import logging
import math

import httpx
import openai
import pytest

from tests.conftest import live_server, probe

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def srv(tiny_bundle, tmp_path_factory):
    with live_server(tiny_bundle, tmp_path_factory.mktemp("openai")) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    with openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_completion_non_streaming(client):
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=6, **GREEDY)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == 11


def test_completion_matches_native_generate(srv, client):
    body = {"prompt": "same", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    native = httpx.post(srv.url + "/v1/generate", json=body, timeout=30).json()
    r = client.completions.create(model="tiny", prompt="same", max_tokens=8, **GREEDY)
    assert r.choices[0].text == native["text"]


def test_completion_streaming_with_usage(client):
    kw = dict(model="tiny", prompt="stream me", max_tokens=10, **GREEDY)
    plain = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    body = chunks[:-1]
    assert all(c.usage is None for c in body)
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert "".join(c.choices[0].text for c in body) == plain


def test_chat_non_streaming_and_streaming(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=7,
              **GREEDY)
    r = client.chat.completions.create(**kw)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.usage.prompt_tokens == 21 and r.usage.completion_tokens == 7
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_content_parts_and_max_completion_tokens(client):
    r = client.chat.completions.create(
        model="tiny", max_completion_tokens=3, **GREEDY,
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    )
    assert r.usage.completion_tokens == 3


def test_n_choices_share_one_prefill_and_seeds_are_seed_plus_i(srv, client):
    before = probe(srv.engine).prefill_rows
    r = client.completions.create(model="tiny", prompt="many", max_tokens=6, n=3, seed=7,
                                  extra_body={"ignore_eos": True})
    assert probe(srv.engine).prefill_rows == before + 1
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 18
    texts = [c.text for c in r.choices]
    third = client.completions.create(model="tiny", prompt="many", max_tokens=6, seed=9,
                                      extra_body={"ignore_eos": True})
    assert third.choices[0].text == texts[2]


def test_several_prompts(client):
    r = client.completions.create(model="tiny", prompt=["a", "bb"], max_tokens=2, n=2,
                                  **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 1 + 2 and r.usage.completion_tokens == 8


def test_streaming_n_interleaves_choices(client):
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4, n=2,
        seed=1, stream=True, extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index for c in chunks if c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_logprobs_chat_and_completion(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "lp"}], max_tokens=5,
        logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        # Greedy without steering: the emitted token is the most likely one.
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-6)
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
    c = client.completions.create(model="tiny", prompt="lp", max_tokens=4, logprobs=2,
                                  **GREEDY)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 4
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    streamed = list(client.completions.create(model="tiny", prompt="lp", max_tokens=4,
                                              logprobs=2, stream=True, **GREEDY))
    values = [v for ch in streamed if ch.choices[0].logprobs
              for v in ch.choices[0].logprobs.token_logprobs]
    assert values == pytest.approx(lp.token_logprobs)


def test_logprobs_reflect_steering(client):
    """The reported distribution is the steered one: a +100 bias makes a token certain."""
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "b"}], max_tokens=3,
        logprobs=True, top_logprobs=1, logit_bias={"35": 100}, **GREEDY)
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == ["A"] * 3  # id 35 is the byte 'A' in this vocab
    assert all(e.logprob > -1e-3 for e in content)


def test_extra_body_steering_with_ngram_prior(srv, client):
    r = httpx.post(srv.url + "/v1/priors", timeout=60,
                   json={"name": "style", "text": "the cat sat on the mat. " * 20})
    assert r.status_code == 201, r.text
    kw = dict(model="tiny", messages=[{"role": "user", "content": "tell me"}], max_tokens=8,
              temperature=0)
    plain = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    steered = client.chat.completions.create(**kw, extra_body={
        "ignore_eos": True, "diagnostics": True,
        "steering": [{"type": "ngram", "prior": "style", "lambda": 1.0}]})
    choice = steered.choices[0]
    assert choice.message.content != plain.choices[0].message.content
    diag = choice.model_extra["diagnostics"]
    assert diag["steps"] == 8 and diag["kl_base_steered_mean"] > 0
    # The same through /v1/completions, streaming: diagnostics ride on the last chunk.
    chunks = list(client.completions.create(
        model="tiny", prompt="tell me", max_tokens=4, temperature=0, stream=True,
        extra_body={"steering": [{"type": "ngram", "prior": "style", "lambda": 0.5}],
                    "diagnostics": True}))
    assert chunks[-1].choices[0].model_extra["diagnostics"]["steps"] >= 1


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"n": 1000}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logit_bias": {"5": 500}}, "logit_bias.5"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"extra_body": {"steering": [{"type": "nope"}]}}, "steering.0.type"),
        ({"logit_bias": {"1": 1}, "extra_body": {"steering": [{"type": "nope"}]}},
         "steering.0.type"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages.0.content.0.type"),
    ],
)
def test_bad_values_raise_bad_request(client, kwargs, param):
    kw = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(**kw)
    assert exc.value.status_code == 400
    assert exc.value.body["param"] == param, exc.value.body
    assert exc.value.body["type"] == "invalid_request_error"


def test_completion_specific_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", echo=True)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", logprobs=50)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[])


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)
    assert exc.value.code == "model_not_found"


def test_unsupported_fields_are_ignored_with_a_note(client, caplog):
    with caplog.at_level(logging.INFO, logger="steerserve.openai"):
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
            frequency_penalty=0.5, response_format={"type": "json_object"}, user="u",
            extra_body={"some_vendor_field": 1})
    assert r.choices[0].finish_reason in ("stop", "length")
    note = " ".join(rec.getMessage() for rec in caplog.records)
    assert "response_format" in note and "some_vendor_field" in note
    # frequency_penalty is implemented now; what is still ignored is in the warnings too.
    assert "frequency_penalty" not in note
    warnings = r.model_dump().get("warnings") or []
    assert any(w.startswith("response_format:") for w in warnings)
    assert any(w.startswith("some_vendor_field:") for w in warnings)
    assert not any("frequency_penalty" in w for w in warnings)


def test_presence_and_frequency_penalties_reach_the_sampler(srv, client):
    """Both endpoints pass the penalties on (OpenAI semantics are unit-tested in
    tests/unit/test_sampler.py): a strong penalty changes greedy output, and the OpenAI
    and native endpoints agree token for token."""
    kw = {"model": "tiny", "prompt": "the the the", "max_tokens": 12, "logprobs": 0, **GREEDY}
    plain = client.completions.create(**kw)
    pen = client.completions.create(**kw, presence_penalty=2.0, frequency_penalty=2.0)
    assert pen.choices[0].text != plain.choices[0].text
    native = httpx.post(srv.url + "/v1/generate", timeout=60, json={
        "prompt": "the the the", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "presence_penalty": 2.0, "frequency_penalty": 2.0})
    assert native.status_code == 200, native.text
    assert native.json()["text"] == pen.choices[0].text
    bad = httpx.post(srv.url + "/v1/generate", timeout=60,
                     json={"prompt": "x", "presence_penalty": 2.5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "presence_penalty"


def test_error_after_stream_started_is_in_band(srv, client, monkeypatch):
    runner = srv.engine.runner

    def broken_decode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "decode", broken_decode)
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5,
        stream=True, **GREEDY)
    with pytest.raises(openai.APIError, match="boom"):
        for _ in stream:
            pass
    monkeypatch.undo()
    r = client.completions.create(model="tiny", prompt="ok", max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_logprobs_in_a_mixed_batch_equal_solo_runs(client):
    """Rows asking for different top-k (or none) share a batch; each gets its own."""
    import threading

    asks = [None, 0, 2, 5]

    def run(k):
        kw = {"logprobs": k} if k is not None else {}
        r = client.completions.create(model="tiny", prompt=f"mix{k}", max_tokens=6, **kw,
                                      **GREEDY)
        return r.choices[0]

    solo = {k: run(k) for k in asks}
    together: dict = {}
    threads = [threading.Thread(target=lambda k=k: together.__setitem__(k, run(k)))
               for k in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together[None].logprobs is None
    for k in asks[1:]:
        a, b = solo[k].logprobs, together[k].logprobs
        assert a.tokens == b.tokens and solo[k].text == together[k].text
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
        assert all(len(t) <= k for t in b.top_logprobs)
