"""The sync and async clients behave alike: same sweep calls with the same ``concurrency``
meaning, same stream laziness; grid paths the server would reject are rejected here
too; a stream's collected answer reports only counts the server sent."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from typing import Any

import pytest

from clients import AsyncSteerClient, LogitBias, SteerClient
from clients._base import RequestSpec
from clients._grid import set_path
from clients.exceptions import APIStatusError, NotFoundError
from clients.streaming import _Reader
from clients.types import GenerateResponse, SweepResponse
from server.api.errors import APIError as ServerAPIError
from server.api.sweep import set_path as server_set_path

from .conftest import gen_body

GRID = {"steering.0.bias.70": [0, 3, 50], "temperature": [0.0, 1.0]}
PROMPTS = ["a", "b", "c"]
CONCURRENCY = 2
HOLD_S = 0.05  # long enough for CONCURRENCY calls to overlap on a loaded machine


def _fake_answer(spec: RequestSpec) -> GenerateResponse | SweepResponse:
    """What a server would answer, independent of the client's bookkeeping."""
    body = spec.json
    if spec.path == "/v1/generate":
        tok = int(body["steering"][0]["bias"]["70"])
        return GenerateResponse.model_validate(gen_body(token_ids=[tok]))
    assert spec.path == "/v1/sweep"
    keys = list(body["grid"])
    results = []
    for combo in itertools.product(*(body["grid"][k] for k in keys)):
        params = dict(zip(keys, combo, strict=True))
        tok = int(params["steering.0.bias.70"])
        results.append({"params": params, "response": gen_body(token_ids=[tok])})
    return SweepResponse.model_validate({"results": results[::-1]})  # any order


class _Recorder:
    """Counts calls in flight (the oracle for ``concurrency``) and records each call."""

    def __init__(self, sweep_endpoint: bool) -> None:
        self.sweep_endpoint = sweep_endpoint
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.calls: list[tuple[str, str]] = []

    def enter(self, spec: RequestSpec) -> None:
        with self.lock:
            self.calls.append((spec.path, json.dumps(spec.json, sort_keys=True)))
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    def leave(self, spec: RequestSpec) -> Any:
        with self.lock:
            self.in_flight -= 1
        if spec.path == "/v1/sweep" and not self.sweep_endpoint:
            raise NotFoundError("no such endpoint", status=404)  # a route 404: no param
        return _fake_answer(spec)


def _sync_run(recorder: _Recorder, **kw: Any) -> Any:
    c = SteerClient("http://unused.invalid")

    def call(spec: RequestSpec, model: Any) -> Any:
        recorder.enter(spec)
        time.sleep(HOLD_S)
        return recorder.leave(spec)

    c.call = call  # type: ignore[method-assign]  # the transport is what is replaced
    with c:
        return c.sweep(PROMPTS, steering=[LogitBias({70: 0})], grid=GRID,
                       concurrency=CONCURRENCY, **kw)


def _async_run(recorder: _Recorder, **kw: Any) -> Any:
    async def run() -> Any:
        c = AsyncSteerClient("http://unused.invalid")

        async def call(spec: RequestSpec, model: Any) -> Any:
            recorder.enter(spec)
            await asyncio.sleep(HOLD_S)
            return recorder.leave(spec)

        c.call = call  # type: ignore[method-assign]
        async with c:
            return await c.sweep(PROMPTS, steering=[LogitBias({70: 0})], grid=GRID,
                                 concurrency=CONCURRENCY, **kw)

    return asyncio.run(run())


@pytest.mark.parametrize("sweep_endpoint", [True, False], ids=["v1-sweep", "fallback"])
def test_sync_and_async_sweeps_send_the_same_calls_with_the_same_concurrency(sweep_endpoint):
    sync_rec, async_rec = _Recorder(sweep_endpoint), _Recorder(sweep_endpoint)
    sync = _sync_run(sync_rec)
    asyn = _async_run(async_rec)
    # The same calls (probe first), as many at once as allowed, never more.
    assert sync_rec.calls[0] == async_rec.calls[0] and sync_rec.calls[0][0] == "/v1/sweep"
    assert sorted(sync_rec.calls) == sorted(async_rec.calls)
    n_points = 3 * 2
    expected = (1 + len(PROMPTS) * n_points) if not sweep_endpoint else len(PROMPTS)
    assert len(sync_rec.calls) == expected
    assert sync_rec.peak == async_rec.peak == CONCURRENCY
    # And the same table, in grid order, whatever order the answers came in.
    assert [r.token_ids for r in sync.rows] == [r.token_ids for r in asyn.rows]
    assert [r.token_ids for r in sync.rows] == [[0], [0], [3], [3], [50], [50]] * 3


