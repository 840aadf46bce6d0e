"""Margin calibration on hand-built logits (V = 6)."""

from __future__ import annotations

import math

import pytest
import torch

from processors.base import ParamError, ProcessorEnv, StepContext
from processors.calibration import MarginCalibration, MarginSpec

ENV = ProcessorEnv(vocab_size=6)


def run(base, steered, specs, want_stats=False, dev=torch.device("cpu")):
    """Margin on ``dev``; the output and stats come back on the CPU."""
    p = MarginCalibration(dev, 6)
    p.update_state(specs)
    ctx = StepContext(base_logits=torch.tensor(base, device=dev),
                      last_tokens=torch.full((len(base), 2), -1, device=dev),
                      want_stats=want_stats)
    out = p.apply(ctx, torch.tensor(steered, device=dev)).cpu()
    ctx.stats = {k: v.cpu() for k, v in ctx.stats.items()}
    return out, ctx


def test_confident_row_is_guarded_unsure_row_untouched(device):
    base = [[5.0, 1.0, 0, 0, 0, 0],      # p0(0) ≈ 0.95, m0 = 4
            [1.0, 0.9, 0.8, 0.7, 0, 0]]  # unsure: p0 ≈ 0.3
    steered = [[5.0, 7.0, 0, 0, 0, 0], [1.0, 3.0, 0.8, 0.7, 0, 0]]
    spec = MarginSpec(tau=0.5, gamma=1.0)
    out, ctx = run(base, steered, [spec, spec], want_stats=True, dev=device)
    assert out[0, 0] == pytest.approx(7.0 + 4.0) and out[0, 1] == 7.0
    assert torch.equal(out[1], torch.tensor(steered[1]))
    assert ctx.stats["margin_acted"].tolist() == [1.0, 0.0]
    assert ctx.stats["margin_confident"].tolist() == [1.0, 0.0]


def test_a_flip_is_restored_and_other_rows_are_bit_identical(device):
    torch.manual_seed(0)
    base = torch.randn(3, 6)
    base[0, 2] = 20.0  # row 0 confident in token 2 (p0 ≈ 1)
    steered = base + torch.randn(3, 6)
    steered[0, 4] = 30.0  # steering flipped row 0 to token 4
    out, ctx = run(base.tolist(), steered.tolist(), [MarginSpec(0.5, 0.5), None, None], True,
                   dev=device)
    st = torch.tensor(steered.tolist())
    assert torch.equal(out[1:], st[1:])
    changed = (out[0] != st[0]).nonzero().view(-1).tolist()
    assert changed == [2]  # only the guarded token moved ...
    m0 = 20.0 - float(base[0, [0, 1, 3, 4, 5]].max())
    assert float(out[0, 2]) == pytest.approx(30.0 + 0.5 * m0, abs=1e-5)  # ... to the target
    assert int(out[0].argmax()) == 2
    assert ctx.stats["margin_flip_prevented"][0] == 1.0
    assert ctx.stats["margin_acted"][0] == 1.0
    assert math.isnan(ctx.stats["margin_acted"][1])


def test_margin_does_not_act_when_steering_keeps_the_margin(device):
    base = [[6.0, 2.0, 0, 0, 0, 0]]  # confident, m0 = 4
    steered = [[9.0, 3.0, 2.0, 0, 0, 0]]  # still first, by 6 ≥ γ·m0
    out, ctx = run(base, steered, [MarginSpec(0.5, 1.0)], True, dev=device)
    assert torch.equal(out, torch.tensor(steered))
    assert ctx.stats["margin_acted"].tolist() == [0.0]
    assert ctx.stats["margin_confident"].tolist() == [1.0]


