"""The ngram processor on hand-built logits (vocabulary ≤ 32): lookup, injection, masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from processors.base import ParamError, ProcessorEnv, StepContext
from processors.ngram import MAX_LAMBDA, NgramPrior, NgramProcessor, NgramSpec
from processors.stack import ProcessorStack, parse_stack
from tests.unit.ngram_oracle import table_logp

VP = 20  # the prior's vocabulary
V = 24  # the model's (padded) vocabulary
FP = "tok-A"
rng = np.random.default_rng(1)
DOCS = [rng.integers(0, 12, size=int(n)).tolist() for n in rng.integers(2, 30, size=40)]
JM = NgramPrior.build("jm", DOCS, VP, tokenizer_fingerprint=FP, weights=(0.2, 0.3, 0.5))
KN = NgramPrior.build("kn", DOCS[:20], VP, estimator="kneser_ney", tokenizer_fingerprint=FP)
ENV = ProcessorEnv(
    vocab_size=V, tokenizer_fingerprint=FP, priors={"jm": JM, "kn": KN}
)


def spec(**params: object) -> NgramSpec:
    return NgramProcessor.validate({"type": "ngram", "prior": "jm", **params}, ENV)


def run(
    specs: list[NgramSpec | None], logits: torch.Tensor, last: torch.Tensor, stats: bool = False
):
    proc = NgramProcessor(torch.device("cpu"), V)
    proc.update_state(specs)
    ctx = StepContext(base_logits=logits, last_tokens=last, want_stats=stats)
    return proc.apply(ctx, logits), ctx


def host_logp(prior: NgramPrior, context: list[int], weights: tuple[float, ...] | None = None):
    """The estimator's float64 table lookup (tests/unit/ngram_oracle.py), as float32.

    Independent of the device path (``style_logprobs``) that the processor runs.
    """
    ctx = [t for t in context if t >= 0]
    w = weights if weights is not None else prior.default_weights
    return torch.from_numpy(table_logp(prior.tables, ctx, w)).float()


def test_raw_injection_equals_host_prior_per_context() -> None:
    B = 6
    logits = torch.randn(B, V)
    last = torch.tensor([[3, 5], [-1, 5], [-1, -1], [5, 3], [13, 14], [19, 0]])
    out, _ = run([spec(**{"lambda": 0.7})] * B, logits, last)
    for b in range(B):
        logp = host_logp(JM, last[b].tolist())
        want = logits[b, :VP] + 0.7 * logp
        torch.testing.assert_close(out[b, :VP], want, rtol=0, atol=1e-5)
        # Padded ids the prior does not know get the row's least likely prior value.
        torch.testing.assert_close(out[b, VP:], logits[b, VP:] + 0.7 * logp.min())


def test_start_of_sequence_uses_lower_orders() -> None:
    logits = torch.zeros(3, V)
    last = torch.tensor([[-1, -1], [-1, 4], [7, 4]])
    out, _ = run([spec(**{"lambda": 1.0})] * 3, logits, last)
    uni = torch.from_numpy(JM.tables.unigram).float().log()
    torch.testing.assert_close(out[0, :VP], uni, rtol=0, atol=1e-6)  # unigram only
    torch.testing.assert_close(out[1, :VP], host_logp(JM, [4]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[2, :VP], host_logp(JM, [7, 4]), rtol=0, atol=1e-6)
    assert not torch.allclose(out[1], out[2])  # the trigram context (7, 4) was seen


def test_lambda_zero_and_unused_rows_are_bit_identical() -> None:
    logits = torch.randn(4, V)
    logits[0, 0] = -0.0  # even a negative zero survives
    last = torch.tensor([[1, 2], [1, 2], [1, 2], [1, 2]])
    specs = [spec(**{"lambda": 0.0}), None, spec(**{"lambda": 0.0, "scale": "zscore"}), spec()]
    out, _ = run(specs, logits, last)
    for b in (0, 1, 2):
        assert torch.equal(out[b], logits[b])
        assert out[b].numpy().tobytes() == logits[b].numpy().tobytes()
    assert not torch.equal(out[3], logits[3])


def test_all_lambda_zero_without_stats_returns_input() -> None:
    logits = torch.randn(2, V)
    out, ctx = run([spec(**{"lambda": 0.0}), None], logits, torch.tensor([[1, 2], [3, 4]]))
    assert out is logits and "style_nll" not in ctx.stats


def test_zscore_standardizes_over_the_prior_vocabulary() -> None:
    logits = torch.zeros(2, V)
    last = torch.tensor([[3, 5], [-1, -1]])
    out, _ = run([spec(**{"lambda": 1.0, "scale": "zscore"})] * 2, logits, last)
    z = out[:, :VP]
    torch.testing.assert_close(z.mean(1), torch.zeros(2), rtol=0, atol=1e-5)
    torch.testing.assert_close(z.std(1, unbiased=False), torch.ones(2), rtol=0, atol=1e-5)
    logp = host_logp(JM, [3, 5])
    torch.testing.assert_close(
        z[0], (logp - logp.mean()) / logp.std(unbiased=False), rtol=0, atol=1e-5
    )
    assert torch.equal(out[:, VP:], z.amin(1, keepdim=True).expand(2, V - VP))


def test_mixed_batch_rows_equal_their_solo_runs() -> None:
    """Different priors, estimators, λ, weights and scales in one batch, plus idle rows."""
    specs = [
        spec(**{"lambda": 0.3}),
        None,
        NgramProcessor.validate({"prior": "kn", "lambda": 1.0, "scale": "zscore"}, ENV),
        spec(**{"lambda": 2.5, "allow_lambda_above_one": True, "weights": [1, 0, 3]}),
        NgramProcessor.validate({"prior": "kn", "lambda": 0.05}, ENV),
        spec(**{"lambda": 0.0}),
    ]
    B = len(specs)
    logits = torch.randn(B, V)
    last = torch.tensor([[3, 5], [1, 1], [2, 9], [-1, 8], [-1, -1], [4, 4]])
    perm = torch.randperm(B)
    out, _ = run([specs[i] for i in perm.tolist()], logits[perm], last[perm])
    for j, b in enumerate(perm.tolist()):
        if specs[b] is None:
            assert torch.equal(out[j], logits[b])
            continue
        solo, _ = run([specs[b]], logits[b : b + 1], last[b : b + 1])
        torch.testing.assert_close(out[j], solo[0], rtol=0, atol=1e-6)
    kn_solo, _ = run([specs[2]], torch.zeros(1, V), last[2:3])
    z_ref = host_logp(KN, [2, 9])
    z_ref = (z_ref - z_ref.mean()) / z_ref.std(unbiased=False)
    torch.testing.assert_close(kn_solo[0, :VP], z_ref, rtol=0, atol=1e-5)


def test_style_nll_token_stat_is_nan_for_rows_without_prior() -> None:
    logits = torch.randn(3, V)
    last = torch.tensor([[3, 5], [3, 5], [-1, 2]])
    specs = [spec(**{"lambda": 0.0}), None, spec()]
    out, ctx = run(specs, logits, last, stats=True)
    table = ctx.stats["style_nll"]
    assert table.shape == (3, V)
    assert torch.isnan(table[1]).all()
    tokens = torch.tensor([7, 7, 19])
    got = table.gather(1, tokens.view(-1, 1)).squeeze(1)
    assert got[0].item() == pytest.approx(-float(host_logp(JM, [3, 5])[7]), abs=1e-5)
    assert math.isnan(got[1].item())
    assert got[2].item() == pytest.approx(-float(host_logp(JM, [2])[19]), abs=1e-5)
    assert torch.equal(out[0], logits[0])  # λ = 0 still reports, but does not steer


def test_two_ngram_stages_in_one_stack() -> None:
    """A row listing two ngram entries gets both injections, in order."""
    entries = [
        {"type": "ngram", "prior": "jm", "lambda": 0.5},
        {"type": "ngram", "prior": "kn", "lambda": 0.25},
    ]
    row = parse_stack(entries, ENV, max_len=4)
    stack = ProcessorStack(torch.device("cpu"), V)
    stack.update_state([row, ()])
    logits = torch.zeros(2, V)
    last = torch.tensor([[3, 5], [3, 5]])
    out = stack.apply(StepContext(base_logits=logits, last_tokens=last), logits)
    want = 0.5 * host_logp(JM, [3, 5]) + 0.25 * host_logp(KN, [3, 5])
    torch.testing.assert_close(out[0, :VP], want, rtol=0, atol=1e-5)
    assert torch.equal(out[1], logits[1])


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("params", "param", "status", "needle"),
    [
        ({"prior": "nope"}, "prior", 404, "unknown prior 'nope'"),
        ({"prior": 3}, "prior", 400, "'prior' must be"),
        ({"lambda": 1.5}, "lambda", 400, "allow_lambda_above_one"),
        ({"lambda": -0.1}, "lambda", 400, "[0, 1]"),
        ({"lambda": "0.5"}, "lambda", 400, "must be a number"),
        ({"lambda": True}, "lambda", 400, "must be a number"),
        ({"lambda": float("nan")}, "lambda", 400, "finite"),
        ({"lambda": MAX_LAMBDA + 1, "allow_lambda_above_one": True}, "lambda", 400, "[0, 100]"),
        ({"allow_lambda_above_one": "yes"}, "allow_lambda_above_one", 400, "true or false"),
        ({"weights": [1, 2]}, "weights", 400, "list of 3"),
        ({"weights": [1, -2, 3]}, "weights.1", 400, ">= 0"),
        ({"weights": [0, 1, 1]}, "weights.0", 400, "unigram weight"),
        ({"weights": [1, True, 1]}, "weights.1", 400, "must be a number"),
        ({"scale": "log"}, "scale", 400, "one of 'raw', 'zscore'"),
        # A 400-digit JSON integer is a 400 naming the field, never an OverflowError.
        ({"lambda": 10**400}, "lambda", 400, "too large for a float"),
        ({"weights": [1, 10**400, 1]}, "weights.1", 400, "too large for a float"),
        ({"lambda": 2, "allow_lambda_above_one": 1}, "allow_lambda_above_one", 400, "true or"),
        ({"alpha": 1}, "alpha", 400, "unknown field"),
    ],
)
def test_validate_rejects(params: dict, param: str, status: int, needle: str) -> None:
    with pytest.raises(ParamError) as err:
        NgramProcessor.validate({"prior": "jm", **params}, ENV)
    assert (err.value.param, err.value.status) == (param, status)
    assert needle in err.value.message


def test_validate_accepts_and_defaults() -> None:
    s = NgramProcessor.validate({"prior": "jm"}, ENV)
    assert (s.lam, s.weights, s.scale, s.prior) == (0.1, (0.2, 0.3, 0.5), "raw", JM)
    s = spec(**{"lambda": 3, "allow_lambda_above_one": True, "weights": [1, 0, 0]})
    assert (s.lam, s.weights) == (3.0, (1.0, 0.0, 0.0))


def test_weights_are_for_jelinek_mercer_only() -> None:
    with pytest.raises(ParamError, match="jelinek_mercer priors only") as err:
        NgramProcessor.validate({"prior": "kn", "weights": [1, 1, 1]}, ENV)
    assert err.value.param == "weights"


def test_prior_of_another_tokenizer_is_400() -> None:
    env = ProcessorEnv(vocab_size=V, tokenizer_fingerprint="tok-B", priors=ENV.priors)
    with pytest.raises(ParamError, match="another tokenizer") as err:
        NgramProcessor.validate({"prior": "jm"}, env)
    assert (err.value.param, err.value.status) == ("prior", 400)


def test_stack_prefixes_the_param_path() -> None:
    with pytest.raises(ParamError) as err:
        parse_stack([{"type": "ngram", "prior": "nope"}], ENV, max_len=4)
    assert (err.value.param, err.value.status) == ("steering.0.prior", 404)


def test_tables_are_uploaded_once_per_prior(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose set of priors changes stacks the tables on the device: each prior's
    host arrays become tensors once (counted at ``torch.from_numpy``), and the stacked
    lookup still equals the host oracle for every row."""
    a = NgramPrior.build("a", DOCS[5:25], VP, tokenizer_fingerprint=FP)
    b = NgramPrior.build("b", DOCS[10:], VP, estimator="kneser_ney", tokenizer_fingerprint=FP)
    env = ProcessorEnv(vocab_size=V, tokenizer_fingerprint=FP, priors={"a": a, "b": b})
    made: list[int] = []
    real = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda x: made.append(1) or real(x))
    sa = NgramProcessor.validate({"prior": "a", "lambda": 1.0}, env)
    sb = NgramProcessor.validate({"prior": "b", "lambda": 1.0}, env)
    last = torch.tensor([[3, 5], [2, 9]])
    counts = []
    for specs in ([sa, None], [sa, sb], [None, sb], [sb, sa]):
        n0 = len(made)
        out, _ = run(specs, torch.zeros(2, V), last)
        counts.append(len(made) - n0)
        for row, s in enumerate(specs):
            if s is not None:
                want = host_logp(s.prior, last[row].tolist())
                torch.testing.assert_close(out[row, :VP], want, rtol=0, atol=1e-5)
    per_prior = counts[0]
    assert per_prior > 0
    assert counts == [per_prior, per_prior, 0, 0]  # b once; then nothing new
