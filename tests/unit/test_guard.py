"""The fluency guard on hand-built logits (V ≤ 32) against NumPy brute force, inside the
engine (mixed batch == solo), and a float32 finite-output property."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import torch

import processors.guard as guard_mod
from processors.base import ParamError, ProcessorEnv, StepContext
from processors.guard import Guard, GuardSpec
from processors.ngram import NgramPrior
from processors.stack import parse_stack, stack_warnings
from server.engine import Engine, GenerationRequest, SamplingParams
from server.tiny import tiny_model
from tests.conftest import run_together

CPU = torch.device("cpu")


def apply(base: torch.Tensor, steered: torch.Tensor, specs: list[GuardSpec | None],
          want_stats: bool = True) -> tuple[torch.Tensor, StepContext]:
    g = Guard(CPU, base.shape[1])
    g.update_state(specs)
    ctx = StepContext(base_logits=base, last_tokens=torch.full((base.shape[0], 2), -1),
                      want_stats=want_stats)
    return g.apply(ctx, steered), ctx


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x[np.isfinite(x)].max()
    return x - (m + np.log(np.exp(x - m).sum()))


def oracle(base: np.ndarray, steered: np.ndarray, beta: float | None, eps: float | None,
           grid: int = 4001) -> tuple[np.ndarray, float]:
    """Brute force in float64: the allowed set and the largest grid ``s`` within budget."""
    allowed = np.ones(base.shape, dtype=bool)
    if beta is not None:
        p = np.exp(np_log_softmax(base))
        allowed = p >= beta * p.max()
    if eps is None:
        return allowed, 1.0
    a = np_log_softmax(np.where(allowed, base, -np.inf))[allowed]  # (|S|,)
    d = (steered - base)[allowed]
    s = np.linspace(0.0, 1.0, grid)[:, None]  # every grid point at once: (grid, 1)
    z = a + s * d  # (grid, |S|)
    m = z.max(axis=1, keepdims=True)
    lq = z - (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))
    kl = (np.exp(lq) * (lq - a)).sum(axis=1)  # (grid,)
    return allowed, float(s[kl <= eps, 0].max(initial=0.0))


def kl_to_restricted_base(out: np.ndarray, base: np.ndarray, allowed: np.ndarray) -> float:
    """KL(softmax(out) ‖ softmax(base restricted to allowed)) in float64."""
    lq = np_log_softmax(out)
    a = np_log_softmax(np.where(allowed, base, -np.inf))
    q = np.exp(lq)
    # Outside `allowed` a is -inf and q may be 0 (0·inf = nan): those terms are dropped.
    diff = np.where(allowed, lq - a, 0.0)
    return float(np.sum(np.where(allowed, q * diff, 0.0)))


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    V = int(rng.integers(2, 33))
    base = rng.normal(size=V) * rng.uniform(0.1, 5.0)
    steered = base + rng.normal(size=V) * rng.uniform(0.1, 8.0)
    return base.astype(np.float32), steered.astype(np.float32), float(rng.uniform(0.01, 0.5))


# GATHER_FRACTION 0 forces the whole-vocabulary path, 1 the gathered-support one.
@pytest.mark.parametrize(("beta", "gather"), [(None, 0.0), (0.05, 0.0), (0.05, 1.0)])
def test_kl_budget_matches_brute_force(beta: float | None, gather: float,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard_mod, "GATHER_FRACTION", gather)
    rng = np.random.default_rng(0 if beta is None else 1)
    shortfalls = []
    for _ in range(120):
        base, steered, eps = random_case(rng)
        out, ctx = apply(torch.tensor(base)[None], torch.tensor(steered)[None],
                         [GuardSpec(beta, eps)])
        allowed, s_star = oracle(base.astype(np.float64), steered.astype(np.float64), beta, eps)
        s = float(ctx.stats["guard_s"][0])
        o = out[0].double().numpy()
        # Output is exactly base + s·(steered − base) on the allowed set, removed elsewhere.
        expect = base.astype(np.float64) + s * (steered.astype(np.float64) - base)
        assert np.allclose(o[allowed], expect[allowed], atol=1e-4)
        assert np.all(np.exp(np_log_softmax(o))[~allowed] == 0.0)
        # The budget always holds, against an independent KL.
        assert kl_to_restricted_base(o, base.astype(np.float64), allowed) <= eps * (1 + 1e-4) + 1e-6
        assert s <= s_star + 1.0 / 4000 + 1e-4
        shortfalls.append(s_star - s)
    # Near-optimal: the aim at 0.98 ε costs about 1 % of s; a few sharp curves cost more.
    assert np.quantile(shortfalls, 0.9) < 0.02
    assert np.median(shortfalls) < 0.01


def test_more_newton_steps_reach_the_brute_force_optimum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard_mod, "NEWTON_EVALS", 16)
    rng = np.random.default_rng(2)
    for _ in range(60):
        base, steered, eps = random_case(rng)
        _, ctx = apply(torch.tensor(base)[None], torch.tensor(steered)[None],
                       [GuardSpec(None, eps)])
        _, s_star = oracle(base.astype(np.float64), steered.astype(np.float64), None, eps)
        assert float(ctx.stats["guard_s"][0]) == pytest.approx(s_star, abs=0.03)


@pytest.mark.parametrize("gather", [0.0, 1.0])
def test_plausibility_mask_matches_the_definition(gather: float,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard_mod, "GATHER_FRACTION", gather)
    rng = np.random.default_rng(3)
    for beta in (0.01, 0.1, 0.5, 0.9):
        base = (rng.normal(size=(4, 32)) * 3).astype(np.float32)
        steered = (base + rng.normal(size=(4, 32)) * 6).astype(np.float32)
        out, ctx = apply(torch.tensor(base), torch.tensor(steered), [GuardSpec(beta, None)] * 4)
        for b in range(4):
            allowed, _ = oracle(base[b].astype(np.float64), steered[b], beta, None)
            o = out[b].numpy()
            assert np.array_equal(o[allowed], steered[b][allowed])  # kept tokens untouched
            q = np.exp(np_log_softmax(o.astype(np.float64)))
            assert np.all(q[~allowed] == 0.0)
            p = np.exp(np_log_softmax(base[b].astype(np.float64)))
            assert ctx.stats["guard_masked_mass"][b].item() == pytest.approx(
                p[~allowed].sum(), abs=1e-5)
        assert torch.all(ctx.stats["guard_s"] == 1.0)


def test_hand_built_budget_and_untouched_rows() -> None:
    base = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    steered = torch.tensor([[2.0, 1.0, 6.0, -1.0], [0.0, 0.0, 0.0, 9.0], [9.0, 2.0, 3.0, 4.0]])
    # Row 0: a huge budget leaves it alone (s = 1); row 1: tiny budget; row 2: no guard.
    out, ctx = apply(base, steered, [GuardSpec(None, 50.0), GuardSpec(None, 1e-3), None])
    assert torch.equal(out[0], steered[0])
    assert torch.equal(out[2], steered[2])
    s1 = float(ctx.stats["guard_s"][1])
    assert 0.0 < s1 < 0.1
    assert math.isnan(ctx.stats["guard_s"][2])
    # An already-banned token (−inf) stays banned and does not spend the budget.
    steered_ban = steered.clone()
    steered_ban[1, 0] = float("-inf")
    out, ctx = apply(base[1:2], steered_ban[1:2], [GuardSpec(None, 50.0)])
    assert out[0, 0] < -1000 and torch.equal(out[0, 1:], steered[1, 1:])


@pytest.mark.parametrize("gather", [0.0, 1.0])
def test_mask_leaves_unguarded_and_fully_banned_rows_alone(
        gather: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard_mod, "GATHER_FRACTION", gather)
    base = torch.tensor([[3.0, 0.0, 2.9, -5.0, 1.0, 0.0, 0.0, 0.0]] * 3)
    steered = base + torch.tensor([[0.0, 9.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0]] * 3)
    steered[2, 0] = steered[2, 2] = float("-inf")  # row 2: steering banned both plausible
    out, ctx = apply(base, steered, [GuardSpec(0.5, 0.3), None, GuardSpec(0.5, None)])
    assert torch.equal(out[1], steered[1]) and torch.equal(out[2], steered[2])
    q = torch.softmax(out[0].double(), dim=-1)
    assert torch.all(q[[1, 3, 4, 5, 6, 7]] == 0.0)  # only tokens 0 and 2 are plausible
    assert torch.equal(out[0, [0, 2]], steered[0, [0, 2]])  # d = 0 there: nothing to pull
    assert ctx.stats["guard_masked_mass"][0].item() == pytest.approx(
        1.0 - torch.softmax(base[0].double(), -1)[[0, 2]].sum().item(), abs=1e-6)
    assert torch.isnan(ctx.stats["guard_s"][1:]).all()


@pytest.mark.parametrize(("beta", "eps"), [(None, None), (0.05, None), (None, 0.2)])
def test_entropy_scale_matches_the_definition(beta: float | None, eps: float | None) -> None:
    rng = np.random.default_rng(4)
    for _ in range(40):
        base, steered, _ = random_case(rng)
        h = float(rng.uniform(0.2, 3.0))
        out, ctx = apply(torch.tensor(base)[None], torch.tensor(steered)[None],
                         [GuardSpec(beta, eps, h)])
        b64 = base.astype(np.float64)
        p = np.exp(np_log_softmax(b64))
        w = min(1.0, float(-(p * np.log(p)).sum()) / h)  # entropy of the full frozen P
        allowed, _ = oracle(b64, steered.astype(np.float64), beta, None)
        s = float(ctx.stats["guard_s"][0])
        if eps is None:
            assert s == pytest.approx(w, rel=1e-4, abs=1e-6)
        else:  # the budget acts on w·d: its weight is at most w, and the KL holds
            assert s <= w * (1 + 1e-5) + 1e-7
        o = out[0].double().numpy()
        expect = b64 + s * (steered.astype(np.float64) - b64)
        assert np.allclose(o[allowed], expect[allowed], atol=1e-4)
        if eps is not None:
            assert kl_to_restricted_base(o, b64, allowed) <= eps * (1 + 1e-4) + 1e-6


def test_validation_names_the_field() -> None:
    env = ProcessorEnv(vocab_size=8)
    assert Guard.validate({"plausibility": 0.1, "kl_budget": 0.2}, env) == GuardSpec(0.1, 0.2)
    assert Guard.validate({"entropy_scale": 2.0}, env) == GuardSpec(None, None, 2.0)
    bad: list[tuple[dict[str, Any], str]] = [
           ({}, "plausibility"), ({"plausibility": 1.0}, "plausibility"),
           ({"plausibility": 0}, "plausibility"), ({"plausibility": True}, "plausibility"),
           ({"kl_budget": 0}, "kl_budget"), ({"kl_budget": float("inf")}, "kl_budget"),
           ({"kl_budget": "1"}, "kl_budget"), ({"kl_budget": 0.1, "beta": 1}, "beta"),
           ({"entropy_scale": 0}, "entropy_scale"), ({"entropy_scale": 25.0}, "entropy_scale"),
           ({"entropy_scale": "2"}, "entropy_scale")]
    for params, field in bad:
        with pytest.raises(ParamError) as err:
            parse_stack([{"type": "guard", **params}], env, max_len=4)
        assert err.value.param == f"steering.0.{field}", params


def test_stack_warnings_for_the_guard() -> None:
    env = ProcessorEnv(vocab_size=8)
    bias = {"type": "logit_bias", "bias": {"1": 2.0}}
    guard = {"type": "guard", "plausibility": 0.1}
    margin = {"type": "margin"}
    assert stack_warnings(parse_stack([bias, margin, guard], env, max_len=8)) == []
    [w] = stack_warnings(parse_stack([guard], env, max_len=8))
    assert "'guard'" in w and "no effect" in w
    bias2 = {"type": "logit_bias", "bias": {"2": 1.0}}
    ws = stack_warnings(parse_stack([bias, guard, bias2], env, max_len=8))
    assert len(ws) == 1 and "put 'guard' last" in ws[0]
    with pytest.raises(ParamError):
        parse_stack([bias, guard, {"type": "guard", "kl_budget": 1.0}], env, max_len=8)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    st.integers(1, 4), st.integers(2, 32), st.integers(0, 2**31 - 1),
    st.floats(0.0, 60.0), st.one_of(st.none(), st.floats(1e-4, 0.999)),
    st.one_of(st.none(), st.floats(1e-4, 100.0)), st.one_of(st.none(), st.floats(1e-3, 20.0)),
)
def test_float32_output_is_finite(B: int, V: int, seed: int, scale: float,
                                  beta: float | None, eps: float | None,
                                  h: float | None) -> None:
    if beta is None and eps is None and h is None:
        eps = 0.1
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, V, generator=g) * scale
    steered = base + torch.randn(B, V, generator=g) * scale * 3
    out, ctx = apply(base, steered, [GuardSpec(beta, eps, h)] * B)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    s = ctx.stats["guard_s"]
    assert torch.all((s >= 0) & (s <= 1))
    q = torch.softmax(out, dim=-1)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(-1), torch.ones(B), atol=1e-4)


# --- inside the engine -----------------------------------------------------------------

FP = "tiny-tok"
STYLE = [
    "And the LORD spake unto Moses, saying, Speak unto the children of Israel.",
    "And it came to pass, when the king heard these words, that he rent his clothes.",
]


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Engine, ProcessorEnv, Any]]:
    model, tok = tiny_model(seed=5)
    V = len(tok)
    docs = [tok(x, add_special_tokens=False)["input_ids"] for x in STYLE]
    prior = NgramPrior.build("a", docs, V, tokenizer_fingerprint=FP)
    env = ProcessorEnv(vocab_size=model.config.vocab_size, tokenizer_fingerprint=FP,
                       priors={"a": prior})
    engine = Engine(model, tok)
    engine.start()
    yield engine, env, tok
    engine.stop()


NG = {"type": "ngram", "prior": "a", "lambda": 1.5, "allow_lambda_above_one": True}
CASES: list[tuple[str, list[dict[str, Any]]]] = [
    ("And the", [NG, {"type": "guard", "kl_budget": 0.05}]),
    ("And the", []),
    ("It is", [NG, {"type": "guard", "plausibility": 0.2}]),
    ("And the", [NG]),
    ("Why did", [{"type": "logit_bias", "bias": {"5": 8.0}},
                 {"type": "guard", "plausibility": 0.1, "kl_budget": 0.3}]),
    ("And the", [NG, {"type": "margin"}, {"type": "guard", "kl_budget": 0.2}]),
    ("It is", [NG, {"type": "guard", "entropy_scale": 3.0, "plausibility": 0.05}]),
]


def test_mixed_batch_equals_solo_runs(setup: tuple[Engine, ProcessorEnv, Any]) -> None:
    engine, env, tok = setup
    reqs = [
        GenerationRequest(
            request_id=f"g{i}", prompt_ids=tuple(tok(p)["input_ids"]),
            sampling=SamplingParams(max_tokens=10, temperature=0.0),
            steering=parse_stack(s, env, max_len=4), diagnostics="summary",
        )
        for i, (p, s) in enumerate(CASES)
    ]
    solo = [run_together(engine, [r])[0] for r in reqs]
    batched = run_together(engine, reqs)
    for i, ((tok_s, fin_s), (tok_b, fin_b)) in enumerate(zip(solo, batched, strict=True)):
        assert tok_b == tok_s, f"row {i} differs in the batch"
        assert fin_b.diagnostics is not None and fin_s.diagnostics is not None
        has_guard = any(e["type"] == "guard" for e in CASES[i][1])
        assert ("guard_s_mean" in fin_b.diagnostics) == has_guard
        if has_guard:  # batched logits differ from solo ones by ~1e-5: s follows closely
            assert fin_b.diagnostics["guard_s_mean"] == pytest.approx(
                fin_s.diagnostics["guard_s_mean"], rel=1e-2, abs=1e-4)
    # A tight budget pulls the steered row back toward the unsteered tokens' fluency.
    tight, plain = batched[0][1].diagnostics, batched[3][1].diagnostics
    assert tight is not None and plain is not None
    assert tight["guard_s_mean"] < 1.0
    assert tight["base_ppl"] <= plain["base_ppl"]


def test_sdk_builder_and_cli_flags() -> None:
    import argparse

    from clients import Guard as GuardEntry
    from clients.cli import steering_from

    assert GuardEntry(kl_budget=0.2).to_wire() == {"type": "guard", "kl_budget": 0.2}
    with pytest.raises(ValueError):
        GuardEntry()
    ns = argparse.Namespace(steering=None, vector=None, prior="kjv", lam=0.3, scale="raw",
                            logit_bias=None, margin=(0.5, 1.0), plausibility=0.1, kl_budget=None)
    wire = [e.to_wire() for e in steering_from(ns)]  # type: ignore[union-attr]
    assert [e["type"] for e in wire] == ["ngram", "margin", "guard"]
    assert wire[-1] == {"type": "guard", "plausibility": 0.1}