def test_two_margin_stages_merge_their_rows_stats(device):
    """Regression (issue 15.4): a later stage used to overwrite the earlier one's rows
    with NaN. Two instances own disjoint rows; both rows keep their own values."""
    dev = device
    base = torch.tensor([[5.0, 1.0, 0, 0, 0, 0], [5.0, 1.0, 0, 0, 0, 0]], device=dev)
    steered = torch.tensor([[5.0, 7.0, 0, 0, 0, 0], [5.0, 7.0, 0, 0, 0, 0]], device=dev)
    ctx = StepContext(base_logits=base, last_tokens=torch.full((2, 2), -1, device=dev),
                      want_stats=True)
    first, second = MarginCalibration(dev, 6), MarginCalibration(dev, 6)
    first.update_state([MarginSpec(0.5, 1.0), None])
    second.update_state([None, MarginSpec(0.99, 1.0)])  # row 1: p0 ≈ 0.95 < τ, not confident
    second.apply(ctx, first.apply(ctx, steered))
    ctx.stats = {k: v.cpu() for k, v in ctx.stats.items()}
    assert ctx.stats["margin_acted"].tolist() == [1.0, 0.0]
    assert ctx.stats["margin_confident"].tolist() == [1.0, 0.0]
    assert ctx.stats["margin_flip_prevented"].tolist() == [1.0, 0.0]


def test_gamma_zero_ties_and_gamma_one_restores_margin(device):
    base = [[3.0, 0.0, 0, 0, 0, 0]]  # m0 = 3
    steered = [[1.0, 4.0, 0, 0, 0, 0]]
    out, _ = run(base, steered, [MarginSpec(0.1, 0.0)], dev=device)
    assert out[0, 0] == 4.0  # ties the best other token
    out, _ = run(base, steered, [MarginSpec(0.1, 1.0)], dev=device)
    assert out[0, 0] - out[0, 1] == pytest.approx(3.0)
    # Already above the target: left alone.
    out, _ = run(base, [[9.0, 4.0, 0, 0, 0, 0]], [MarginSpec(0.1, 1.0)], dev=device)
    assert out[0, 0] == 9.0


def test_base_tie_has_zero_margin(device):
    base = [[2.0, 2.0, 0, 0, 0, 0]]  # tie: t = one of them, m0 = 0, p0 ≈ 0.39
    steered = [[2.0, 2.0, 5.0, 0, 0, 0]]
    out, _ = run(base, steered, [MarginSpec(0.35, 1.0)], dev=device)
    t = int(torch.tensor(base).argmax())
    assert out[0, t] == 5.0 and out[0, 2] == 5.0


def test_tau_threshold_is_inclusive_and_validation():
    spec = MarginCalibration.validate({"tau": 1.0, "gamma": 0.0}, ENV)
    assert spec == MarginSpec(1.0, 0.0)
    assert MarginCalibration.validate({}, ENV) == MarginSpec(0.5, 1.0)
    for params, param in [({"tau": 0}, "tau"), ({"tau": 1.5}, "tau"), ({"gamma": -0.1}, "gamma"),
                          ({"gamma": 2}, "gamma"), ({"tau": "a"}, "tau"), ({"x": 1}, "x")]:
        with pytest.raises(ParamError) as err:
            MarginCalibration.validate(params, ENV)
        assert err.value.param == param


def test_stack_combinations_are_checked():
    from processors.stack import parse_stack, stack_warnings

    env = ProcessorEnv(vocab_size=8)
    bias = {"type": "logit_bias", "bias": {"1": 2}}
    margin = {"type": "margin", "tau": 0.5}
    assert stack_warnings(parse_stack([bias, margin], env, max_len=8)) == []
    [w] = stack_warnings(parse_stack([margin], env, max_len=8))
    assert "nothing" in w or "no steering" in w
    w = stack_warnings(parse_stack([margin, bias], env, max_len=8))
    assert any("put 'margin' last" in x for x in w)
    with pytest.raises(ParamError) as err:
        parse_stack([bias, margin, {"type": "margin", "tau": 0.9}], env, max_len=8)
    assert err.value.param == "steering.2"
    with pytest.raises(ParamError) as err:
        parse_stack([bias, bias], env, max_len=8)
    assert err.value.param == "steering.1" and "repeats" in err.value.message
