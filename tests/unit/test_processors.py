"""Processor framework math on hand-built logits (V ≤ 32)."""

from __future__ import annotations

import math

import pytest
import torch

from processors.base import ParamError, ProcessorEnv, StepContext, get_number
from processors.logit_bias import LogitBias
from processors.metrics import js_from_logp, kl_from_logp, step_stats, summarize
from processors.stack import ProcessorStack, parse_stack

ENV = ProcessorEnv(vocab_size=8)
CPU = torch.device("cpu")


def ctx_for(logits: torch.Tensor) -> StepContext:
    return StepContext(base_logits=logits, last_tokens=torch.full((logits.shape[0], 2), -1))


def test_logit_bias_adds_only_to_its_rows(device):
    p = LogitBias(device, 8)
    s0 = LogitBias.validate({"bias": {"1": 2.5, "7": -100}}, ENV)
    s2 = LogitBias.validate({"bias": {"0": 1}}, ENV)
    p.update_state([s0, None, s2])
    assert p.active
    base = torch.randn(3, 8)
    out = p.apply(ctx_for(base.to(device)), base.to(device)).cpu()
    expected = base.clone()
    expected[0, 1] += 2.5
    expected[0, 7] -= 100
    expected[2, 0] += 1
    assert torch.equal(out, expected)
    assert torch.equal(out[1], base[1])  # untouched row, bit for bit
    assert not torch.equal(out, base)  # out of place: base kept
    p.update_state([None, None])
    assert not p.active


@pytest.mark.parametrize(
    "params, param",
    [
        ({"bias": {}}, "bias"),
        ({"bias": {"x": 1}}, "bias"),
        ({"bias": {"8": 1}}, "bias"),
        ({"bias": {"1": 101}}, "bias.1"),
        ({"bias": {"1": "a"}}, "bias.1"),
        ({"bias": {"1": 1}, "extra": 1}, "extra"),
    ],
)
def test_logit_bias_validation_names_param(params, param):
    with pytest.raises(ParamError) as err:
        LogitBias.validate(params, ENV)
    assert err.value.param == param


def test_parse_stack_errors_are_prefixed():
    with pytest.raises(ParamError) as err:
        parse_stack([{"type": "logit_bias", "bias": {"1": 1}}, {"type": "fusion"}], ENV, max_len=4)
    assert err.value.param == "steering.1.experts"  # fusion needs its experts named
    with pytest.raises(ParamError) as err:
        parse_stack([{"type": "nope"}], ENV, max_len=4)
    assert "unknown steering type" in err.value.message
    with pytest.raises(ParamError) as err:
        parse_stack([{"type": "logit_bias", "bias": {"99": 1}}], ENV, max_len=4)
    assert err.value.param == "steering.0.bias"
    with pytest.raises(ParamError) as err:
        parse_stack([{"type": "logit_bias", "bias": {"1": 1}}] * 3, ENV, max_len=2)
    assert err.value.param == "steering"


def test_stack_runs_each_rows_entries_in_order_by_stage(device):
    # Row 0: two bias entries (stage 0 and 1); row 1: one; row 2: none.
    rows = [
        parse_stack([{"type": "logit_bias", "bias": {"1": 1}},
                     {"type": "logit_bias", "bias": {"1": 2, "3": 4}}], ENV, max_len=4),
        parse_stack([{"type": "logit_bias", "bias": {"2": -3}}], ENV, max_len=4),
        (),
    ]
    stack = ProcessorStack(device, 8)
    stack.update_state(rows)
    assert len(stack.stages) == 2 and stack.active
    base = torch.zeros(3, 8)
    out = stack.apply(ctx_for(base.to(device)), base.to(device)).cpu()
    assert out[0, 1] == 3 and out[0, 3] == 4
    assert out[1, 2] == -3 and out[1].abs().sum() == 3
    assert torch.equal(out[2], base[2])
    stack.update_state([(), ()])
    assert not stack.active


