"""Limits that must hold *before* work is done (issue 14).

Each test asserts the status and param of the answer and, with a spy on the expensive
step (the tokenizer, the template expansion, the GGUF parser, the build itself), that
the step was never reached; build limits are checked by what was stored and by the
build observing its cancellation, never by wall-clock bounds.
"""

# Raw JSON bodies are spelled with %-formatting: str.format would double every brace.
# ruff: noqa: UP031

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.api import priors as priors_api
from server.api import vectors as vectors_api
from server.api.errors import MAX_MESSAGE_CHARS
from server.api.routes import public_source
from server.loading import ModelBundle
from server.settings import Settings
from tests.conftest import LiveServer
from tests.hardening.conftest import assert_envelope, gguf_bytes

HUGE = "1" + "0" * 400  # a JSON integer no float can hold


@pytest.fixture
def srv(cheap_server: LiveServer) -> LiveServer:
    """This module's server: the hardening conftest's (``http`` talks to it too)."""
    return cheap_server


@pytest.fixture
def settings(srv: LiveServer) -> Settings:
    return srv.app.state.steer.settings  # type: ignore[no-any-return]


class Spy:
    """Counts calls of a patched callable and forwards them."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture
def tokenizer_spy(tiny_bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch) -> Spy:
    """Every call of the serving tokenizer (encode and chat template) is counted."""
    cls = type(tiny_bundle.tokenizer)
    spy = Spy(cls.__call__)
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: spy(self, *a, **k))
    chat = Spy(cls.apply_chat_template)
    monkeypatch.setattr(cls, "apply_chat_template", lambda self, *a, **k: (
        setattr(spy, "calls", spy.calls + 1), chat(self, *a, **k))[1])
    return spy


# ------------------------------------------------------- numbers and media types
@pytest.mark.parametrize(("raw", "param"), [
    ('{"prompt": "hi", "max_tokens": 2, "steering": [{"type": "logit_bias", '
     '"bias": {"5": %s}}]}' % HUGE, "steering.0.bias.5"),
    ('{"prompt": "hi", "max_tokens": 2, "steering": [{"type": "ngram", "prior": "p", '
     '"margin": {"tau": %s}}]}' % HUGE, "steering.0.margin.tau"),
    ('{"prompt": "hi", "max_tokens": 2, "seed": -%s}' % HUGE, "seed"),
    ('{"prompt": "hi", "max_tokens": %s}' % ("9" * 5000), "max_tokens"),
])
@pytest.mark.parametrize("ctype", ["application/json", "application/vnd.steer+json",
                                   "application/merge-patch+json; charset=utf-8"])
def test_integers_beyond_float_range_are_400_naming_the_field(
    http: httpx.Client, raw: str, param: str, ctype: str, tokenizer_spy: Spy
) -> None:
    resp = http.post("/v1/generate", content=raw.encode(), headers={"content-type": ctype})
    err = assert_envelope(resp, 400)
    assert err["param"] == param, err
    assert "float range" in err["message"]
    assert tokenizer_spy.calls == 0


def test_huge_integer_in_sweep_grid_is_400(http: httpx.Client) -> None:
    raw = ('{"request": {"prompt": "hi", "max_tokens": 2}, "grid": {"temperature": [0, %s]}}'
           % HUGE)
    err = assert_envelope(http.post("/v1/sweep", content=raw.encode(),
                                    headers={"content-type": "application/json"}), 400)
    assert err["param"] == "grid.temperature.1"


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/priors"])
def test_plus_json_bodies_get_the_surrogate_guard(http: httpx.Client, path: str,
                                                  tokenizer_spy: Spy) -> None:
    raw = {"/v1/generate": '{"prompt": "a\\ud800b", "max_tokens": 2}',
           "/v1/priors": '{"name": "sur", "text": "a\\udfffb"}'}[path]
    resp = http.post(path, content=raw.encode(),
                     headers={"content-type": "application/problem+json"})
    err = assert_envelope(resp, 400)
    assert err["param"] in ("prompt", "text") and "surrogate" in err["message"]
    assert tokenizer_spy.calls == 0


def test_plus_json_is_still_parsed_as_json(http: httpx.Client) -> None:
    resp = http.post("/v1/generate", content=b'{"prompt": "hi", "max_tokens": 2}',
                     headers={"content-type": "application/vnd.api+json"})
    assert resp.status_code == 200, resp.text


# ------------------------------------------------------------- prompts and stops
def test_prompt_too_long_by_characters_is_refused_before_tokenizing(
    http: httpx.Client, tokenizer_spy: Spy
) -> None:
    # random:tiny: context 1024, no token longer than 13 characters.
    resp = http.post("/v1/generate", json={"prompt": "x" * 14_000, "max_tokens": 2})
    err = assert_envelope(resp, 400)
    assert err["param"] == "prompt" and "at least" in err["message"]
    assert tokenizer_spy.calls == 0
    resp = http.post("/v1/generate", json={
        "messages": [{"role": "user", "content": "y" * 7000}] * 2, "max_tokens": 2})
    assert assert_envelope(resp, 400)["param"] == "messages"
    assert tokenizer_spy.calls == 0


def test_prompt_under_the_bound_is_still_checked_exactly(http: httpx.Client,
                                                         tokenizer_spy: Spy) -> None:
    # 5000 characters could be ~400 tokens; the byte-level tiny tokenizer makes 5000.
    resp = http.post("/v1/generate", json={"prompt": "\u00e9" * 2500, "max_tokens": 2})
    err = assert_envelope(resp, 400)
    assert err["param"] == "prompt" and "tokens" in err["message"]
    assert tokenizer_spy.calls == 1


def test_long_stop_string_is_400_before_tokenizing(http: httpx.Client, settings: Settings,
                                                   tokenizer_spy: Spy) -> None:
    stop = "s" * (settings.max_stop_chars + 1)
    resp = http.post("/v1/generate", json={"prompt": "hi", "max_tokens": 2, "stop": [stop]})
    err = assert_envelope(resp, 400)
    assert err["param"] == "stop" and "max_stop_chars" in err["message"]
    assert tokenizer_spy.calls == 0
    ok = http.post("/v1/generate", json={"prompt": "hi", "max_tokens": 2,
                                          "stop": ["s" * settings.max_stop_chars]})
    assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------- extraction
def test_extraction_size_is_computed_before_building(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch, tokenizer_spy: Spy
) -> None:
    expand = Spy(vectors_api.expand_template)
    monkeypatch.setattr(vectors_api, "expand_template", expand)
    # The case: a 60 KB template with 150 suffixes (under 1024 pairs).
    body = {"name": "big-t", "template": "t" * 60_000 + " {}", "positive_words": ["a"],
            "negative_words": ["b"], "suffixes": [f" s{i}" for i in range(150)]}
    err = assert_envelope(http.post("/v1/control-vectors", json=body), 413)
    assert err["param"] == "pairs" and "characters" in err["message"]
    # Total under the cap but one text longer than 512 tokens can hold (512 × 13).
    body = {"name": "long-t", "template": "u" * 7000 + " {}", "positive_words": ["a"],
            "negative_words": ["b"]}
    err = assert_envelope(http.post("/v1/control-vectors", json=body), 413)
    assert "512" in err["message"]
    body = {"name": "many", "pairs": [{"positive": "a b", "negative": "c d"}] * 40,
            "suffixes": ["x"] * 40}  # 1600 pairs
    assert assert_envelope(http.post("/v1/control-vectors", json=body), 413)["param"] == "pairs"
    assert expand.calls == 0 and tokenizer_spy.calls == 0
    # The chat wrapper's length counts too (measured once, on an empty message; the tiny
    # model's is 50 characters): 6630 characters pass the arithmetic bare (6656) and
    # are refused only once tokenized, but not with the wrapper around them.
    body = {"name": "chat-t", "template": "v" * 6630 + "{}", "positive_words": ["a"],
            "negative_words": ["b"], "chat": True}
    resp = http.post("/v1/control-vectors", json=body)
    assert resp.status_code == 413 and expand.calls == 0 and tokenizer_spy.calls == 1
    body["chat"] = False
    resp = http.post("/v1/control-vectors", json=body)
    assert resp.status_code == 413 and expand.calls == 1 and tokenizer_spy.calls == 2


def test_template_errors_are_still_400(http: httpx.Client) -> None:
    for body, param in [
        ({"name": "e1", "template": "no placeholder", "positive_words": ["a"],
          "negative_words": ["b"]}, "template"),
        ({"name": "e2", "template": "{} and {}", "positive_words": ["a"],
          "negative_words": ["b"]}, "template"),
        ({"name": "e3", "template": "{}", "positive_words": ["a", "b"],
          "negative_words": ["c"]}, "template"),
        ({"name": "e4", "template": "no alternative"}, "template"),
    ]:
        assert assert_envelope(http.post("/v1/control-vectors", json=body), 400)["param"] == param


def test_small_template_extraction_still_works(http: httpx.Client) -> None:
    body = {"name": "fine-t", "template": "I feel {} today", "positive_words": ["glad", "happy"],
            "negative_words": ["sad", "upset"], "suffixes": [" yes", " no"], "layers": [1]}
    resp = http.post("/v1/control-vectors", json=body)
    assert resp.status_code == 201, resp.text
    assert resp.json()["pairs"] == 4


# --------------------------------------------------------------------- GGUF
def _kv_header(kvs: bytes, n_kv: int, n_tensors: int = 0, tensors: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensors


def _gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


@pytest.fixture
def parser_spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    import gguf

    spy = Spy(gguf.GGUFReader)
    monkeypatch.setattr(gguf, "GGUFReader", spy)
    return spy


def test_gguf_name_conflict_is_409_before_the_body_is_read(http: httpx.Client,
                                                          parser_spy: Spy) -> None:
    assert http.put("/v1/control-vectors/taken/gguf", content=gguf_bytes()).status_code == 201
    calls = parser_spy.calls
    err = assert_envelope(http.put("/v1/control-vectors/taken/gguf", content=b"GGUF garbage"),
                          409)
    assert err["param"] == "name" and parser_spy.calls == calls


def test_gguf_upload_is_bounded_by_the_geometry(http: httpx.Client, parser_spy: Spy) -> None:
    # The case: a 1.5M-element metadata array (here as uint8: 1.5 MB).
    kv = _gguf_string(b"junk") + struct.pack("<IIQ", 9, 0, 1_500_000) + b"\0" * 1_500_000
    err = assert_envelope(http.put("/v1/control-vectors/big/gguf",
                                   content=_kv_header(kv, 1)), 413)
    assert err["param"] == "body" and parser_spy.calls == 0

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused while streaming
        yield _kv_header(b"", 0)
        for _ in range(100):
            yield b"\0" * 65536

    err = assert_envelope(http.put("/v1/control-vectors/big2/gguf", content=chunks()), 413)
    assert parser_spy.calls == 0


@pytest.mark.parametrize(("body", "needle"), [
    (_kv_header(_gguf_string(b"a") + struct.pack("<IIQ", 9, 0, 10**6), 1), "array of 1000000"),
    (_kv_header(_gguf_string(b"a") + struct.pack("<IIQ", 9, 8, 2) + _gguf_string(b"x" * 9000),
                1), "metadata string"),
    (_kv_header(b"", 10**9), "metadata entries"),
    (_kv_header(b"", 0, n_tensors=3), "tensors"),
    (_kv_header(_gguf_string(b"k" * 10_000) + struct.pack("<I", 4) + b"\0" * 4, 1),
     "metadata key"),
    (_kv_header(b"", 0, 1, _gguf_string("direction.\u0663".encode()) + struct.pack(
        "<IQIQ", 1, 32, 0, 0)), "ASCII"),
    (_kv_header(b"", 0, 1, _gguf_string(b"direction." + b"7" * 200) + struct.pack(
        "<IQIQ", 1, 32, 0, 0)), "ASCII"),
    (_kv_header(b"", 0, 1, _gguf_string(b"direction." + b"7" * 5000) + struct.pack(
        "<IQIQ", 1, 32, 0, 0)), "tensor name"),
])
def test_hostile_gguf_headers_are_400_before_parsing(http: httpx.Client, parser_spy: Spy,
                                                     body: bytes, needle: str) -> None:
    err = assert_envelope(http.put("/v1/control-vectors/hostile/gguf", content=body), 400)
    assert err["param"] == "body" and needle in err["message"], err
    assert parser_spy.calls == 0


def test_real_gguf_files_still_import(http: httpx.Client, parser_spy: Spy) -> None:
    resp = http.put("/v1/control-vectors/real-g/gguf", content=gguf_bytes(layers=(0, 1)))
    assert resp.status_code == 201, resp.text
    assert resp.json()["layers"] == [0, 1] and parser_spy.calls == 1


# ------------------------------------------------------------------ builds
class SlowBuild:
    """Stands in for build_prior: waits until released, checking cancellation the way
    the real build does between stages; records whether it saw the cancel."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.saw_cancel = threading.Event()
        self.real = priors_api.build_prior

    def __call__(self, body: Any, params: Any, tok: Any, fp: str, max_bytes: int,
                 cancel: threading.Event | None = None) -> Any:
        self.started.set()
        while not self.release.wait(0.01):
            if cancel is not None and cancel.is_set():
                self.saw_cancel.set()
                priors_api.check_cancelled(cancel)
        return self.real(body, params, tok, fp, max_bytes, cancel)


