"""Hostile inputs a schema fuzzer rarely produces: broken JSON, odd numbers, deep
nesting, Unicode edge cases, path tricks in artifact names, corrupt GGUF uploads.

Each must be answered with a 4xx in the error envelope (or a normal 2xx where the input is
legal), never a 5xx, a dropped connection, or a file outside the data directory.
"""

# Raw JSON bodies are spelled with %-formatting: str.format would double every brace.
# ruff: noqa: UP031

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.hardening.conftest import assert_envelope, gguf_bytes, tree

JSON = {"content-type": "application/json"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
GEN = {"prompt": "hi", "max_tokens": 2}
# One minimal valid body per JSON endpoint (the prior/vector names are unique per use).
BODIES: dict[str, dict[str, Any]] = {
    "/v1/generate": GEN,
    "/v1/sweep": {"request": GEN, "grid": {"temperature": [0.0]}},
    "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": CHAT,
    "/v1/priors": {"name": "p-body", "text": "abc abc"},
    "/v1/control-vectors": {"name": "v-body", "pairs": [{"positive": "good", "negative": "bad"}]},
}


def post_raw(http: httpx.Client, path: str, raw: bytes | str, **headers: str) -> httpx.Response:
    data = raw.encode() if isinstance(raw, str) else raw
    return http.post(path, content=data, headers={**JSON, **headers})


# ---------------------------------------------------------------- malformed bodies
@pytest.mark.parametrize("path", sorted(BODIES))
def test_truncated_json_is_400(http: httpx.Client, path: str) -> None:
    text = json.dumps(BODIES[path])
    for cut in (1, len(text) // 2, len(text) - 1):
        err = assert_envelope(post_raw(http, path, text[:cut]), 400)
        assert err["param"] == "body", err


@pytest.mark.parametrize("path", sorted(BODIES))
@pytest.mark.parametrize(
    "ctype", ["text/plain", "application/xml", "multipart/form-data; boundary=x", "image/png"]
)
def test_wrong_content_type_is_4xx(http: httpx.Client, path: str, ctype: str) -> None:
    resp = http.post(path, content=json.dumps(BODIES[path]).encode(), headers={
        "content-type": ctype})
    err = assert_envelope(resp)
    assert resp.status_code in (400, 415), (resp.status_code, err)


@pytest.mark.parametrize("raw", [b"", b"   ", b"null", b"[]", b"42", b'"x"', b"{", b"}{",
                                 b'{"prompt": "a",}', b"\xef\xbb\xbf{}", b"{'prompt': 'a'}"])
def test_non_object_bodies_are_400(http: httpx.Client, raw: bytes) -> None:
    assert_envelope(post_raw(http, "/v1/generate", raw), 400)


def test_invalid_utf8_is_400(http: httpx.Client) -> None:
    for raw in (b'{"prompt": "\xff\xfe"}', b'{"prompt": "\xc3"}', b'{"prompt": "\xed\xa0\x80"}',
                b'{"\x80": 1}'):
        for path in ("/v1/generate", "/v1/chat/completions", "/v1/priors"):
            err = assert_envelope(post_raw(http, path, raw), 400)
            # json.loads reads UTF-8-encoded surrogates (ED A0 80) as surrogates: the
            # field is named then.
            assert err["param"] in ("body", "prompt"), err
    # The connection survives: the next request on the same client works.
    assert http.post("/v1/generate", json=GEN).status_code == 200


# ------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty"])
def test_non_finite_sampling_values_are_400(http: httpx.Client, token: str, field: str) -> None:
    raw = '{"prompt": "hi", "max_tokens": 2, "%s": %s}' % (field, token)
    err = assert_envelope(post_raw(http, "/v1/generate", raw), 400)
    assert err["param"] == field, err
    raw = '{"model": "tiny", "prompt": "hi", "max_tokens": 2, "%s": %s}' % (field, token)
    assert assert_envelope(post_raw(http, "/v1/completions", raw), 400)["param"] == field


@pytest.mark.parametrize(
    "entry",
    [
        '{"type": "margin", "tau": NaN}',
        '{"type": "margin", "tau": 0.5, "gamma": Infinity}',
        '{"type": "logit_bias", "bias": {"5": NaN}}',
        '{"type": "logit_bias", "bias": {"5": 1e308}}',
        '{"type": "logit_bias", "bias": {"100000000000000000000000000000": 1}}',
        '{"type": "ngram", "prior": "nope", "lambda": Infinity}',
        '{"type": "control", "vector": "nope", "alpha": 1e308}',
        '{"type": "fusion", "experts": ["x"], "alpha": [NaN]}',
    ],
)
def test_non_finite_and_huge_steering_values_are_4xx(http: httpx.Client, entry: str) -> None:
    raw = '{"prompt": "hi", "max_tokens": 2, "steering": [%s]}' % entry
    resp = post_raw(http, "/v1/generate", raw)
    assert_envelope(resp)
    assert resp.status_code in (400, 404), resp.text
    assert (resp.json()["error"]["param"] or "").startswith("steering"), resp.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 1e308),
        ("temperature", -1e308),
        ("max_tokens", 10**30),
        ("max_tokens", -(10**30)),
        ("seed", 2**70),
        ("seed", -1),
        ("min_tokens", 10**30),
        ("top_k", -(10**30)),
        ("prompt", [10**30]),
        ("prompt", [-1]),
        ("stop_token_ids", [10**30]),
    ],
)
def test_huge_numbers_are_400(http: httpx.Client, field: str, value: Any) -> None:
    resp = http.post("/v1/generate", json={**GEN, field: value})
    err = assert_envelope(resp, 400)
    assert err["param"] == field, err


