"""Counting 1/2/3-grams of token ids and turning the counts into lookup tables.

This is the host-side (numpy) half of the n-gram style prior; ``processors.ngram`` holds
the device lookup and the processor. Everything here is vectorized over the corpus: a
corpus of 1M tokens is counted with a handful of ``np.unique`` calls (well under a
second), so building a prior is dominated by tokenization.

Representation. Every estimator used here can be written, for a context ``(u, v)``, as

    p(w | u, v) = c1 · p1(w) + c2 · a2(v, w) + c3 · a3(uv, w)

where ``p1`` is a dense smoothed unigram ``(V,)``, ``a2``/``a3`` are *sparse*: non-zero
only for continuations ``w`` seen after the context, and ``c1, c2, c3`` are per-context
scalars. A table of order ``n`` (:class:`OrderTable`) therefore stores, per seen
context (sorted int64 key), a contiguous slice of next-token ids and values ``a`` plus
one backoff weight ``gamma``:

* ``jelinek_mercer`` (default): ``a_n = c(ctx w) / c(ctx ·)`` (maximum likelihood),
  ``p1`` the Lidstone (add-k) unigram ``(c(w) + k) / (N + k·V)``, and
  ``c_n = w_n·[order n matched] / Σ_{matched m} w_m`` with the request's weights, where
  order ``n`` *matches* when its context (``n − 1`` tokens) was seen followed by some
  token inside a document. ``gamma`` is unused (zeros).
* ``kneser_ney``: interpolated Kneser–Ney with one absolute discount ``d``:

      p3(w|uv) = max(c(uvw) − d, 0) / c(uv·)      + γ(uv) · p2(w|v),  γ(uv) = d·N1+(uv·)/c(uv·)
      p2(w|v)  = max(N1+(·vw) − d, 0) / N1+(·v·)  + γ(v)  · p1(w),    γ(v)  = d·N1+'(v·)/N1+(·v·)
      p1(w)    = max(N1+(·w) − d1, 0) / N1+(··)   + d1·N1+'(·)/N1+(··) · 1/V

  with continuation counts ``N1+(·vw) = |{x : c(xvw) > 0}|``, ``N1+'(v·)`` the number of
  distinct ``w`` with ``N1+(·vw) > 0`` and ``N1+'(·)`` the number of tokens with
  ``N1+(·w) > 0``. An unseen context defers to the next lower order (γ = 1). So
  ``c3 = [uv seen]``, ``c2 = γ(uv)`` or 1, ``c1 = c2 · (γ(v) or 1)``.

Two details differ from ``nltk.lm.KneserNeyInterpolated`` (see the tests, which check
both the agreement where the formulas coincide and these formulas directly):

1. nltk's middle-order γ counts distinct continuations by *raw* bigram counts
   (``|{w : c(vw) > 0}|``); we count those with a continuation count, which keeps
   ``Σ_w p2(w|v) = 1`` exactly when documents are not padded (the first bigram of a
   document has no left neighbour). The two agree whenever every bigram also occurs
   with a left neighbour — always the case with nltk's sentence padding.
2. nltk's unigram level is the unsmoothed continuation distribution ``N1+(·w)/N1+(··)``
   (``d1 = 0``), which gives zero probability to tokens never seen as a continuation;
   we interpolate it with the uniform distribution over the prior's vocabulary by the
   discounted mass (``d1 = d`` by default) so every token keeps a non-zero probability.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("steerserve.priors")

ESTIMATORS: tuple[str, ...] = ("jelinek_mercer", "kneser_ney")
DEFAULT_WEIGHTS: tuple[float, float, float] = (0.1, 0.3, 0.6)
DEFAULT_ADD_K = 0.01
# Smallest add-k the HTTP API accepts: an unseen token's (0 + k) / (N + k·V) then stays
# positive in float64 for any corpus below ~1e23 tokens (float64's smallest value ≈ 5e-324).
MIN_ADD_K = 1e-300
DEFAULT_DISCOUNT = 0.75

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class NgramCounts:
    """Distinct n-grams of a tokenized corpus with their counts.

    Attributes:
        vocab_size: ``V``; every token id is in ``[0, V)``.
        tokens: corpus size in tokens.
        documents: number of non-empty documents.
        unigram: ``(V,)`` int64 token counts.
        bi_keys: ``(N2,)`` int64 sorted unique keys ``v·V + w`` of the bigrams.
        bi_counts: ``(N2,)`` int64 their counts.
        tri_keys: ``(N3,)`` int64 sorted unique keys ``(u·V + v)·V + w``.
        tri_counts: ``(N3,)`` int64 their counts.
    """

    vocab_size: int
    tokens: int
    documents: int
    unigram: np.ndarray
    bi_keys: np.ndarray
    bi_counts: np.ndarray
    tri_keys: np.ndarray
    tri_counts: np.ndarray


@dataclass(frozen=True)
class OrderTable:
    """Sparse part of one order: context key → slice of (next id, value), plus γ.

    Attributes:
        keys: ``(C,)`` int64 sorted context keys (``v`` for order 2, ``u·V + v`` for 3).
        offsets: ``(C + 1,)`` int64; context ``i`` owns entries ``offsets[i]:offsets[i+1]``.
        next_ids: ``(E,)`` int64 next-token ids, sorted within each slice.
        values: ``(E,)`` float64 the sparse term ``a(ctx, w)``.
        gamma: ``(C,)`` float64 the backoff weight of each context (Kneser–Ney only).
    """

    keys: np.ndarray
    offsets: np.ndarray
    next_ids: np.ndarray
    values: np.ndarray
    gamma: np.ndarray

    @property
    def contexts(self) -> int:
        """Number of contexts ``C``."""
        return int(self.keys.shape[0])

    @property
    def entries(self) -> int:
        """Number of (context, next token) entries ``E``."""
        return int(self.next_ids.shape[0])

    @property
    def max_len(self) -> int:
        """The longest slice (most continuations of one context); 0 when empty."""
        return int(np.diff(self.offsets).max()) if self.contexts else 0


@dataclass(frozen=True)
class NgramTables:
    """A trained prior's numbers: dense unigram and the order-2/3 tables.

    Attributes:
        estimator: one of :data:`ESTIMATORS`.
        vocab_size: ``V`` of the prior (the tokenizer's size; may be below the model's
            padded output size).
        unigram: ``(V,)`` float64 ``p1``, strictly positive, sums to 1.
        bi: the order-2 table (contexts are single tokens).
        tri: the order-3 table (contexts are token pairs).
    """

    estimator: str
    vocab_size: int
    unigram: np.ndarray
    bi: OrderTable
    tri: OrderTable


def _check_vocab(vocab_size: int) -> None:
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size**3 >= 2**63:
        raise ValueError(f"vocab_size {vocab_size} is too large for int64 trigram keys")


def count_ngrams(
    documents: Iterable[Sequence[int] | np.ndarray],
    vocab_size: int,
    progress: ProgressFn | None = None,
) -> NgramCounts:
    """Count the 1-, 2- and 3-grams of ``documents`` (lists of token ids).

    N-grams never span two documents. All work after concatenation is vectorized:
    keys are packed into int64 and counted with ``np.unique``.
    """
    _check_vocab(vocab_size)
    V = vocab_size
    arrays = [np.asarray(d, dtype=np.int64).reshape(-1) for d in documents]
    arrays = [a for a in arrays if a.size]
    if not arrays:
        raise ValueError("the corpus has no tokens")
    t = np.concatenate(arrays)  # (N,)
    if t.min() < 0 or t.max() >= V:
        raise ValueError(f"token ids must lie in [0, {V}), got [{t.min()}, {t.max()}]")
    N = int(t.shape[0])
    lengths = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=len(arrays))
    # has_next[i]: token i is followed by another token of the same document.
    has_next = np.ones(N, dtype=bool)
    has_next[np.cumsum(lengths) - 1] = False

    unigram = np.bincount(t, minlength=V).astype(np.int64)
    i2 = np.flatnonzero(has_next)  # bigram start positions
    bi_all = t[i2] * V + t[i2 + 1]
    bi_keys, bi_counts = np.unique(bi_all, return_counts=True)
    i3 = i2[has_next[i2 + 1]] if i2.size else i2  # trigram start positions
    tri_all = (t[i3] * V + t[i3 + 1]) * V + t[i3 + 2]
    tri_keys, tri_counts = np.unique(tri_all, return_counts=True)
    if progress is not None:
        progress(
            f"counted {N:,} tokens in {len(arrays):,} documents: "
            f"{int((unigram > 0).sum()):,} unigrams, {bi_keys.size:,} bigrams, "
            f"{tri_keys.size:,} trigrams"
        )
    return NgramCounts(
        vocab_size=V,
        tokens=N,
        documents=len(arrays),
        unigram=unigram,
        bi_keys=bi_keys.astype(np.int64),
        bi_counts=bi_counts.astype(np.int64),
        tri_keys=tri_keys.astype(np.int64),
        tri_counts=tri_counts.astype(np.int64),
    )


def _group(keys: np.ndarray, V: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split sorted n-gram keys into (context keys (C,), offsets (C+1,), next ids (E,))."""
    ctx = keys // V
    nxt = keys % V
    if keys.size == 0:
        return ctx, np.zeros(1, dtype=np.int64), nxt
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ctx)) + 1]).astype(np.int64)
    offsets = np.concatenate([starts, [keys.size]]).astype(np.int64)
    return ctx[starts], offsets, nxt


