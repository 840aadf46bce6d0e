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


def test_control_builders_are_accepted_by_the_server_validator():
    """Schedules, token windows, after-markers, ablation and clamp serialize to entries
    the server's own validator parses into what they say."""
    import numpy as np

    from clients import Ablate, After, Clamp, Schedule, Tokens
    from processors.base import ProcessorEnv
    from processors.control import ControlProcessor
    from processors.control import ControlVector as Vec

    vec = Vec("v", {1: np.ones(4), 2: np.ones(4)})
    env = ProcessorEnv(8, control_vectors={"v": vec})
    wire = Control("v", Schedule(2.0, 0.5, 8, "exp"), layers=[2],
                   positions=Tokens(3, 9)).to_wire()
    assert wire == {"type": "control", "vector": "v", "layers": [2], "preserve_norm": False,
                    "alpha": {"start": 2.0, "end": 0.5, "over": 8, "shape": "exp"},
                    "positions": {"from": 3, "to": 9}}
    spec = ControlProcessor.validate(wire, env)
    assert spec.alpha.at(8) == 0.5 and spec.positions.start == 3 and spec.positions.stop == 9
    spec = ControlProcessor.validate(Ablate("v", 0.5, positions=After("</think>")).to_wire(), env)
    assert (spec.mode, spec.alpha, spec.positions.marker) == ("ablate", 0.5, "</think>")
    spec = ControlProcessor.validate(Clamp("v", -3.0, layers=[1]).to_wire(), env)
    assert (spec.mode, spec.value, spec.layers) == ("clamp", -3.0, (1,))