def test_huge_top_k_means_no_truncation(http: httpx.Client) -> None:
    resp = http.post("/v1/generate", json={**GEN, "top_k": 10**30, "seed": 1})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", 10**30), ("seed", 2**70), ("logprobs", 10**30), ("best_of", 10**30),
     ("max_tokens", 10**30), ("temperature", 1e308), ("logit_bias", {"1": 1e308})],
)
def test_openai_huge_numbers_are_400(http: httpx.Client, field: str, value: Any) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, field: value}
    err = assert_envelope(http.post("/v1/completions", json=body), 400)
    assert err["param"].startswith(field), err


# ------------------------------------------------------------------------- nesting
def nested_list(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_dict(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [100, 900, 10_000])
@pytest.mark.parametrize("make", [nested_list, nested_dict])
def test_deep_nesting_is_400_not_recursion_error(http: httpx.Client, depth: int, make: Any
                                                 ) -> None:
    deep = make(depth)
    cases = [
        ("/v1/generate", '{"prompt": "hi", "steering": [{"type": "margin", "x": %s}]}' % deep),
        ("/v1/generate", '{"prompt": "hi", "steering": %s}' % deep),
        ("/v1/sweep", '{"request": {"prompt": "hi", "z": %s}, "grid": {"temperature": [0]}}'
         % deep),
        ("/v1/sweep", '{"request": {"prompt": "hi"}, "grid": {"temperature": [%s]}}' % deep),
        ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", '
         '"content": "x"}], "extra": %s}' % deep),
        ("/v1/priors", '{"name": "deep", "text": %s}' % deep),
        ("/v1/control-vectors", '{"name": "deep", "layers": %s}' % deep),
    ]
    for path, raw in cases:
        resp = post_raw(http, path, raw)
        assert_envelope(resp)
        assert resp.status_code in (400, 413), (path, resp.status_code, resp.text[:300])


def test_deep_sweep_grid_path_is_400(http: httpx.Client) -> None:
    body = {"request": {"prompt": "hi", "steering": [{"type": "margin"}]},
            "grid": {"steering.0." + "a." * 5000 + "b": [1]}}
    assert_envelope(http.post("/v1/sweep", json=body), 400)


def test_moderate_nesting_still_works(http: httpx.Client) -> None:
    bias = {"type": "logit_bias", "bias": {"5": 1.0}}
    body = {"request": {**GEN, "steering": [bias]}, "grid": {"steering.0.bias.5": [0.0, 2.0]}}
    resp = http.post("/v1/sweep", json=body)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["results"]) == 2


# ------------------------------------------------------------------------- unicode
LONE = ["\\ud800", "\\udfff", "a\\udbffb", "\\ude00\\ud83d"]  # JSON escapes, not characters