def test_fallback_request_is_the_generate_body_with_the_point_set():
    rec = _Recorder(sweep_endpoint=False)
    _sync_run(rec, max_tokens=5)
    generates = [json.loads(body) for path, body in rec.calls if path == "/v1/generate"]
    first = generates[0]
    assert first == {"prompt": "a", "max_tokens": 5, "temperature": 0.0,
                     "steering": [{"type": "logit_bias", "bias": {"70": 0}}]}


# ------------------------------------------------------------------ grid paths


@pytest.mark.parametrize("path", [
    "steering.0.bias.70", "steering.-1.bias.70", "steering.1.bias.70", "steering.+0.bias.70",
    "steering. 0.bias.70", "temperature", "steering.x.lambda",
])
def test_client_rejects_exactly_the_grid_paths_the_server_rejects(path):
    def body() -> dict[str, Any]:
        return {"prompt": "a", "steering": [{"type": "logit_bias", "bias": {"70": 0}}]}

    try:
        server_set_path(body(), path, 1.0, "grid")
        server_ok = True
    except ServerAPIError:
        server_ok = False
    try:
        set_path(body(), path, 1.0)
        client_ok = True
    except ValueError:
        client_ok = False
    assert client_ok == server_ok


# ------------------------------------------------------------------ streams


def _feed(reader: _Reader, frames: list[str]) -> None:
    for frame in frames:
        reader.feed(f"data: {frame}", None)
        reader.feed("", None)


def test_collected_stream_reports_the_servers_usage_and_extras():
    reader = _Reader()
    lp = {"token_id": 5, "logprob": -0.5, "top": [{"token_id": 5, "logprob": -0.5}]}
    _feed(reader, [
        json.dumps({"id": "g", "model": "m", "text": "a", "token_ids": [5], "logprobs": [lp]}),
        json.dumps({"id": "g", "model": "m", "text": "", "token_ids": [], "finish_reason":
                    "length", "usage": {"prompt_tokens": 7, "completion_tokens": 1,
                                        "total_tokens": 8}, "warnings": ["w"]}),
        "[DONE]",
    ])
    r = reader.response()
    assert r.usage.prompt_tokens == 7 and r.token_ids == [5] and r.warnings == ["w"]
    assert r.logprobs is not None and r.logprobs[0].logprob == -0.5


def test_collected_stream_without_usage_is_an_error_not_zero_counts():
    reader = _Reader()
    _feed(reader, [
        json.dumps({"id": "g", "model": "m", "text": "a", "token_ids": [5],
                    "finish_reason": "length"}),
        "[DONE]",
    ])
    with pytest.raises(APIStatusError, match="no usage"):
        reader.response()


def test_sync_and_async_streams_send_nothing_until_used(fake):
    srv, script = fake
    frames = [json.dumps({**gen_body(token_ids=[5]), "text": "x"}), "[DONE]"]
    script.plan["/v1/generate"] = [(200, frames, {})]
    with SteerClient(srv.url) as c:
        s = c.stream("x")
        assert script.hits == {}
        with s:
            assert script.hits == {"/v1/generate": 1}
            assert [e.token_ids for e in s] == [[5]]

    async def run() -> None:
        async with AsyncSteerClient(srv.url) as ac:
            s = ac.stream("x")
            await asyncio.sleep(0)
            assert script.hits == {"/v1/generate": 1}
            assert [e.token_ids async for e in s] == [[5]]

    asyncio.run(run())
    assert script.hits == {"/v1/generate": 2}


def test_logprobs_and_usage_agree_between_generate_and_collected_stream(real_server):
    greedy = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True, "logprobs": 2}
    with SteerClient(real_server.url, timeout=30) as c:
        r = c.generate("hello", **greedy)
        with c.stream("hello", **greedy) as s:
            streamed = s.collect()
    assert r.logprobs is not None and [e.token_id for e in r.logprobs] == r.token_ids
    assert all(len(e.top) == 2 for e in r.logprobs)
    # Greedy: the chosen token is the most likely alternative.
    assert all(e.top[0].token_id == e.token_id for e in r.logprobs)
    assert streamed.token_ids == r.token_ids and streamed.usage == r.usage
    assert streamed.logprobs == r.logprobs
