"""Steering builders serialize to DESIGN.md's wire format."""

from __future__ import annotations

import pytest

from clients import Control, Fusion, GenerateRequest, LogitBias, Margin, Ngram


def test_wire_formats():
    assert Ngram(prior="kjv", lam=0.1, weights=[0.2, 0.3, 0.5], scale="zscore").to_wire() == {
        "type": "ngram", "prior": "kjv", "lambda": 0.1, "weights": [0.2, 0.3, 0.5],
        "scale": "zscore"}
    assert Control(vector="calm", alpha=2.0).to_wire() == {
        "type": "control", "vector": "calm", "alpha": 2.0, "positions": "all",
        "preserve_norm": False}
    assert Fusion(experts=("e1",), base="small", mode="static", alpha=[0.5]).to_wire() == {
        "type": "fusion", "experts": ["e1"], "base": "small", "mode": "static", "alpha": [0.5]}
    assert Fusion(experts=["e"], base="s", grid={"max": 2.0, "step": 0.1}).to_wire()["grid"] == {
        "max": 2.0, "step": 0.1}
    assert Margin(tau=0.5, gamma=1.0).to_wire() == {"type": "margin", "tau": 0.5, "gamma": 1.0}
    assert LogitBias({3: -100, 7: 2.5}).to_wire() == {
        "type": "logit_bias", "bias": {"3": -100, "7": 2.5}}


def test_request_building():
    body = GenerateRequest.build("hi", steering=[Ngram(prior="p", lam=0.2), {"type": "x"}],
                                 temperature=0.0, extra_body={"foo": 1}, timeout=5).to_wire()
    assert body == {"prompt": "hi", "temperature": 0.0, "foo": 1, "steering": [
        {"type": "ngram", "prior": "p", "lambda": 0.2, "scale": "raw"}, {"type": "x"}]}
    with pytest.raises(ValueError, match="type"):
        GenerateRequest.build("hi", steering=[{"prior": "p"}])
    with pytest.raises(ValueError, match="prompt or messages"):
        GenerateRequest.build(None)


def test_contrast_pairs_zip_template_and_words():
    from clients import contrast_pairs

    pairs = contrast_pairs("I feel {}.", ["happy", "glad"], ["sad", "low"])
    assert pairs == [{"positive": "I feel happy.", "negative": "I feel sad."},
                     {"positive": "I feel glad.", "negative": "I feel low."}]
    import pytest

    with pytest.raises(ValueError):
        contrast_pairs("no slot", ["a"], ["b"])
    with pytest.raises(ValueError):
        contrast_pairs("{}", ["a", "b"], ["c"])
