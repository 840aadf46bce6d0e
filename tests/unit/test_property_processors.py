"""Property test: random *valid* steering parameters through every logits processor, in
float32, give finite, normalizable logits (issue 15's "Done when").

Hypothesis draws a stack of 1–4 entries (ngram on Jelinek–Mercer and Kneser–Ney priors
built with extreme smoothing, logit_bias, margin, static and dynamic fusion with any
valid grid), random base logits of large or small magnitude, and a random last-two-token
context. Every stack is validated by the same ``parse_stack`` the server uses, so only
parameters the API accepts are exercised. The sampler then picks a token in range at
any valid temperature.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.base import ParamError, ProcessorEnv, StepContext
from processors.ngram import NgramPrior
from processors.stack import ProcessorStack, parse_stack
from server.engine.sampler import Sampler, SamplerRow, make_generator
from server.engine.types import SamplingParams

V = 24
rng = np.random.default_rng(11)
DOCS = [rng.integers(0, 18, size=int(n)).tolist() for n in rng.integers(3, 30, size=25)]
PRIORS = {
    "jm": NgramPrior.build("jm", DOCS, V),
    "jm_tiny_k": NgramPrior.build("jm_tiny_k", DOCS, V, add_k=1e-300),
    "kn": NgramPrior.build("kn", DOCS, V, estimator="kneser_ney"),
    "kn_tiny_d": NgramPrior.build("kn_tiny_d", DOCS, V, estimator="kneser_ney", discount=1e-30),
    "kn_full_d": NgramPrior.build("kn_full_d", DOCS, V, estimator="kneser_ney", discount=1.0),
}
AUX = {"small": "small_base", "e1": "expert", "e2": "expert"}
ENV = ProcessorEnv(vocab_size=V, priors=PRIORS, aux_roles=AUX)

tiny_or_normal = st.one_of(
    st.floats(1e-300, 1e-30), st.floats(1e-6, 1.0), st.floats(1.0, 1e6), st.just(1.0)
)


@st.composite
def ngram_entry(draw: st.DrawFn) -> dict[str, Any]:
    prior = draw(st.sampled_from(sorted(PRIORS)))
    entry: dict[str, Any] = {"type": "ngram", "prior": prior,
                             "scale": draw(st.sampled_from(["raw", "zscore"]))}
    if draw(st.booleans()):
        entry["lambda"] = draw(st.floats(0.0, 100.0))
        entry["allow_lambda_above_one"] = True
    else:
        entry["lambda"] = draw(st.floats(0.0, 1.0))
    if prior.startswith("jm") and draw(st.booleans()):
        entry["weights"] = [draw(tiny_or_normal),
                            draw(st.one_of(st.just(0.0), tiny_or_normal)),
                            draw(st.one_of(st.just(0.0), tiny_or_normal))]
    return entry


@st.composite
def bias_entry(draw: st.DrawFn) -> dict[str, Any]:
    ids = draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=6, unique=True))
    values = st.one_of(st.floats(-100.0, 100.0), st.sampled_from([-100.0, 100.0]))
    return {"type": "logit_bias", "bias": {str(i): draw(values) for i in ids}}


@st.composite
def margin_entry(draw: st.DrawFn) -> dict[str, Any]:
    return {"type": "margin", "tau": draw(st.floats(1e-9, 1.0)), "gamma": draw(st.floats(0, 1))}


@st.composite
def fusion_entry(draw: st.DrawFn) -> dict[str, Any]:
    experts = draw(st.sampled_from([["e1"], ["e2"], ["e1", "e2"]]))
    if draw(st.booleans()):
        alpha = [draw(st.floats(-100.0, 100.0)) for _ in experts]
        return {"type": "fusion", "experts": experts, "base": "small", "mode": "static",
                "alpha": alpha}
    lo = draw(st.floats(-100.0, 100.0))
    hi = draw(st.floats(lo, 100.0))
    step = draw(st.floats(max((hi - lo) / 100.0, 1e-3), 200.0))
    return {"type": "fusion", "experts": experts, "base": "small",
            "grid": {"min": lo, "max": hi, "step": step}}


entries = st.one_of(ngram_entry(), bias_entry(), margin_entry(), fusion_entry())
scales = st.sampled_from([1e-3, 1.0, 30.0, 1e4])


def _valid_stack(raw: list[dict[str, Any]]) -> Any:
    try:
        return parse_stack(raw, ENV, max_len=8)
    except ParamError:
        return None  # e.g. two margin entries: not a valid request, nothing to check


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stacks=st.lists(st.lists(entries, min_size=1, max_size=4), min_size=1, max_size=3),
    scale=scales,
    seed=st.integers(0, 2**31 - 1),
    temperature=st.one_of(st.just(0.0), st.floats(0.0, 100.0), st.floats(1e-45, 1e-5)),
)
def test_every_processor_stays_finite_in_float32(
    stacks: list[list[dict[str, Any]]], scale: float, seed: int, temperature: float
) -> None:
    parsed = [_valid_stack(s) for s in stacks]
    rows = [p for p in parsed if p is not None]
    if not rows:
        return
    B = len(rows)
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(B, V, generator=gen) * scale).float()
    aux = {n: (torch.randn(B, V, generator=gen) * scale).float() for n in AUX}
    last = torch.randint(-1, V, (B, 2), generator=gen)
    stack = ProcessorStack(torch.device("cpu"), V)
    stack.update_state(rows)
    ctx = StepContext(base_logits=base, last_tokens=last, want_stats=True,
                      aux_logits=aux)
    out = stack.apply(ctx, base)
    assert out.dtype == torch.float32 and out.shape == (B, V)
    assert torch.isfinite(out).all(), out
    logp = torch.log_softmax(out, dim=-1)
    assert torch.isfinite(logp).all()
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(B), rtol=0, atol=1e-4)
    for name, value in ctx.stats.items():  # diagnostics: finite or NaN ("undefined")
        assert not torch.isinf(value).any(), name
    params = SamplingParams(temperature=temperature, seed=seed)
    sampler = Sampler(torch.device("cpu"), V, (0,))
    sampler.update_state([
        SamplerRow(params, None if params.greedy else make_generator(seed, torch.device("cpu")), 0)
        for _ in range(B)
    ])
    tokens = sampler.sample(out, None, stack.bans)
    assert ((tokens >= 0) & (tokens < V)).all()
    if stack.bans is not None:  # a banned token is never emitted
        banned = {(int(r), int(t)) for r, t in zip(*stack.bans, strict=True)}
        assert all((b, int(t)) not in banned for b, t in enumerate(tokens))
