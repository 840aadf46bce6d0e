"""HTTP tests against a real uvicorn server on a free port (tiny random model)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from server.api import state as state_module
from server.api.app import create_app
from server.settings import Settings
from tests.conftest import LiveServer, live_server


@pytest.fixture(scope="module")
def srv(tiny_bundle, tmp_path_factory):
    with live_server(tiny_bundle, tmp_path_factory.mktemp("http"), max_queue=4) as s:
        yield s


def post(srv, body, **kw):
    return httpx.post(srv.url + "/v1/generate", json=body, timeout=60, **kw)


def read_sse(resp: httpx.Response) -> list:
    frames = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            frames.append(data if data == "[DONE]" else json.loads(data))
    return frames


def test_generate_non_streaming(srv):
    r = post(srv, {"prompt": "hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200
    body = r.json()
    assert body["finish_reason"] == "length" and len(body["token_ids"]) == 6
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    assert body["model"] == "tiny" and body["id"].startswith("gen-")


def test_streaming_equals_non_streaming(srv):
    req = {"prompt": "stream me", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = post(srv, req).json()
    with httpx.stream("POST", srv.url + "/v1/generate", json={**req, "stream": True},
                      timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = read_sse(r)
    assert frames[-1] == "[DONE]"
    events = frames[:-1]
    assert all(e["finish_reason"] is None for e in events[:-1])
    last = events[-1]
    assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 12
    assert [t for e in events for t in e["token_ids"]] == plain["token_ids"]
    assert "".join(e["text"] for e in events) == plain["text"]


def test_curl_style_form_content_type_is_json(srv):
    r = httpx.post(srv.url + "/v1/generate", content=b'{"prompt":"hi","max_tokens":2}',
                   headers={"content-type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 200 and len(r.json()["token_ids"]) <= 2


def test_chat_messages_use_the_template(srv):
    r = post(srv, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200
    # "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n": 3 special tokens + 18 bytes.
    assert r.json()["usage"]["prompt_tokens"] == 21


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 1024}, "max_tokens"),  # prompt + max_tokens > context
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "seed": -3}, "seed"),
        ({"prompt": "x", "bogus": 1}, "bogus"),
        ({"prompt": ""}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt"),
        ({"prompt": [1, 2, 999999]}, "prompt"),
        ({"prompt": "a" * 1100}, "prompt"),  # longer than the 1024-token context
        ({"messages": [{"role": "wizard", "content": "y"}]}, "messages.0.role"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "steering": [{"type": "wizardry"}]}, "steering.0.type"),
        ({"prompt": "x", "steering": [{"type": "fusion"}]}, "steering.0.experts"),
        ({"prompt": "x", "steering": [{"kind": "x"}]}, "steering.0.type"),
        ({"prompt": "x", "steering": [{"type": "logit_bias", "bias": {"1": 1}, "z": 0}]},
         "steering.0.z"),
        ({"prompt": "x", "steering": "nope"}, "steering"),
        ({"prompt": "x", "diagnostics": "yes"}, "diagnostics"),
        ({"prompt": "x", "min_tokens": 50, "max_tokens": 5}, "min_tokens"),
    ],
)
def test_bad_inputs_are_400_naming_the_param(srv, body, param):
    r = post(srv, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error" and err["code"] == 400 and err["message"]


def test_malformed_json_and_unknown_route(srv):
    r = httpx.post(srv.url + "/v1/generate", content=b'{"prompt": "x",',
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = httpx.get(srv.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_body_over_limit_is_413(tiny_bundle, tmp_path):
    with live_server(tiny_bundle, tmp_path, max_body_bytes=2048) as s:
        r = post(s, {"prompt": "a" * 5000})
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_models_and_health(srv):
    r = httpx.get(srv.url + "/v1/models", timeout=10).json()
    card = r["data"][0]
    assert card["role"] == "main" and card["vocab_size"] == 259
    assert len(card["tokenizer_fingerprint"]) == 64
    h = httpx.get(srv.url + "/health", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok"


def test_client_disconnect_frees_the_slot(srv):
    body = {"prompt": "z", "max_tokens": 900, "temperature": 0, "ignore_eos": True}
    # Streaming: read two frames, then drop the connection.
    with httpx.stream("POST", srv.url + "/v1/generate", json={**body, "stream": True},
                      timeout=60) as r:
        it = r.iter_lines()
        next(it)
        next(it)
    _wait_idle(srv)
    # Non-streaming: give up on the request after a short timeout.
    with pytest.raises(httpx.ReadTimeout):
        post(srv, body, ).raise_for_status() if False else httpx.post(
            srv.url + "/v1/generate", json=body, timeout=0.5)
    _wait_idle(srv)


def _wait_idle(srv, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if srv.engine.running == 0 and srv.engine.waiting == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: running={srv.engine.running}")


def test_queue_full_is_429_with_retry_after(tiny_bundle, tmp_path):
    # The engine-level test fills a real queue; here a zero-length queue checks the mapping.
    with live_server(tiny_bundle, tmp_path, max_queue=0, retry_after_s=3) as s:
        r = post(s, {"prompt": "q", "max_tokens": 2})
        assert r.status_code == 429
        assert r.headers["retry-after"] == "3"
        assert r.json()["error"]["type"] == "rate_limit_error"


def test_health_is_503_while_loading(tiny_bundle, tmp_path, monkeypatch):
    release = threading.Event()

    def slow_load(*args, **kwargs):
        release.wait(30)
        return tiny_bundle

    monkeypatch.setattr(state_module, "load_model", slow_load)
    app = create_app(Settings(model="random:tiny", data_dir=tmp_path))
    srv = LiveServer(app)
    srv.thread.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                h = httpx.get(srv.url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = post(srv, {"prompt": "x"})
        assert r.status_code == 503 and "Retry-After" in r.headers
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(srv.url + "/health", timeout=1).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert post(srv, {"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        release.set()
        srv.__exit__()


def test_native_logprobs(srv):
    base = {"prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    r = post(srv, {**base, "logprobs": 3}).json()
    lps = r["logprobs"]
    assert [e["token_id"] for e in lps] == r["token_ids"]
    for e in lps:
        assert e["logprob"] <= 0 and len(e["top"]) == 3
        # Greedy without steering: the emitted token is the most likely one.
        assert e["top"][0]["token_id"] == e["token_id"]
        assert e["top"][0]["logprob"] == pytest.approx(e["logprob"])
    assert "logprobs" not in post(srv, base).json()
    with httpx.stream("POST", srv.url + "/v1/generate", json={**base, "logprobs": 0,
                                                              "stream": True}, timeout=60) as s:
        frames = [f for f in read_sse(s) if f != "[DONE]"]
    streamed = [e for f in frames for e in f.get("logprobs", [])]
    assert [e["token_id"] for e in streamed] == r["token_ids"]
    assert all(e["top"] == [] for e in streamed)
    assert post(srv, {**base, "logprobs": 21}).json()["error"]["param"] == "logprobs"
