"""n-gram priors stay finite in the served float32 at every valid parameter setting.

Regression for issue 15 item 1: weights ``[1e-50, 1, 1]``, ``add_k = 1e-50`` or a
Kneser–Ney ``discount = 1e-20`` used to give most tokens ``-inf`` (raw) and NaN
(``zscore``). Checked against the float64 table lookup of ``tests/unit/ngram_oracle.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from processors.base import ProcessorEnv, StepContext
from processors.ngram import NgramPrior, NgramProcessor
from tests.unit.ngram_oracle import table_logp

VP = 40
rng = np.random.default_rng(7)
DOCS = [rng.integers(0, 25, size=int(n)).tolist() for n in rng.integers(3, 40, size=30)]
CONTEXTS = [[-1, -1], [-1, 3], [3, 5], [5, 3], [30, 31], [0, 39]]

PRIORS = {
    "tiny_add_k": NgramPrior.build("tiny_add_k", DOCS, VP, add_k=1e-50),
    "tiny_discount": NgramPrior.build("tiny_discount", DOCS, VP, estimator="kneser_ney",
                                      discount=1e-20),
    "full_discount": NgramPrior.build("full_discount", DOCS, VP, estimator="kneser_ney",
                                      discount=1.0),
    "default": NgramPrior.build("default", DOCS, VP),
}
ENV = ProcessorEnv(vocab_size=VP, priors=PRIORS)
CASES = [
    ("tiny_add_k", None),
    ("default", [1e-50, 1, 1]),
    ("default", [1e-300, 0, 1]),
    ("tiny_add_k", [1e-30, 1e-10, 1]),
    ("tiny_discount", None),
    ("full_discount", None),
    ("default", None),
]


def _apply(
    name: str, weights: list[float] | None, scale: str
) -> tuple[torch.Tensor, tuple[float, ...]]:
    params: dict[str, object] = {"prior": name, "lambda": 1.0, "scale": scale}
    if weights is not None:
        params["weights"] = weights
    spec = NgramProcessor.validate(params, ENV)
    proc = NgramProcessor(torch.device("cpu"), VP)
    proc.update_state([spec] * len(CONTEXTS))
    logits = torch.zeros(len(CONTEXTS), VP, dtype=torch.float32)
    ctx = StepContext(base_logits=logits, last_tokens=torch.tensor(CONTEXTS))
    return proc.apply(ctx, logits), spec.weights


@pytest.mark.parametrize(("name", "weights"), CASES)
def test_raw_prior_is_finite_and_matches_the_float64_table(
    name: str, weights: list[float] | None
) -> None:
    out, w = _apply(name, weights, "raw")
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    tables = PRIORS[name].tables
    for b, ctx in enumerate(CONTEXTS):
        want = table_logp(tables, [t for t in ctx if t >= 0], w)
        assert np.isfinite(want).all()
        # float32 rounding of values down to ~-700: relative 1e-6, plus the sum's rounding.
        np.testing.assert_allclose(out[b].double().numpy(), want, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize(("name", "weights"), CASES)
def test_zscore_prior_is_finite_and_standardized(name: str, weights: list[float] | None) -> None:
    out, _ = _apply(name, weights, "zscore")
    assert torch.isfinite(out).all()
    mean = out.double().mean(dim=1)
    std = out.double().std(dim=1, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-4)
    torch.testing.assert_close(std, torch.ones_like(std), rtol=0, atol=1e-3)


def test_add_k_that_underflows_float64_is_refused_at_build() -> None:
    with pytest.raises(ValueError, match="add_k"):
        NgramPrior.build("x", DOCS, VP, add_k=5e-324)