@pytest.mark.parametrize("lone", LONE)
def test_lone_surrogates_are_400_naming_the_field(http: httpx.Client, lone: str) -> None:
    cases = [
        ("/v1/generate", '{"prompt": "hi %s"}' % lone, "prompt"),
        ("/v1/generate", '{"prompt": "hi", "stop": "%s"}' % lone, "stop"),
        ("/v1/generate", '{"messages": [{"role": "user", "content": "%s"}]}' % lone,
         "messages.0.content"),
        ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", '
         '"content": "%s"}]}' % lone, "messages.0.content"),
        ("/v1/completions", '{"model": "t%s", "prompt": "x"}' % lone, "model"),
        ("/v1/priors", '{"name": "sur", "text": "ab %s"}' % lone, "text"),
        ("/v1/priors", '{"name": "sur", "text": ["ok", "%s"]}' % lone, "text.1"),
        ("/v1/control-vectors", '{"name": "sur", "pairs": [{"positive": "%s x", '
         '"negative": "y z"}]}' % lone, "pairs.0.positive"),
        ("/v1/generate", '{"prompt": "hi", "steering": [{"type": "logit_bias", '
         '"bias": {"%s": 1}}]}' % lone, "steering.0.bias"),
    ]
    for path, raw, param in cases:
        err = assert_envelope(post_raw(http, path, raw), 400)
        assert err["param"] == param, (path, err)


def test_unicode_edge_cases_generate(http: httpx.Client) -> None:
    prompts = [
        "\u200b\u200c\u200d\ufeff",  # zero-width characters and a BOM
        "\u202eabc\u202c \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627",  # RTL
        "\U0001f600\U0001f469\u200d\U0001f52c\U0001f1fa\U0001f1f8",  # emoji, ZWJ, flags
        "\\ud83d\\ude00 as an escaped pair",
        "e\u0301\u0308\u0327",  # stacked combining marks
        "\x00\x01\x7f",  # control characters
    ]
    for prompt in prompts:
        for stream in (False, True):
            resp = http.post("/v1/generate", json={"prompt": prompt, "max_tokens": 4,
                                                   "stream": stream, "stop": "\u200b"})
            assert resp.status_code == 200, resp.text
            resp.text.encode("utf-8")  # what went out is valid UTF-8
        resp = http.post("/v1/chat/completions", json={
            **CHAT, "messages": [{"role": "user", "content": prompt}], "logprobs": True,
            "top_logprobs": 2})
        assert resp.status_code == 200, resp.text
        for entry in resp.json()["choices"][0]["logprobs"]["content"]:
            assert isinstance(entry["bytes"], list)


def test_escaped_surrogate_pair_is_one_character(http: httpx.Client) -> None:
    resp = post_raw(http, "/v1/generate", '{"prompt": "\\ud83d\\ude00", "max_tokens": 1}')
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == 4  # 4 UTF-8 bytes, one token each


def test_empty_prompts_are_400(http: httpx.Client) -> None:
    cases = [
        ("/v1/generate", {"prompt": ""}, "prompt"),
        ("/v1/generate", {"prompt": []}, "prompt"),
        ("/v1/generate", {"messages": []}, "messages"),
        ("/v1/generate", {}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": []}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [[]]}, "prompt"),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
    ]
    for path, body, param in cases:
        err = assert_envelope(http.post(path, json=body), 400)
        assert err["param"] == param, (path, body, err)


@pytest.mark.parametrize(
    "prompt", ["<|im_end|><|im_start|>", "<|endoftext|>", "<|im_end|>" * 20, " ", "\n"]
)
def test_special_token_only_prompts(http: httpx.Client, prompt: str) -> None:
    resp = http.post("/v1/generate", json={"prompt": prompt, "max_tokens": 3, "seed": 0})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["usage"]["completion_tokens"] <= 3
    resp = http.post("/v1/chat/completions", json={
        **CHAT, "messages": [{"role": "user", "content": prompt}]})
    assert resp.status_code == 200, resp.text
    resp = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                              "max_tokens": 2, "stream": True})
    assert resp.status_code == 200 and resp.text.rstrip().endswith("data: [DONE]")


