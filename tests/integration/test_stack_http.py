"""Steering stacks over HTTP: margin + logit_bias + ngram together, warnings, isolation."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import live_server


@pytest.fixture(scope="module")
def srv(tiny_bundle, tmp_path_factory):
    with live_server(tiny_bundle, tmp_path_factory.mktemp("stack")) as s:
        r = httpx.post(s.url + "/v1/priors", timeout=60,
                       json={"name": "tiny", "text": "abc abd abe the cat sat on the mat " * 20})
        assert r.status_code == 201, r.text
        yield s


def gen(srv, **body):
    base = {"prompt": "the cat", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    r = httpx.post(srv.url + "/v1/generate", json={**base, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_margin_guards_a_forced_token_and_reports(srv):
    plain = gen(srv)
    forced = [{"type": "logit_bias", "bias": {"70": 100}}]
    assert gen(srv, steering=forced)["token_ids"] == [70] * 8
    guarded = gen(srv, steering=forced + [{"type": "margin", "tau": 1e-6, "gamma": 1.0}],
                  diagnostics=True)
    # τ tiny: every step is "confident", so the frozen model's greedy choice always wins.
    assert guarded["token_ids"] == plain["token_ids"]
    assert guarded["diagnostics"]["margin_acted_mean"] > 0
    assert guarded["diagnostics"]["argmax_flip_rate"] == 0.0
    assert "warnings" not in guarded


def test_all_processors_in_one_request_and_warnings(srv):
    stack = [{"type": "ngram", "prior": "tiny", "lambda": 0.5, "scale": "zscore"},
             {"type": "logit_bias", "bias": {"71": 1.5}},
             {"type": "margin", "tau": 0.9, "gamma": 0.5}]
    r = gen(srv, steering=stack, diagnostics=True)
    assert len(r["token_ids"]) == 8 and "style_ppl" in r["diagnostics"]
    lone = gen(srv, steering=[{"type": "margin"}])
    assert lone["warnings"] and lone["token_ids"] == gen(srv)["token_ids"]
    bad = httpx.post(srv.url + "/v1/generate", timeout=60, json={
        "prompt": "x", "steering": [{"type": "margin"}, {"type": "margin", "tau": 0.2}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "steering.1"


def test_mixed_stacks_in_one_sweep_equal_solo(srv):
    # A sweep over the stack itself: every point is a different combination in one batch,
    # with margin at three different stack depths (so at three stages of one step).
    stacks = [
        [],
        [{"type": "logit_bias", "bias": {"70": 4}}],
        [{"type": "ngram", "prior": "tiny", "lambda": 0.8}],
        [{"type": "ngram", "prior": "tiny", "lambda": 0.8}, {"type": "margin", "tau": 0.05}],
        [{"type": "logit_bias", "bias": {"70": 6}}, {"type": "logit_bias", "bias": {"71": 2}},
         {"type": "margin", "tau": 0.05, "gamma": 0.5}],
    ]
    r = httpx.post(srv.url + "/v1/sweep", timeout=60, json={
        "request": {"prompt": "the cat", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                    "diagnostics": True},
        "grid": {"steering": stacks}})
    assert r.status_code == 200, r.text
    for point, stack in zip(r.json()["results"], stacks, strict=True):
        solo = gen(srv, steering=stack, diagnostics=True)
        assert point["response"]["token_ids"] == solo["token_ids"]
        # Diagnostics per row too: a later margin stage must not erase an earlier one's.
        got, want = point["response"]["diagnostics"], solo["diagnostics"]
        assert sorted(got) == sorted(want)
        if any(e["type"] == "margin" for e in stack):
            assert "margin_flip_prevented_mean" in got
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
            else:
                assert got[key] == value, key


def test_openai_endpoints_carry_stack_warnings(srv):
    r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "the cat", "max_tokens": 3, "steering": [{"type": "margin"}]})
    assert r.status_code == 200, r.text
    assert r.json()["warnings"] and "margin" in r.json()["warnings"][0]
    r = httpx.post(srv.url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "the cat", "max_tokens": 3})
    assert "warnings" not in r.json()