def _table(keys: np.ndarray, counts: np.ndarray, V: int, discount: float | None) -> OrderTable:
    """Order table from sorted n-gram keys and their (raw or continuation) counts.

    ``discount=None`` gives maximum-likelihood values and zero γ (Jelinek–Mercer);
    otherwise absolute discounting with γ = d · distinct / total (Kneser–Ney).
    """
    ctx_keys, offsets, nxt = _group(keys, V)
    c = counts.astype(np.float64)
    if ctx_keys.size == 0:
        empty_f = np.zeros(0, dtype=np.float64)
        return OrderTable(ctx_keys, offsets, nxt, empty_f, empty_f)
    totals = np.add.reduceat(c, offsets[:-1])  # (C,)
    per_entry_total = np.repeat(totals, np.diff(offsets))  # (E,)
    if discount is None:
        values = c / per_entry_total
        gamma = np.zeros_like(totals)
    else:
        values = np.maximum(c - discount, 0.0) / per_entry_total
        gamma = discount * np.diff(offsets).astype(np.float64) / totals
    return OrderTable(ctx_keys, offsets, nxt, values, gamma)


def _check_unigram(unigram: np.ndarray, what: str) -> None:
    """Every token must keep a positive float64 probability (its log is what is served).

    Only a smoothing parameter near float64's underflow (``add_k=5e-324``) can break
    this; the device path takes logs in float64, so anything positive here stays
    finite in float32 (processors.ngram.style_logprobs).
    """
    if not (np.all(np.isfinite(unigram)) and np.all(unigram > 0)):
        raise ValueError(
            f"{what} is too small: some tokens' smoothed unigram probability underflows "
            "to 0 in float64"
        )