@pytest.fixture
def slow(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowBuild]:
    build = SlowBuild()
    monkeypatch.setattr(priors_api, "build_prior", build)
    yield build
    build.release.set()


def _wait_no_builds(srv: LiveServer) -> None:
    slots = srv.app.state.steer.builds
    deadline = time.monotonic() + 30
    while slots is not None and slots.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slots is None or slots.active == 0


def test_concurrent_builds_beyond_the_limit_get_429(
    srv: LiveServer, http: httpx.Client, settings: Settings, slow: SlowBuild,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "max_concurrent_builds", 1)
    srv.app.state.steer.builds = None  # rebuilt with the patched limit
    out: dict[str, Any] = {}

    def first() -> None:
        out["r"] = httpx.post(srv.url + "/v1/priors", json={"name": "c1", "text": "a b c"},
                              timeout=30)

    t = threading.Thread(target=first)
    t.start()
    assert slow.started.wait(10)
    resp = http.post("/v1/priors", json={"name": "c2", "text": "a b c"})
    err = assert_envelope(resp, 429)
    assert resp.headers["retry-after"].isdigit() and "max_concurrent_builds" in err["message"]
    assert not (srv.data_dir / "priors" / "c2.json").exists()  # type: ignore[attr-defined]
    slow.release.set()
    t.join(30)
    assert out["r"].status_code == 201, out["r"].text
    _wait_no_builds(srv)
    srv.app.state.steer.builds = None