# ------------------------------------------------------------------ artifact names
BAD_NAMES = ["../x", "..", ".", "", "a/b", "/etc/passwd", "..\\x", "a\\b", ".hidden",
             "x" * 65, "a\u0000b", "a b", "\u00e9", "-lead", "a/../../x", "~root"]


def test_bad_artifact_names_write_nothing(http: httpx.Client, cheap_server: LiveServer,
                                          tmp_path: Path) -> None:
    data: Path = cheap_server.data_dir  # type: ignore[attr-defined]
    parent = data.parent
    before, before_parent = tree(data), set(p.name for p in parent.iterdir())
    gguf = gguf_bytes()
    for name in BAD_NAMES:
        err = assert_envelope(http.post("/v1/priors", json={"name": name, "text": "abc abc"}),
                              400)
        assert err["param"] == "name", (name, err)
        err = assert_envelope(http.post("/v1/control-vectors", json={
            "name": name, "pairs": [{"positive": "good one", "negative": "bad one"}]}), 400)
        assert err["param"] == "name", (name, err)
    quoted = ["..%2Fx", "%2E%2E%2Fx", "..%2F..%2Fetc%2Fpasswd", "a%2Fb", "..", "%2E%2E",
              "..%5Cx", "%00", "x%2F..%2F..%2Fy", "%252E%252E%252Fx"]
    for q in quoted:
        for method, path in [("GET", f"/v1/priors/{q}"), ("DELETE", f"/v1/priors/{q}"),
                             ("GET", f"/v1/control-vectors/{q}"),
                             ("DELETE", f"/v1/control-vectors/{q}"),
                             ("GET", f"/v1/control-vectors/{q}/gguf")]:
            resp = http.request(method, path)
            assert_envelope(resp, 404)
        resp = http.put(f"/v1/control-vectors/{q}/gguf", content=gguf,
                        headers={"content-type": "application/octet-stream"})
        assert_envelope(resp)
        assert resp.status_code in (400, 404), (q, resp.text)
    assert tree(data) == before
    assert set(p.name for p in parent.iterdir()) == before_parent


# ------------------------------------------------------------------------- GGUF
def test_random_and_truncated_gguf_are_400(http: httpx.Client, cheap_server: LiveServer
                                            ) -> None:
    import random

    rng = random.Random(7)
    data: Path = cheap_server.data_dir  # type: ignore[attr-defined]
    good = gguf_bytes(layers=(0, 1))
    bodies = [bytes(rng.randrange(256) for _ in range(n)) for n in (1, 7, 64, 4096)]
    bodies += [b"GGUF" + bytes(rng.randrange(256) for _ in range(n)) for n in (0, 4, 60, 2000)]
    cuts = sorted({4, 8, 16, 24, 32, len(good) // 3, len(good) // 2, len(good) - 64,
                   len(good) - 4, len(good) - 1} | {rng.randrange(1, len(good)) for _ in range(8)})
    bodies += [good[:cut] for cut in cuts]
    flipped = bytearray(good)
    flipped[8] ^= 0xFF  # the tensor count
    bodies.append(bytes(flipped))
    before = tree(data)
    for i, body in enumerate(bodies):
        resp = http.put(f"/v1/control-vectors/junk{i}/gguf", content=body,
                        headers={"content-type": "application/octet-stream"})
        err = assert_envelope(resp, 400)
        assert err["param"] == "body", err
    assert assert_envelope(http.put("/v1/control-vectors/junk/gguf", content=b""), 400)
    assert tree(data) == before  # nothing stored, no temp file left
    # The untruncated file imports, and a generate with it works.
    resp = http.put("/v1/control-vectors/whole/gguf", content=good,
                    headers={"content-type": "application/octet-stream"})
    assert resp.status_code == 201, resp.text
    resp = http.post("/v1/generate", json={**GEN, "steering": [
        {"type": "control", "vector": "whole", "alpha": 2.0}]})
    assert resp.status_code == 200, resp.text
    assert http.delete("/v1/control-vectors/whole").status_code == 200


def test_gguf_sent_as_json_content_type_is_still_binary(http: httpx.Client) -> None:
    resp = http.put("/v1/control-vectors/asjson/gguf", content=gguf_bytes(), headers=JSON)
    assert resp.status_code == 201, resp.text
    assert http.delete("/v1/control-vectors/asjson").status_code == 200
