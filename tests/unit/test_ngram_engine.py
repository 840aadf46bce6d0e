"""The ngram processor inside the engine with the tiny random model: batch isolation,
λ = 0 equivalence and the style_nll diagnostic."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from processors.base import ProcessorEnv
from processors.ngram import NgramPrior
from processors.stack import parse_stack
from server.engine import Engine, GenerationRequest, SamplingParams
from server.tiny import tiny_model
from tests.conftest import run_together

FP = "tiny-tok"
STYLE_A = [
    "And the LORD spake unto Moses, saying, Speak unto the children of Israel.",
    "And it came to pass, when the king heard these words, that he rent his clothes.",
    "Blessed are the meek: for they shall inherit the earth.",
]
STYLE_B = [
    "Q: Why did the programmer quit? A: Because he didn't get arrays.",
    "A clash of doctrine is not a disaster -- it is an opportunity.",
    "Never trust a computer you can't throw out a window.",
]


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Engine, ProcessorEnv, Any]]:
    model, tok = tiny_model(seed=3)
    V = len(tok)

    def docs(lines: list[str]) -> list[list[int]]:
        return [tok(x, add_special_tokens=False)["input_ids"] for x in lines]

    priors = {
        "a": NgramPrior.build("a", docs(STYLE_A), V, tokenizer_fingerprint=FP),
        "b": NgramPrior.build(
            "b", docs(STYLE_B), V, estimator="kneser_ney", tokenizer_fingerprint=FP
        ),
    }
    env = ProcessorEnv(
        vocab_size=model.config.vocab_size, tokenizer_fingerprint=FP, priors=priors
    )
    engine = Engine(model, tok)
    engine.start()
    yield engine, env, tok
    engine.stop()


def make_request(
    tok: Any, env: ProcessorEnv, prompt: str, steering: list[dict[str, Any]], rid: str
) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt_ids=tuple(tok(prompt)["input_ids"]),
        sampling=SamplingParams(max_tokens=10, temperature=0.0),
        steering=parse_stack(steering, env, max_len=4),
        diagnostics="summary",
    )


CASES: list[tuple[str, list[dict[str, Any]]]] = [
    ("And the", [{"type": "ngram", "prior": "a", "lambda": 1.0}]),
    ("And the", []),
    ("Why did", [{"type": "ngram", "prior": "b", "lambda": 0.8, "scale": "zscore"}]),
    ("And the", [{"type": "ngram", "prior": "a", "lambda": 0.0}]),
    (
        "It is",
        [
            {
                "type": "ngram",
                "prior": "a",
                "lambda": 3,
                "allow_lambda_above_one": True,
                "weights": [1, 1, 4],
            }
        ],
    ),
    ("Why did", [{"type": "ngram", "prior": "b", "lambda": 0.3}]),
]


def test_mixed_batch_equals_solo_runs(setup: tuple[Engine, ProcessorEnv, Any]) -> None:
    engine, env, tok = setup
    reqs = [make_request(tok, env, p, s, f"r{i}") for i, (p, s) in enumerate(CASES)]
    solo = [run_together(engine, [r])[0] for r in reqs]
    batched = run_together(engine, reqs)
    for i, ((tok_s, fin_s), (tok_b, fin_b)) in enumerate(zip(solo, batched, strict=True)):
        assert tok_b == tok_s, f"row {i} differs in the batch"
        assert len(tok_b) == 10 and fin_b.finish_reason == "length"
        style = fin_b.diagnostics.get("style_ppl")
        if CASES[i][1]:
            assert style is not None and style == pytest.approx(
                fin_s.diagnostics["style_ppl"], rel=1e-4
            )
        else:
            assert style is None  # NaN rows are left out of the summary
    # λ = 0 decodes exactly the unsteered tokens; λ = 1 changes them.
    assert batched[3][0] == batched[1][0]
    assert batched[0][0] != batched[1][0]


def test_steering_lowers_style_perplexity(setup: tuple[Engine, ProcessorEnv, Any]) -> None:
    engine, env, tok = setup
    reqs = [
        make_request(
            tok, env, "And the", [{"type": "ngram", "prior": "a", "lambda": lam}], f"s{lam}"
        )
        for lam in (0.0, 1.0)
    ]
    (_, off), (_, on) = run_together(engine, reqs)
    assert math.isfinite(off.diagnostics["style_ppl"])
    assert on.diagnostics["style_ppl"] < off.diagnostics["style_ppl"]
    assert on.diagnostics["base_ppl"] > off.diagnostics["base_ppl"]