def test_build_past_its_time_limit_is_abandoned_and_not_stored(
    srv: LiveServer, http: httpx.Client, settings: Settings, slow: SlowBuild,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "build_timeout_s", 0.3)
    err = assert_envelope(http.post("/v1/priors", json={"name": "late", "text": "a b"}), 413)
    assert err["code"] == "build_timeout"
    assert slow.saw_cancel.wait(10)  # the worker thread was told, and stopped
    _wait_no_builds(srv)
    assert http.get("/v1/priors/late").status_code == 404
    assert not list((srv.data_dir / "priors").glob("late*"))  # type: ignore[attr-defined]


def test_build_is_abandoned_when_the_client_disconnects(srv: LiveServer, http: httpx.Client,
                                                       slow: SlowBuild) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/priors", json={"name": "gone", "text": "a b"}, timeout=0.5)
    assert slow.saw_cancel.wait(10)
    slow.release.set()
    _wait_no_builds(srv)
    assert http.get("/v1/priors/gone").status_code == 404
    assert not list((srv.data_dir / "priors").glob("gone*"))  # type: ignore[attr-defined]
    # The name is free again.
    assert http.post("/v1/priors", json={"name": "gone", "text": "a b"}).status_code == 201


def test_artifact_memory_budget_is_507_and_writes_nothing(
    srv: LiveServer, http: httpx.Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = srv.app.state.steer
    used = state.priors.loaded_bytes() + state.control_vectors.loaded_bytes()
    monkeypatch.setattr(settings, "max_artifact_bytes", used + 10)  # room for no real prior
    err = assert_envelope(http.post("/v1/priors", json={"name": "nobudget", "text": "a b c"}),
                          507)
    assert err["code"] == "artifact_budget_full"
    assert not list((srv.data_dir / "priors").glob("nobudget*"))  # type: ignore[attr-defined]
    build = Spy(priors_api.build_prior)
    monkeypatch.setattr(priors_api, "build_prior", build)
    monkeypatch.setattr(settings, "max_artifact_bytes", used)  # full: refused before work
    assert_envelope(http.post("/v1/priors", json={"name": "nobudget", "text": "a b"}), 507)
    assert_envelope(http.put("/v1/control-vectors/nob/gguf", content=gguf_bytes()), 507)
    assert build.calls == 0


# ----------------------------------------------------------------- smaller items
def test_error_messages_are_clipped_and_escaped(http: httpx.Client) -> None:
    resp = http.post("/v1/generate", json={"prompt": "hi", "steering": [
        {"type": "logit_bias", "bias": {"x\n" * 50_000: 1.0}}]})
    err = assert_envelope(resp)
    assert resp.status_code == 400
    assert len(err["message"]) <= MAX_MESSAGE_CHARS and "\n" not in err["message"]
    assert err["param"] is None or (len(err["param"]) <= 200 and "\n" not in err["param"])


def test_logged_field_names_cannot_forge_log_lines(http: httpx.Client,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1,
            "evil\nCRITICAL forged line": 1, "k" * 10_000: 2}
    with caplog.at_level(logging.INFO, logger="steerserve.openai"):
        resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    lines = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert lines and all("\n" not in m and len(m) < 1000 for m in lines)
    assert "evil\\nCRITICAL" in lines[0]


@pytest.mark.parametrize("key", [",", " , ,", "  "])
def test_api_key_with_no_key_refuses_to_start(key: str) -> None:
    from pydantic import ValidationError

    from server.cli import main

    with pytest.raises(ValidationError, match="holds no key"):
        Settings(api_key=key)
    assert main(["--api-key", key, "--model", "random:tiny"]) == 2


def test_models_do_not_show_filesystem_paths(http: httpx.Client) -> None:
    for src, shown in [("/srv/secret/models/llama-7b", "llama-7b"),
                       ("/home/u/m/model.gguf", "model.gguf"), ("./rel/dir/", "dir"),
                       ("embedded:smollm2-135m-instruct", "embedded:smollm2-135m-instruct"),
                       ("random:tiny:3", "random:tiny:3")]:
        assert public_source(src) == shown
    body = http.get("/v1/models").json()
    assert all("/" not in card["source"] for card in body["data"]), body


def test_settings_table_defaults_are_safe() -> None:
    s = Settings()
    assert s.max_connections is not None and s.max_connections >= 64
    assert 1 <= s.max_concurrent_builds <= 8 and s.build_timeout_s > 0
    assert s.max_stop_chars <= 4096 and s.max_artifact_bytes > 0
    assert json.loads(Settings(api_key="a, b").model_dump_json())["api_key"] == "a, b"


def test_uvicorn_gets_the_connection_limit(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    import uvicorn

    from server import cli

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_make_server(config: uvicorn.Config, state: Any) -> Any:
        seen["limit"] = config.limit_concurrency
        raise Stop

    monkeypatch.setattr(cli, "make_server", fake_make_server)
    monkeypatch.setenv("STEER_MAX_CONNECTIONS", "7")
    with pytest.raises(Stop):
        cli.main(["--model", "random:tiny", "--data-dir", str(tmp_path)])
    assert seen["limit"] == 7


def test_sweep_tokenizes_a_shared_prompt_once(http: httpx.Client, tokenizer_spy: Spy) -> None:
    body = {"request": {"prompt": "hello there", "max_tokens": 1},
            "grid": {"temperature": [0.0, 0.5], "top_p": [0.9, 1.0]}}
    resp = http.post("/v1/sweep", json=body)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["results"]) == 4 and tokenizer_spy.calls == 1
    body["grid"] = {"prompt": ["a", "b"], "temperature": [0.0, 1.0]}
    tokenizer_spy.calls = 0
    assert http.post("/v1/sweep", json=body).status_code == 200
    assert tokenizer_spy.calls == 2  # distinct prompts are tokenized each