def test_in_place_stages_copy_once_and_never_touch_the_input(device):
    """logit_bias and margin write into one copy the stack owns; the input (which is
    also ctx.base_logits) stays as it was, and the result equals chaining each
    processor's out-of-place ``apply`` (the contract's reference)."""
    rows = [
        parse_stack([{"type": "logit_bias", "bias": {"1": 4}},
                     {"type": "logit_bias", "bias": {"2": 1, "5": 9}},
                     {"type": "margin", "tau": 0.2}], ENV, max_len=4),
        parse_stack([{"type": "logit_bias", "bias": {"3": -2}}], ENV, max_len=4),
    ]
    stack = ProcessorStack(device, 8)
    stack.update_state(rows)
    torch.manual_seed(0)
    base = torch.randn(2, 8, device=device)
    base[0, 0] = 6.0  # margin's row is confident in token 0
    keep = base.clone()
    ctx = ctx_for(base)
    clones: list[int] = []
    real_clone = torch.Tensor.clone

    def clone(t, *a, **k):
        clones.append(1)
        return real_clone(t, *a, **k)

    torch.Tensor.clone = clone  # type: ignore[method-assign]
    try:
        out = stack.apply(ctx, base)
    finally:
        torch.Tensor.clone = real_clone  # type: ignore[method-assign]
    assert torch.equal(base, keep)  # input and base untouched
    assert len(clones) == 1  # one (B, V) copy for three in-place stages
    want = base
    for stage in stack.stages:
        for proc in stage:
            want = proc.apply(ctx_for(base), want)
    assert torch.equal(out, want)
    assert out[0, 0] > out[0, 5]  # margin acted on top of the biases


def test_get_number_ranges():
    assert get_number({}, "x", 0.5, lo=0, hi=1) == 0.5
    for bad in (True, "1", float("nan"), float("inf"), 2.0):
        with pytest.raises(ParamError) as err:
            get_number({"x": bad}, "x", 0, lo=0, hi=1)
        assert err.value.param == "x"
    with pytest.raises(ParamError, match=r"\(0"):
        get_number({"x": 0}, "x", 1, lo=0, hi=1, lo_open=True)


def test_divergences_match_float64_reference():
    torch.manual_seed(0)
    a, b = torch.randn(4, 16), torch.randn(4, 16) * 3
    lp, lq = a.log_softmax(-1), b.log_softmax(-1)
    p, q = lp.double().exp(), lq.double().exp()
    kl_ref = (p * (p.log() - q.log())).sum(-1)
    m = 0.5 * (p + q)
    js_ref = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert torch.allclose(kl_from_logp(lp, lq).double(), kl_ref, atol=1e-5)
    assert torch.allclose(js_from_logp(lp, lq).double(), js_ref, atol=1e-5)
    assert (js_from_logp(lp, lq) <= math.log(2) + 1e-6).all()
    # Zero-probability tokens in p contribute nothing, even where q is 0 too.
    lp0 = torch.tensor([[0.0, float("-inf")]])
    assert kl_from_logp(lp0, lp0).item() == 0.0


def test_step_stats_and_summary():
    base = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    steered = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    tokens = torch.tensor([0, 1])
    s = step_stats(base, steered, tokens)
    assert s.shape == (2, 8)
    assert s[0, 2].abs() < 1e-6 and s[0, 7] == 0  # identical row: KL 0, no flip
    assert s[1, 7] == 1.0 and s[1, 0] == pytest.approx(math.log(4), abs=1e-5)
    summary = summarize([{"base_nll": 1.0, "js": 0.1}, {"base_nll": 3.0, "js": 0.3,
                                                         "style_nll": float("nan")}])
    assert summary["base_ppl"] == pytest.approx(math.exp(2.0))
    assert summary["js_max"] == pytest.approx(0.3) and summary["steps"] == 2
    assert "style_ppl" not in summary  # NaN = undefined, dropped


def test_summary_histograms_discrete_choices():
    steps = [{"fusion_alpha": a, "fusion_expert": 0.0} for a in (0.1, 0.3, 0.1, 0.30000001)]
    steps.append({"fusion_alpha": float("nan"), "fusion_expert": float("nan")})
    s = summarize(steps)
    assert s["fusion_alpha_histogram"] == {"0.1": 2, "0.3": 2}
    assert s["fusion_expert_histogram"] == {"0": 4}
