"""Estimator math of the n-gram prior against nltk.lm and direct formula implementations.

The prior's probabilities are computed by the same code the processor runs on the device
(``NgramPrior.logprobs`` calls ``style_logprobs`` on CPU in float64), so these tests
check the served path, not a parallel re-implementation.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import numpy as np
import pytest
from nltk.lm import MLE, KneserNeyInterpolated, Lidstone
from nltk.util import everygrams

from processors.ngram import NgramPrior
from processors.ngram_tables import (
    count_ngrams,
    jelinek_mercer_tables,
    kneser_ney_tables,
    tables_from_arrays,
    tables_to_arrays,
)

TEXT = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog sat",
    "the cat ate the fish on the mat",
    "on the log the dog sat and the cat ran",
    "fish",
]
DOCS = [line.split() for line in TEXT]
WORDS = sorted({w for d in DOCS for w in d})
WID = {w: i for i, w in enumerate(WORDS)}


def ids(docs: list[list[str]], table: dict[str, int] = WID) -> list[list[int]]:
    return [[table[w] for w in d] for d in docs]


def contexts(vocab: list[str]) -> list[tuple[str, ...]]:
    """Every context of length 0, 1 and 2 over ``vocab`` (seen and unseen)."""
    return [(), *[(v,) for v in vocab], *itertools.product(vocab, vocab)]


# ------------------------------------------------------------------ counting
def test_counts_do_not_join_documents() -> None:
    c = count_ngrams([[1, 2], [3, 4, 1, 2]], vocab_size=5)
    assert c.tokens == 6 and c.documents == 2
    assert c.unigram.tolist() == [0, 2, 2, 1, 1]
    bigrams = {
        (int(k) // 5, int(k) % 5): int(n) for k, n in zip(c.bi_keys, c.bi_counts, strict=True)
    }
    assert bigrams == {(1, 2): 2, (3, 4): 1, (4, 1): 1}  # no (2, 3) across the boundary
    trigrams = {int(k): int(n) for k, n in zip(c.tri_keys, c.tri_counts, strict=True)}
    assert trigrams == {(3 * 5 + 4) * 5 + 1: 1, (4 * 5 + 1) * 5 + 2: 1}


def test_counts_reject_bad_ids_and_empty() -> None:
    with pytest.raises(ValueError, match="no tokens"):
        count_ngrams([[], []], vocab_size=4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        count_ngrams([[0, 4]], vocab_size=4)


def test_counts_match_python_counter_on_random_corpus() -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 30, size=int(n)).tolist() for n in rng.integers(0, 40, size=50)]
    c = count_ngrams(docs, vocab_size=30)
    ref3: Counter[tuple[int, int, int]] = Counter()
    for d in docs:
        ref3.update(zip(d, d[1:], d[2:], strict=False))
    got3 = {
        (int(k) // 900, int(k) // 30 % 30, int(k) % 30): int(n)
        for k, n in zip(c.tri_keys, c.tri_counts, strict=True)
    }
    assert got3 == dict(ref3)


# ------------------------------------------------------------------ Jelinek–Mercer
def _jm_oracle(docs: list[list[str]], k: float):
    """nltk pieces: Lidstone unigram and MLE bigram / trigram models."""
    uni = Lidstone(k, 1)
    uni.fit([list(everygrams(d, max_len=1)) for d in docs], vocabulary_text=WORDS)
    bi = MLE(2)
    bi.fit([list(everygrams(d, max_len=2)) for d in docs], vocabulary_text=WORDS)
    tri = MLE(3)
    tri.fit([list(everygrams(d, max_len=3)) for d in docs], vocabulary_text=WORDS)
    return uni, bi, tri


@pytest.mark.parametrize("weights", [(0.1, 0.3, 0.6), (1.0, 0.0, 0.0), (0.2, 0.0, 0.8)])
def test_jelinek_mercer_matches_nltk(weights: tuple[float, float, float]) -> None:
    k = 0.05
    uni, bi, tri = _jm_oracle(DOCS, k)
    V = len(uni.vocab)  # nltk's vocabulary adds <UNK>: give the prior the same size
    assert V == len(WORDS) + 1
    tables = jelinek_mercer_tables(count_ngrams(ids(DOCS), V), add_k=k)
    prior = NgramPrior("jm", tables, default_weights=weights)
    checked = 0
    for ctx in contexts(WORDS):
        got = np.exp(prior.logprobs([WID[w] for w in ctx]))
        assert got.sum() == pytest.approx(1.0, abs=1e-12)
        parts = [(weights[0], lambda w: uni.score(w))]
        if ctx and bi.counts[ctx[-1:]].N() > 0:
            parts.append((weights[1], lambda w, c=ctx[-1:]: bi.score(w, c)))
        if len(ctx) == 2 and tri.counts[ctx].N() > 0:
            parts.append((weights[2], lambda w, c=ctx: tri.score(w, c)))
        z = sum(wt for wt, _ in parts)
        for w in WORDS:
            want = sum(wt * f(w) for wt, f in parts) / z
            assert got[WID[w]] == pytest.approx(want, abs=1e-9), (ctx, w)
            checked += 1
        # The extra id (nltk's <UNK>) never occurs: only the smoothed unigram share.
        assert got[V - 1] == pytest.approx(weights[0] / z * uni.score("<UNK>"), abs=1e-12)
    assert checked == len(contexts(WORDS)) * len(WORDS)


def test_jelinek_mercer_start_of_sequence_is_unigram_only() -> None:
    tables = jelinek_mercer_tables(count_ngrams(ids(DOCS), len(WORDS)), add_k=0.5)
    prior = NgramPrior("jm", tables)
    np.testing.assert_allclose(np.exp(prior.logprobs([])), tables.unigram, atol=1e-15)
    # An unseen bigram context backs off to the unigram too ("ran" ends every document
    # it is in, so it never starts a bigram).
    np.testing.assert_allclose(np.exp(prior.logprobs([WID["ran"]])), tables.unigram, atol=1e-15)


# ------------------------------------------------------------------ Kneser–Ney
PAD = "<s>"


def test_kneser_ney_matches_nltk_where_formulas_coincide() -> None:
    """With one left pad symbol, every bigram (v, w) with v != <s> has a left neighbour,
    so nltk's middle-order γ equals ours; nltk's unigram is our ``unigram_discount=0``."""
    d = 0.6
    padded = [[PAD, *doc] for doc in DOCS]
    lm = KneserNeyInterpolated(3, discount=d)
    lm.fit([list(everygrams(doc, max_len=3)) for doc in padded], vocabulary_text=WORDS + [PAD])
    table = {**WID, PAD: len(WORDS)}
    counts = count_ngrams(ids(padded, table), vocab_size=len(table))
    prior = NgramPrior("kn", kneser_ney_tables(counts, discount=d, unigram_discount=0.0))
    for ctx in contexts(WORDS + [PAD]):
        if ctx and ctx[-1] == PAD:
            continue  # nltk divides by zero there (no trigram continues a lone <s>)
        with np.errstate(divide="ignore"):
            got = np.exp(prior.logprobs([table[w] for w in ctx]))
        for w in WORDS:
            assert got[table[w]] == pytest.approx(lm.score(w, ctx), abs=1e-9), (ctx, w)


def _kn_direct(docs: list[list[int]], V: int, d: float):
    """Interpolated Kneser–Ney written straight from its definition with dicts."""
    c3: Counter[tuple[int, ...]] = Counter()
    c2: Counter[tuple[int, ...]] = Counter()
    for doc in docs:
        c3.update(zip(doc, doc[1:], doc[2:], strict=False))
        c2.update(zip(doc, doc[1:], strict=False))
    ctx3: dict[tuple[int, int], dict[int, int]] = defaultdict(dict)
    for (u, v, w), n in c3.items():
        ctx3[(u, v)][w] = n
    n1_vw: Counter[tuple[int, int]] = Counter((v, w) for (_, v, w) in c3)  # N1+(·vw)
    ctx2: dict[int, dict[int, int]] = defaultdict(dict)
    for (v, w), n in n1_vw.items():
        ctx2[v][w] = n
    n1_w: Counter[int] = Counter(w for (_, w) in c2)  # N1+(·w)
    total1 = len(c2)

    def p1(w: int) -> float:
        seen = len(n1_w)
        return max(n1_w[w] - d, 0) / total1 + d * seen / total1 / V

    def p2(w: int, v: int) -> float:
        if v not in ctx2:
            return p1(w)
        row = ctx2[v]
        tot = sum(row.values())
        return max(row.get(w, 0) - d, 0) / tot + d * len(row) / tot * p1(w)

    def p3(w: int, u: int, v: int) -> float:
        if (u, v) not in ctx3:
            return p2(w, v)
        row = ctx3[(u, v)]
        tot = sum(row.values())
        return max(row.get(w, 0) - d, 0) / tot + d * len(row) / tot * p2(w, v)

    return p1, p2, p3


@pytest.mark.parametrize("d", [0.75, 1.0, 0.1])
def test_kneser_ney_matches_direct_formula(d: float) -> None:
    V = len(WORDS) + 3  # a few ids that never occur
    docs = ids(DOCS)
    prior = NgramPrior("kn", kneser_ney_tables(count_ngrams(docs, V), discount=d))
    p1, p2, p3 = _kn_direct(docs, V, d)
    for ctx in [(), *[(v,) for v in range(V)], *itertools.product(range(V), range(V))]:
        got = np.exp(prior.logprobs(list(ctx)))
        assert got.sum() == pytest.approx(1.0, abs=1e-12), ctx
        assert np.all(got > 0)
        for w in range(V):
            if len(ctx) == 2:
                want = p3(w, *ctx)
            else:
                want = p2(w, *ctx) if ctx else p1(w)
            assert got[w] == pytest.approx(want, abs=1e-12), (ctx, w)


def test_kneser_ney_ignores_weights() -> None:
    prior = NgramPrior("kn", kneser_ney_tables(count_ngrams(ids(DOCS), len(WORDS))))
    ctx = [WID["the"], WID["cat"]]
    np.testing.assert_array_equal(prior.logprobs(ctx, (1, 0, 0)), prior.logprobs(ctx, (1, 2, 3)))


# ------------------------------------------------------------------ serialization
@pytest.mark.parametrize("estimator", ["jelinek_mercer", "kneser_ney"])
def test_tables_round_trip_and_validation(estimator: str) -> None:
    counts = count_ngrams(ids(DOCS), len(WORDS))
    tables = (
        jelinek_mercer_tables(counts)
        if estimator == "jelinek_mercer"
        else kneser_ney_tables(counts)
    )
    arrays = tables_to_arrays(tables)
    back = tables_from_arrays(arrays, estimator, len(WORDS))
    for name, value in tables_to_arrays(back).items():
        np.testing.assert_array_equal(value, arrays[name])
    bad = dict(arrays, tri_keys=arrays["tri_keys"][::-1].copy())
    with pytest.raises(ValueError, match="sorted"):
        tables_from_arrays(bad, estimator, len(WORDS))
    bad = dict(arrays, bi_next_ids=arrays["bi_next_ids"] + len(WORDS))
    with pytest.raises(ValueError, match="out of range"):
        tables_from_arrays(bad, estimator, len(WORDS))
    bad = {k: v for k, v in arrays.items() if k != "unigram"}
    with pytest.raises(ValueError, match="missing"):
        tables_from_arrays(bad, estimator, len(WORDS))
    with pytest.raises(ValueError, match="unigram"):
        tables_from_arrays(arrays, estimator, len(WORDS) + 1)
