"""Retries, backoff, configuration and in-band stream errors against a scripted server."""

from __future__ import annotations

import asyncio

import pytest

from clients import (
    APIConnectionError,
    AsyncSteerClient,
    BadRequestError,
    ConflictError,
    InternalServerError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    SteerClient,
    SteerError,
)
from clients._base import BaseClient
from tests.conftest import free_port

from .conftest import envelope, gen_body

GEN = "/v1/generate"


def recording(client):
    """Replace the client's sleep with a recorder (no real waiting)."""
    slept: list[float] = []
    client._sleep = slept.append
    return slept


def test_429_retried_with_retry_after_then_succeeds(fake):
    srv, script = fake
    limited = (429, envelope(429, "queue full"), {"Retry-After": "1"})
    script.plan[GEN] = [limited, limited, (200, gen_body("done"), {})]
    with SteerClient(srv.url) as c:
        slept = recording(c)
        r = c.generate("x")
    assert r.text == "done"
    assert script.hits[GEN] == 3 and slept == [1.0, 1.0]


def test_real_sleep_with_retry_after_zero(fake):
    srv, script = fake
    script.plan[GEN] = [(429, envelope(429, "full"), {"Retry-After": "0"}),
                        (200, gen_body(), {})]
    with SteerClient(srv.url) as c:
        assert c.generate("x").text == "ok"
    assert script.hits[GEN] == 2


def test_retries_exhausted_raises_last_error(fake):
    srv, script = fake
    script.plan[GEN] = [(429, envelope(429, "full"), {"Retry-After": "0"})]
    with SteerClient(srv.url, max_retries=1) as c:
        with pytest.raises(RateLimitError) as info:
            c.generate("x")
    assert script.hits[GEN] == 2 and info.value.retry_after == 0.0


def test_400_is_not_retried(fake):
    srv, script = fake
    script.plan[GEN] = [(400, envelope(400, "bad lambda", "steering.0.lambda"), {})]
    with SteerClient(srv.url, max_retries=5) as c:
        with pytest.raises(BadRequestError) as info:
            c.generate("x")
    assert script.hits[GEN] == 1
    assert info.value.param == "steering.0.lambda" and info.value.message == "bad lambda"


def test_5xx_backoff_is_exponential_with_jitter(fake):
    srv, script = fake
    script.plan[GEN] = [(500, envelope(500, "boom"), {})]
    with SteerClient(srv.url, max_retries=3, backoff_base=0.5, backoff_max=1.5) as c:
        slept = recording(c)
        with pytest.raises(InternalServerError):
            c.generate("x")
    assert script.hits[GEN] == 4 and len(slept) == 3
    for got, full in zip(slept, [0.5, 1.0, 1.5], strict=True):  # capped at backoff_max
        assert 0.75 * full <= got <= full


@pytest.mark.parametrize(("status", "cls"), [
    (409, ConflictError), (413, PayloadTooLargeError), (503, ServiceUnavailableError),
    (502, InternalServerError), (418, SteerError),
])
def test_status_mapping(fake, status, cls):
    srv, script = fake
    script.plan["/v1/priors"] = [(status, envelope(status, "nope", "name"), {})]
    with SteerClient(srv.url, max_retries=0) as c:
        with pytest.raises(cls) as info:
            c.priors.build("p", text="abc")
    assert info.value.status == status and info.value.param == "name"


def test_non_json_error_body(fake):
    srv, script = fake
    script.plan[GEN] = [(413, b"too big", {})]
    with SteerClient(srv.url) as c:
        with pytest.raises(PayloadTooLargeError) as info:
            c.generate("x")
    assert "too big" in info.value.message


def test_connection_error_retried_then_raised():
    with SteerClient(f"http://127.0.0.1:{free_port()}", max_retries=2) as c:
        slept = recording(c)
        with pytest.raises(APIConnectionError):
            c.health()  # health is never retried
        assert slept == []
        with pytest.raises(APIConnectionError):
            c.models()
    assert len(slept) == 2


def test_async_retries_503(fake):
    srv, script = fake
    script.plan[GEN] = [(503, envelope(503, "loading"), {"Retry-After": "0"}),
                        (200, gen_body("async ok"), {})]

    async def run() -> str:
        async with AsyncSteerClient(srv.url) as c:
            return (await c.generate("x")).text

    assert asyncio.run(run()) == "async ok"
    assert script.hits[GEN] == 2


