"""Issue 15.2 over HTTP: a steering stack that makes a row's logits non-finite ends the
request with 422 naming the entry — as the HTTP status when it happens before the first
token, streaming or not (the stream's headers wait for the first engine event)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from processors.stack import _REGISTRY, register
from tests.conftest import live_server
from tests.unit.test_engine_device import _Poison


@pytest.fixture
def server(tiny_bundle: Any, tmp_path: Path) -> Iterator[Any]:
    register(_Poison)
    try:
        with live_server(tiny_bundle, tmp_path) as srv:
            yield srv
    finally:
        _REGISTRY.pop("test_poison", None)


POISON = [{"type": "logit_bias", "bias": {"3": 1.0}}, {"type": "test_poison", "kind": "nan"}]


@pytest.mark.parametrize("stream", [False, True])
def test_native_generate_answers_422_before_any_token(server: Any, stream: bool) -> None:
    r = httpx.post(server.url + "/v1/generate", timeout=60, json={
        "prompt": "hello there", "max_tokens": 4, "temperature": 0, "stream": stream,
        "steering": POISON})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert "steering.1" in err["message"] and "test_poison" in err["message"]
    assert not r.headers["content-type"].startswith("text/event-stream")


def test_openai_stream_answers_422_before_any_chunk(server: Any) -> None:
    model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": model, "prompt": "hello there", "max_tokens": 4, "temperature": 0, "stream": True,
        "steering": POISON})
    assert r.status_code == 422, r.text
    assert "test_poison" in r.json()["error"]["message"]


def test_a_healthy_stream_still_streams(server: Any) -> None:
    with httpx.stream("POST", server.url + "/v1/generate", timeout=60, json={
            "prompt": "hello there", "max_tokens": 3, "temperature": 0, "stream": True,
            "ignore_eos": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3
