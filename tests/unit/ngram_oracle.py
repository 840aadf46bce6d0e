"""An independent float64 reading of a prior's tables: ``log p(w | context)``.

Written from the formula in ``processors.ngram_tables``' docstring,
``p(w | u, v) = c1·p1(w) + c2·a2(v, w) + c3·a3(uv, w)``, with plain Python loops over the
stored arrays (a dict per context, no torch, no code shared with the device path), so
tests can check the served float32 values against it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from processors.ngram_tables import NgramTables, OrderTable


def _slice(order: OrderTable, key: int) -> tuple[dict[int, float], float] | None:
    """``({w: a(ctx, w)}, γ(ctx))`` of context ``key``, or None when it was not seen."""
    for i, k in enumerate(order.keys.tolist()):
        if k == key:
            lo, hi = int(order.offsets[i]), int(order.offsets[i + 1])
            ids = order.next_ids[lo:hi].tolist()
            vals = order.values[lo:hi].tolist()
            return dict(zip(ids, vals, strict=True)), float(order.gamma[i])
    return None


def table_logp(
    tables: NgramTables, context: Sequence[int], weights: Sequence[float] | None = None
) -> np.ndarray:
    """``(V,)`` float64 ``log p(· | context)``; ``context`` = the last 0–2 tokens.

    Jelinek–Mercer: ``c_n = w_n·[n matched] / Σ_matched w_m`` (order 1 always matches).
    Kneser–Ney: ``c3 = [uv seen]``, ``c2 = γ(uv)`` or 1, ``c1 = c2·(γ(v) or 1)``.
    """
    V = tables.vocab_size
    ctx = [int(t) for t in context][-2:]
    v = ctx[-1] if ctx and 0 <= ctx[-1] < V else None
    u = ctx[0] if len(ctx) == 2 and 0 <= ctx[0] < V else None
    bi = _slice(tables.bi, v) if v is not None else None
    tri = _slice(tables.tri, u * V + v) if u is not None and v is not None else None
    if tables.estimator == "jelinek_mercer":
        w1, w2, w3 = weights if weights is not None else (0.1, 0.3, 0.6)
        m = [1.0, 1.0 if bi else 0.0, 1.0 if tri else 0.0]
        total = w1 * m[0] + w2 * m[1] + w3 * m[2]
        c1, c2, c3 = w1 / total, w2 * m[1] / total, w3 * m[2] / total
    else:
        c3 = 1.0 if tri else 0.0
        c2 = tri[1] if tri else 1.0
        c1 = c2 * (bi[1] if bi else 1.0)
    out = np.empty(V)
    for w in range(V):
        p = c1 * float(tables.unigram[w])
        if bi:
            p += c2 * bi[0].get(w, 0.0)
        if tri:
            p += c3 * tri[0].get(w, 0.0)
        out[w] = math.log(p) if p > 0 else -math.inf
    return out