def test_env_configuration_and_bearer(fake, monkeypatch):
    srv, script = fake
    script.plan[GEN] = [(200, gen_body(), {})]
    monkeypatch.setenv("STEER_BASE_URL", srv.url + "/")
    monkeypatch.setenv("STEER_API_KEY", "sekret")
    with SteerClient() as c:
        assert c.base_url == srv.url
        c.generate("x", steering=[{"type": "margin", "tau": 0.5, "gamma": 1.0}],
                   extra_body={"custom": 1})
    assert script.headers[-1]["authorization"] == "Bearer sekret"
    body = script.bodies[-1]
    assert body == {"prompt": "x", "steering": [{"type": "margin", "tau": 0.5, "gamma": 1.0}],
                    "custom": 1}
    monkeypatch.delenv("STEER_BASE_URL")
    monkeypatch.delenv("STEER_API_KEY")
    c2 = BaseClient()
    assert c2.base_url == "http://127.0.0.1:8000" and "Authorization" not in c2.default_headers()


ERROR_FRAME = '{"error": {"message": "engine died", "type": "server_error", "code": 503}}'
TOKEN_FRAME = ('{"id": "g", "model": "fake", "text": "a", "token_ids": [5], '
               '"finish_reason": null}')


def test_in_band_stream_error_raises(fake):
    srv, script = fake
    script.plan[GEN] = [(200, [TOKEN_FRAME, ERROR_FRAME, "[DONE]"], {})]
    with SteerClient(srv.url) as c:
        seen = []
        with pytest.raises(ServiceUnavailableError) as info:
            for ev in c.stream("x"):
                seen.append(ev)
    assert [e.token_ids for e in seen] == [[5]]
    assert info.value.message == "engine died" and info.value.status == 503


def test_in_band_stream_error_raises_async(fake):
    srv, script = fake
    script.plan[GEN] = [(200, [TOKEN_FRAME, ERROR_FRAME, "[DONE]"], {})]

    async def run() -> None:
        async with AsyncSteerClient(srv.url) as c:
            async for _ in c.stream("x"):
                pass

    with pytest.raises(ServiceUnavailableError):
        asyncio.run(run())


def test_stream_ending_without_final_event(fake):
    srv, script = fake
    script.plan[GEN] = [(200, [TOKEN_FRAME, "[DONE]"], {})]
    with SteerClient(srv.url) as c:
        with pytest.raises(APIConnectionError):
            c.stream("x").collect()


def test_gguf_upload_and_download(fake, tmp_path):
    srv, script = fake
    name = "/v1/control-vectors/my.vec/gguf"
    script.plan[name] = [(201, {"name": "my.vec", "layers": [1, 2]}, {})]
    f = tmp_path / "v.gguf"
    f.write_bytes(b"GGUF\x03rest")
    with SteerClient(srv.url) as c:
        cv = c.vectors.import_gguf("my.vec", f)
        assert cv.name == "my.vec" and cv.layers == [1, 2]
        assert script.bodies[-1] == b"GGUF\x03rest"
        assert script.headers[-1]["content-type"] == "application/octet-stream"
        script.plan[name] = [(200, b"GGUF\x03back", {})]
        out = tmp_path / "out.gguf"
        assert c.vectors.export_gguf("my.vec", out) == b"GGUF\x03back"
    assert out.read_bytes() == b"GGUF\x03back"


def test_read_timeout_is_not_retried_but_connect_timeout_is():
    import httpx

    from clients import APITimeoutError
    from clients._base import RequestSpec

    c = BaseClient(max_retries=2)
    spec = RequestSpec("POST", "/v1/generate")
    read = c.transport_error(httpx.ReadTimeout("slow"))
    connect = c.transport_error(httpx.ConnectTimeout("down"))
    assert isinstance(read, APITimeoutError) and isinstance(connect, APITimeoutError)
    assert not c.should_retry(spec, 0, error=read)
    assert c.should_retry(spec, 0, error=connect) and not c.should_retry(spec, 2, error=connect)
