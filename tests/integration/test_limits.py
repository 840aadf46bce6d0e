"""Limits are settings: each one is enforced with the documented status and envelope."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import live_server

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}


@pytest.fixture(scope="module")
def srv(tiny_bundle, tmp_path_factory):
    with live_server(tiny_bundle, tmp_path_factory.mktemp("limits"), max_n=2,
                     max_prompt_tokens=40, max_tokens_limit=16, max_steering_entries=1,
                     max_prompts=2, max_body_bytes=4096) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    with openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"n": 3}, "n"),
        ({"max_tokens": 17}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "y" * 30}]}, "messages"),
        ({"logit_bias": {"1": 1}, "extra_body": {"steering": [{"type": "logit_bias",
                                                               "bias": {"2": 1}}]}},
         "steering"),
    ],
)
def test_limit_is_400_naming_the_param(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(**{**CHAT, **kwargs})
    assert exc.value.body["param"] == param
    assert str(exc.value.body["message"])


def test_prompt_count_limit(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt=["a", "b", "c"], max_tokens=1)
    assert "at most 2 prompts" in exc.value.body["message"]


def test_body_size_is_413(client):
    with pytest.raises(openai.APIStatusError) as exc:
        client.completions.create(model="tiny", prompt="z" * 5000, max_tokens=1)
    assert exc.value.status_code == 413
    assert exc.value.body["type"] == "request_too_large"


def test_queue_full_is_429_rate_limit_error(tiny_bundle, tmp_path):
    with live_server(tiny_bundle, tmp_path, max_queue=0, retry_after_s=2) as s:
        with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0) as c:
            with pytest.raises(openai.RateLimitError) as exc:
                c.completions.create(model="tiny", prompt="q", max_tokens=2)
        assert exc.value.response.headers["retry-after"] == "2"


def test_request_timeout_frees_the_slot(tiny_bundle, tmp_path):
    with live_server(tiny_bundle, tmp_path, request_timeout_s=0.4, max_batch_size=1) as s:
        long = {"model": "tiny", "prompt": "t", "max_tokens": 1000, "ignore_eos": True}
        # One slot and two choices submitted together (n = 2: one submit, one deadline
        # clock): the first runs out of time decoding, the second in the queue. (Two
        # separate posts raced: the later one kept the gap between them to decode in.)
        body = httpx.post(s.url + "/v1/completions", json={**long, "n": 2, "logprobs": 0},
                          timeout=60).json()
        reasons = sorted(c["finish_reason"] for c in body["choices"])
        assert reasons == ["timeout", "timeout"]
        tokens = sorted(len(c["logprobs"]["tokens"]) for c in body["choices"])
        assert tokens[0] <= 1 < tokens[1]  # the queued one timed out (about) unstarted
        assert sum(tokens) == body["usage"]["completion_tokens"]
        assert s.engine.running == 0 and s.engine.waiting == 0
        # The slot is free again: a short request completes normally.
        r = httpx.post(s.url + "/v1/completions", timeout=30, json={**long, "max_tokens": 3})
        assert r.json()["choices"][0]["finish_reason"] == "length"
        metrics = httpx.get(s.url + "/metrics", timeout=10).text
        assert 'steerserve_requests_finished_total{finish_reason="timeout"} 2.0' in metrics
