"""API keys (STEER_API_KEY) and CORS."""

from __future__ import annotations

import httpx
import openai
import pytest

from server.api.auth import APIKeyAuth
from server.settings import Settings
from tests.conftest import live_server

BODY = {"model": "tiny", "prompt": "x", "max_tokens": 2}


@pytest.fixture(scope="module")
def keyed(tiny_bundle, tmp_path_factory):
    with live_server(tiny_bundle, tmp_path_factory.mktemp("auth"), api_key="k-one, k-two") as s:
        yield s


def test_v1_needs_a_key(keyed):
    r = httpx.post(keyed.url + "/v1/completions", json=BODY, timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    assert "Authorization" in err["message"]
    for header in ("Bearer nope", "Basic k-one", "k-one", "Bearer k-one-and-more"):
        r = httpx.get(keyed.url + "/v1/models", headers={"Authorization": header}, timeout=10)
        assert r.status_code == 401, header
        assert r.json()["error"]["message"] == "invalid API key"
    for key in ("k-one", "k-two"):  # several keys, comma-separated, spaces trimmed
        r = httpx.post(keyed.url + "/v1/completions", json=BODY, timeout=30,
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
    # An unknown /v1 path is 401 too: no probing the API without a key.
    assert httpx.get(keyed.url + "/v1/nothing", timeout=10).status_code == 401


def test_health_and_metrics_stay_open(keyed):
    assert httpx.get(keyed.url + "/health", timeout=10).status_code == 200
    assert httpx.get(keyed.url + "/metrics", timeout=10).status_code == 200


def test_openai_client_with_and_without_the_key(keyed):
    with openai.OpenAI(base_url=keyed.url + "/v1", api_key="k-two", max_retries=0) as c:
        assert c.completions.create(**BODY).usage.completion_tokens <= 2
    with openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])


def test_no_key_configured_means_open(tiny_bundle, tmp_path):
    with live_server(tiny_bundle, tmp_path) as s:
        assert httpx.post(s.url + "/v1/completions", json=BODY, timeout=30).status_code == 200
        # CORS is off by default: no CORS headers, preflight not answered as CORS.
        r = httpx.options(s.url + "/v1/completions", timeout=10, headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers


def test_exempt_paths_are_configurable(tiny_bundle, tmp_path):
    with live_server(tiny_bundle, tmp_path, api_key="k", auth_exempt_paths="/health") as s:
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        assert httpx.get(s.url + "/metrics", timeout=10).status_code == 401
        r = httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer k"}, timeout=10)
        assert r.status_code == 200


def test_cors_origins(tiny_bundle, tmp_path):
    with live_server(tiny_bundle, tmp_path, api_key="k",
                     cors_origins="https://app.example") as s:
        pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}
        r = httpx.options(s.url + "/v1/completions", headers=pre, timeout=10)
        assert r.status_code == 200  # preflight needs no key
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.post(s.url + "/v1/completions", json=BODY, timeout=30, headers={
            "Origin": "https://app.example", "Authorization": "Bearer k"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.options(s.url + "/v1/completions", timeout=10,
                          headers={**pre, "Origin": "https://evil.example"})
        assert r.status_code == 400


def test_key_comparison_and_settings_parsing(monkeypatch):
    monkeypatch.setenv("STEER_API_KEY", "a,b ,, c")
    assert Settings().api_keys == ("a", "b", "c")
    auth = APIKeyAuth(None, ["secret"], exempt=["/health"])
    assert auth.authorized(b"Bearer secret") and auth.authorized(b"bearer secret")
    assert not auth.authorized(b"Bearer secre") and not auth.authorized(None)
    assert auth.protected("/v1/generate") and auth.protected("/metrics")
    assert not auth.protected("/health") and not auth.protected("/docs")
