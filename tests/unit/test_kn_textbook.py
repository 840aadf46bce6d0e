"""The served Kneser–Ney prior against a textbook oracle (Chen & Goodman 1998, §2.7/§3,
interpolated Kneser–Ney with one discount ``D`` per order, recursion ending in the uniform
distribution).

The oracle counts the corpus itself with Python sets and dicts (no code from
``processors/``) and evaluates, for a context ``(u, v)``:

    p3(w|uv) = max(c(uvw) − D, 0)/c(uv•) + D·N1+(uv•)/c(uv•) · p2(w|v)      if c(uv•) > 0
    p2(w|v)  = max(N1+(•vw) − D, 0)/N1+(•v•) + D·|{w: N1+(•vw) > 0}|/N1+(•v•) · p1(w)
    p1(w)    = max(N1+(•w) − D, 0)/N1+(••) + D·|{w: N1+(•w) > 0}|/N1+(••) · 1/V

with continuation counts ``N1+(•vw) = |{x: c(xvw) > 0}|`` — the lower orders count
distinct left contexts, as Chen & Goodman prescribe, and an unseen context defers to the
next lower order. It is compared with what the server computes for the served
configuration (``estimator="kneser_ney"``, default discount, unigram discounted too).
docs/ngram.md lists where this differs from ``nltk.lm.KneserNeyInterpolated``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from processors.ngram import NgramPrior
from processors.ngram_tables import DEFAULT_DISCOUNT

V = 30
rng = np.random.default_rng(5)
DOCS = [rng.integers(0, 22, size=int(n)).tolist() for n in rng.integers(2, 40, size=40)]


def textbook_kn(docs: list[list[int]], V: int, D: float):
    tri: dict[tuple[int, int, int], int] = defaultdict(int)
    bi_left: dict[tuple[int, int], set[int]] = defaultdict(set)  # (v, w) -> {x}
    uni_left: dict[int, set[int]] = defaultdict(set)  # w -> {v}
    for d in docs:
        for i in range(len(d) - 1):
            uni_left[d[i + 1]].add(d[i])
        for i in range(len(d) - 2):
            tri[(d[i], d[i + 1], d[i + 2])] += 1
            bi_left[(d[i + 1], d[i + 2])].add(d[i])
    n_bigram_types = sum(len(s) for s in uni_left.values())  # N1+(••)
    seen_cont = len(uni_left)

    def p1(w: int) -> float:
        n = len(uni_left.get(w, ()))
        return max(n - D, 0.0) / n_bigram_types + D * seen_cont / n_bigram_types / V

    def p2(w: int, v: int) -> float:
        conts = {ww: len(s) for (vv, ww), s in bi_left.items() if vv == v}
        total = sum(conts.values())
        if total == 0:
            return p1(w)
        return max(conts.get(w, 0) - D, 0.0) / total + D * len(conts) / total * p1(w)

    def p3(w: int, u: int, v: int) -> float:
        counts = {ww: c for (uu, vv, ww), c in tri.items() if (uu, vv) == (u, v)}
        total = sum(counts.values())
        if total == 0:
            return p2(w, v)
        return max(counts.get(w, 0) - D, 0.0) / total + D * len(counts) / total * p2(w, v)

    return p1, p2, p3


@pytest.mark.parametrize("context", [[], [3], [21], [25], [3, 5], [5, 3], [0, 1], [24, 2]])
def test_served_kneser_ney_matches_chen_goodman(context: list[int]) -> None:
    prior = NgramPrior.build("kn", DOCS, V, estimator="kneser_ney")
    p1, p2, p3 = textbook_kn(DOCS, V, DEFAULT_DISCOUNT)
    if len(context) == 2:
        want = [p3(w, *context) for w in range(V)]
    elif len(context) == 1:
        want = [p2(w, context[0]) for w in range(V)]
    else:
        want = [p1(w) for w in range(V)]
    assert math.isclose(sum(want), 1.0, rel_tol=1e-12)  # the oracle is a distribution
    got = np.exp(prior.logprobs(context))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