def jelinek_mercer_tables(counts: NgramCounts, add_k: float = DEFAULT_ADD_K) -> NgramTables:
    """Tables of the interpolated (Jelinek–Mercer) estimator with a Lidstone unigram."""
    if not add_k > 0:
        raise ValueError(f"add_k must be > 0, got {add_k}")
    V = counts.vocab_size
    unigram = (counts.unigram.astype(np.float64) + add_k) / (counts.tokens + add_k * V)
    _check_unigram(unigram, f"add_k={add_k:g}")
    bi = _table(counts.bi_keys, counts.bi_counts, V, None)
    tri = _table(counts.tri_keys, counts.tri_counts, V, None)
    return NgramTables("jelinek_mercer", V, unigram, bi, tri)


def kneser_ney_tables(
    counts: NgramCounts,
    discount: float = DEFAULT_DISCOUNT,
    unigram_discount: float | None = None,
) -> NgramTables:
    """Tables of interpolated Kneser–Ney (formulas in the module docstring).

    ``unigram_discount`` defaults to ``discount``; 0 reproduces nltk's unsmoothed
    continuation unigram (used by the oracle test only).
    """
    if not 0 < discount <= 1:
        raise ValueError(f"discount must be in (0, 1], got {discount}")
    d1 = discount if unigram_discount is None else unigram_discount
    if not 0 <= d1 <= 1:
        raise ValueError(f"unigram_discount must be in [0, 1], got {d1}")
    V = counts.vocab_size
    tri = _table(counts.tri_keys, counts.tri_counts, V, discount)
    # N1+(·vw): distinct left neighbours of each bigram = distinct trigrams per suffix.
    suffix = counts.tri_keys % (V * V)
    cont_keys, cont_counts = np.unique(suffix, return_counts=True)
    bi = _table(cont_keys.astype(np.int64), cont_counts.astype(np.int64), V, discount)
    # N1+(·w): distinct left neighbours of each token = distinct bigrams per last token.
    cont1 = np.bincount(counts.bi_keys % V, minlength=V).astype(np.float64)
    total = float(counts.bi_keys.size)
    if total > 0:
        seen = float((cont1 > 0).sum())
        unigram = np.maximum(cont1 - d1, 0.0) / total + d1 * seen / total / V
    else:  # no bigram at all (one-token documents): nothing to learn from
        unigram = np.full(V, 1.0 / V)
    if d1 > 0:
        _check_unigram(unigram, f"discount={discount:g}")
    return NgramTables("kneser_ney", V, unigram, bi, tri)


