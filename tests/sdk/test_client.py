"""SteerClient / AsyncSteerClient against the real server (tiny model)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from clients import (
    AsyncSteerClient,
    BadRequestError,
    GenerateResponse,
    LogitBias,
    NotFoundError,
    RateLimitError,
    SteerClient,
)
from tests.conftest import live_server

GREEDY = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(real_server):
    with SteerClient(real_server.url, timeout=30) as c:
        yield c


def test_generate_sync(client):
    r = client.generate("hello", **GREEDY)
    assert isinstance(r, GenerateResponse)
    assert r.finish_reason == "length" and len(r.token_ids) == 6
    assert r.usage.completion_tokens == 6 and r.model == "tiny"


def test_logit_bias_builder_steers(client):
    r = client.generate("hello", steering=[LogitBias({70: 100})], **GREEDY)
    assert r.token_ids == [70] * 6


def test_generate_async_matches_sync(client, real_server):
    sync = client.generate("hello", **GREEDY)

    async def run() -> GenerateResponse:
        async with AsyncSteerClient(real_server.url, timeout=30) as ac:
            return await ac.generate("hello", **GREEDY)

    assert asyncio.run(run()).token_ids == sync.token_ids


def test_stream_sync_equals_generate(client):
    plain = client.generate("stream me", diagnostics=True, **GREEDY)
    with client.stream("stream me", diagnostics=True, **GREEDY) as stream:
        events = list(stream)
    assert all(e.finish_reason is None for e in events[:-1])
    last = events[-1]
    assert last.finish_reason == "length" and last.usage.completion_tokens == 6
    assert last.diagnostics is not None
    assert [t for e in events for t in e.token_ids] == plain.token_ids
    assert "".join(e.text for e in events) == plain.text


def test_stream_async_collect(client, real_server):
    plain = client.generate("async stream", **GREEDY)

    async def run() -> tuple[int, GenerateResponse]:
        async with AsyncSteerClient(real_server.url, timeout=30) as ac:
            n = 0
            async for _ in ac.stream("async stream", **GREEDY):
                n += 1
            async with ac.stream("async stream", **GREEDY) as s:
                collected = await s.collect()
            return n, collected

    n, collected = asyncio.run(run())
    assert n >= 2
    assert collected.token_ids == plain.token_ids and collected.text == plain.text


def test_bad_request_maps_to_400_with_param(client):
    with pytest.raises(BadRequestError) as info:
        client.generate("x", temperature=-1.0)
    e = info.value
    assert e.status == 400 and e.param == "temperature"
    assert e.type == "invalid_request_error" and e.response is not None
    with pytest.raises(BadRequestError) as info:
        client.generate("x", steering=[LogitBias({999999: 1.0})])
    assert info.value.param.startswith("steering.0")


def test_stream_http_error_raises_on_first_use(client):
    stream = client.stream("x", max_tokens=0)  # lazy, like the async client: nothing sent
    assert stream.response is None
    with pytest.raises(BadRequestError):
        with stream:
            pass


def test_unknown_endpoint_is_not_found(client):
    with pytest.raises(NotFoundError):
        client.vectors.get("nope")


def test_health_and_models(client):
    h = client.health()
    assert h.ready and h.model == "tiny"
    models = client.models()
    assert models.data[0].id == "tiny" and models.data[0].vocab_size == 259


def test_queue_full_is_rate_limit(tiny_bundle, tmp_path):
    with live_server(tiny_bundle, tmp_path, max_queue=0, retry_after_s=7) as srv:
        with SteerClient(srv.url, max_retries=0) as c:
            with pytest.raises(RateLimitError) as info:
                c.generate("q", max_tokens=2)
    assert info.value.status == 429 and info.value.retry_after == 7.0


def test_import_does_not_pull_torch():
    code = ("import clients, clients.cli, sys; "
            "bad = [m for m in ('torch', 'server', 'pandas', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