def build_tables(
    documents: Iterable[Sequence[int] | np.ndarray],
    vocab_size: int,
    estimator: str = "jelinek_mercer",
    *,
    add_k: float = DEFAULT_ADD_K,
    discount: float = DEFAULT_DISCOUNT,
    progress: ProgressFn | None = None,
) -> tuple[NgramTables, NgramCounts]:
    """Count ``documents`` and build the tables of ``estimator``."""
    t0 = time.perf_counter()
    counts = count_ngrams(documents, vocab_size, progress)
    if estimator == "jelinek_mercer":
        tables = jelinek_mercer_tables(counts, add_k)
    elif estimator == "kneser_ney":
        tables = kneser_ney_tables(counts, discount)
    else:
        raise ValueError(f"unknown estimator {estimator!r} (known: {', '.join(ESTIMATORS)})")
    if progress is not None:
        progress(
            f"built {estimator} tables in {time.perf_counter() - t0:.2f} s: "
            f"{tables.bi.contexts:,} bigram / {tables.tri.contexts:,} trigram contexts"
        )
    return tables, counts


# ------------------------------------------------------------------ serialization
_ORDER_FIELDS = ("keys", "offsets", "next_ids", "values", "gamma")


def tables_to_arrays(tables: NgramTables) -> dict[str, np.ndarray]:
    """Flat name → array mapping (for safetensors); the estimator goes in metadata."""
    out: dict[str, np.ndarray] = {"unigram": np.ascontiguousarray(tables.unigram)}
    for prefix, order in (("bi", tables.bi), ("tri", tables.tri)):
        for name in _ORDER_FIELDS:
            out[f"{prefix}_{name}"] = np.ascontiguousarray(getattr(order, name))
    return out


def tables_from_arrays(
    arrays: dict[str, np.ndarray], estimator: str, vocab_size: int
) -> NgramTables:
    """Inverse of :func:`tables_to_arrays`; raises ValueError on any inconsistency.

    The checks are what keeps a damaged-but-checksummed or hand-edited file from
    producing out-of-range gathers on the device later.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}")
    _check_vocab(vocab_size)
    V = vocab_size

    def get(name: str, dtype: type) -> np.ndarray:
        if name not in arrays:
            raise ValueError(f"missing array '{name}'")
        a = np.asarray(arrays[name])
        if a.ndim != 1 or a.dtype != dtype:
            raise ValueError(f"array '{name}' must be 1-d {np.dtype(dtype)}, got {a.dtype}")
        return a

    unigram = get("unigram", np.float64)
    if (
        unigram.shape[0] != V
        or not np.all(np.isfinite(unigram))
        or not np.all(unigram > 0)
        or abs(float(unigram.sum()) - 1.0) > 1e-6
    ):
        raise ValueError("'unigram' must be a positive distribution over the vocabulary")
    orders = []
    for prefix, ctx_limit in (("bi", V), ("tri", V * V)):
        keys = get(f"{prefix}_keys", np.int64)
        offsets = get(f"{prefix}_offsets", np.int64)
        nxt = get(f"{prefix}_next_ids", np.int64)
        values = get(f"{prefix}_values", np.float64)
        gamma = get(f"{prefix}_gamma", np.float64)
        C, E = keys.shape[0], nxt.shape[0]
        if offsets.shape[0] != C + 1 or gamma.shape[0] != C or values.shape[0] != E:
            raise ValueError(f"'{prefix}' arrays have inconsistent lengths")
        if offsets[0] != 0 or offsets[-1] != E or (C and np.any(np.diff(offsets) <= 0)):
            raise ValueError(f"'{prefix}_offsets' is not a valid partition")
        if C and (np.any(np.diff(keys) <= 0) or keys[0] < 0 or keys[-1] >= ctx_limit):
            raise ValueError(f"'{prefix}_keys' must be sorted, unique and in range")
        if E and (nxt.min() < 0 or nxt.max() >= V):
            raise ValueError(f"'{prefix}_next_ids' out of range")
        if not (np.all(np.isfinite(values)) and np.all(values >= 0)):
            raise ValueError(f"'{prefix}_values' must be finite and non-negative")
        orders.append(OrderTable(keys, offsets, nxt, values, gamma))
    return NgramTables(estimator, V, unigram, orders[0], orders[1])
