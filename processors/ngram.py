"""n-gram style prior injection: ``logits += λ · s(log p_style(· | last two tokens))``.

After "Limits of n-gram Style Control for LLMs via Logit-Space Injection". A *prior*
(:class:`NgramPrior`) is a 1-to-3-gram model over the serving model's token ids, trained
on a style corpus (``processors.ngram_tables`` holds the counting and the estimators).
The processor looks the current context up for the whole batch on the device:

* the unigram is a dense ``(P, V)`` tensor (one row per prior used by the batch);
* orders 2 and 3 are sorted int64 context-key arrays with contiguous slices of
  (next-token id, value) and one backoff weight per context. ``torch.searchsorted``
  finds every row's context at once; each row's slice is gathered as a ``(B, L)`` block
  (``L`` = the longest slice of the table, ``≤ V``) and scattered into a ``(B, V)``
  probability buffer. Cost per step: O(B·V + B·L), independent of corpus size, with
  no host sync.

Request parameters (``steering[]`` entry):

* ``prior`` — the artifact's name (unknown → 404; built for another tokenizer → 400);
* ``lambda`` — strength in ``[0, 1]`` (default 0.1). Values above 1 (up to
  :data:`MAX_LAMBDA`) are accepted only with ``"allow_lambda_above_one": true`` in the
  same entry. ``lambda = 0`` leaves the row's logits bit-identical;
* ``weights`` — ``[w1, w2, w3]`` for ``jelinek_mercer`` priors (default: the prior's
  build-time weights). Non-negative with ``w1 > 0``: the unigram term is what gives
  every token a non-zero probability. They are renormalized over the orders whose
  context was seen. Kneser–Ney priors take no weights;
* ``scale`` — ``"raw"`` (``s`` = identity) or ``"zscore"``: the prior's log-probs are
  standardized over the vocabulary per row, so λ means the same across corpora.

Token ids the model can emit but the prior does not know (a model vocabulary padded past
the tokenizer's size) get the row's *least* likely prior value: they are never favoured.

Diagnostics: when the batch wants them, the processor registers a ``(B, V)`` table of
``−log p_style`` as ``ctx.stats["style_nll"]``; the engine reads it at the sampled tokens
after sampling (``StepContext.row_stats``) (NaN for rows without a prior), which the summary
turns into ``style_ppl``. With several ngram entries in one row, the last one reports.

Example:
    >>> import torch
    >>> from processors.base import ProcessorEnv, StepContext
    >>> prior = NgramPrior.build("demo", [[0, 1, 2, 0, 1, 3]], vocab_size=4)
    >>> env = ProcessorEnv(vocab_size=4, priors={"demo": prior})
    >>> spec = NgramProcessor.validate({"prior": "demo", "lambda": 1.0}, env)
    >>> p = NgramProcessor(torch.device("cpu"), 4)
    >>> p.update_state([spec, None])
    >>> x = torch.zeros(2, 4)
    >>> out = p.apply(StepContext(base_logits=x, last_tokens=torch.tensor([[0, 1]] * 2)), x)
    >>> bool(out[0].argmax() in (2, 3)), bool(torch.equal(out[1], x[1]))
    (True, True)
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from processors.base import (
    ParamError,
    Processor,
    ProcessorEnv,
    RowSlots,
    StepContext,
    check_keys,
    check_number,
    get_bool,
    get_choice,
    get_number,
)
from processors.ngram_tables import (
    DEFAULT_ADD_K,
    DEFAULT_DISCOUNT,
    DEFAULT_WEIGHTS,
    ESTIMATORS,
    NgramTables,
    OrderTable,
    ProgressFn,
    build_tables,
    tables_from_arrays,
    tables_to_arrays,
)
from processors.stack import register

MAX_LAMBDA = 100.0
ARTIFACT_FORMAT = 1
Scale = Literal["raw", "zscore"]
_SENTINEL_KEY = torch.iinfo(torch.int64).max


def check_weights(value: Any, param: str = "weights") -> tuple[float, float, float]:
    """Validate ``[w1, w2, w3]``: finite, non-negative, ``w1 > 0``."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ParamError(
            param, f"`{param}` must be a list of 3 numbers [w1, w2, w3], got {value!r:.60}"
        )
    out = [check_number(w, f"{param}.{i}", lo=0.0) for i, w in enumerate(value)]
    if out[0] <= 0:
        raise ParamError(
            f"{param}.0",
            f"`{param}.0` (the unigram weight) must be > 0 so that every token keeps a "
            f"non-zero probability, got {out[0]:g}",
        )
    return out[0], out[1], out[2]


# ------------------------------------------------------------------ device tables
@dataclass(frozen=True)
class DeviceOrder:
    """One order's table on the device, with a sentinel context and a sentinel entry.

    ``keys (C+1,)`` ends with ``INT64_MAX`` so ``searchsorted`` always lands on a valid
    index; ``offsets (C+2,)`` gives the sentinel an empty slice; ``next_ids``/``values``
    ``(E+1,)`` end with an entry (id 0, value 0) that padded gathers point at, so
    scattering it adds exactly zero. ``max_len`` is the longest slice ``L``.
    ``log_gamma (C+1,)`` is ``log γ`` taken in float64 on the host (``-inf`` where γ = 0),
    so a γ too small for float32 (a Kneser–Ney discount of 1e-20) stays finite.
    """

    keys: torch.Tensor
    offsets: torch.Tensor
    next_ids: torch.Tensor
    values: torch.Tensor
    log_gamma: torch.Tensor
    max_len: int

    @property
    def sentinel_entry(self) -> int:
        """Index of the zero entry."""
        return int(self.next_ids.shape[0]) - 1


@dataclass(frozen=True)
class DeviceTables:
    """The tables of ``P`` priors (sharing one vocabulary) stacked for one batch.

    Context keys of prior ``p`` are offset by ``p·V`` (order 2) or ``p·V²`` (order 3),
    so the concatenation stays sorted. ``unigram`` is ``(P, V)``; ``log_unigram`` its
    log taken in float64 on the host (finite: the unigram is strictly positive).
    """

    vocab_size: int
    unigram: torch.Tensor
    log_unigram: torch.Tensor
    bi: DeviceOrder
    tri: DeviceOrder


@dataclass(frozen=True)
class _PriorOrder:
    """One prior's order-2 or order-3 table on the device, uploaded once (no offsets)."""

    keys: torch.Tensor  # (C,) int64 context keys
    offsets: torch.Tensor  # (C,) int64 slice starts
    next_ids: torch.Tensor  # (E,) int64
    values: torch.Tensor  # (E,)
    log_gamma: torch.Tensor  # (C,)
    entries: int
    max_len: int


def _prior_order(t: OrderTable, device: torch.device, dtype: torch.dtype) -> _PriorOrder:
    def put(a: np.ndarray, dt: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dt)

    return _PriorOrder(
        keys=put(t.keys, torch.int64),
        offsets=put(t.offsets[:-1], torch.int64),
        next_ids=put(t.next_ids, torch.int64),
        values=put(t.values, dtype),
        log_gamma=put(_log64(t.gamma), dtype),
        entries=int(t.entries),
        max_len=int(t.max_len),
    )


def _device_order(
    tables: Sequence[_PriorOrder], key_stride: int, device: torch.device, dtype: torch.dtype
) -> DeviceOrder:
    """Stack the priors' device tables on the device (no host upload): prior ``p``'s
    keys are offset by ``p·key_stride`` and its slice starts by the entries before it,
    then the sentinel key, the end offset pair and the zero entry close the tables."""
    keys, offsets, nxt, vals, lgam = [], [], [], [], []
    base = 0
    for p, t in enumerate(tables):
        keys.append(t.keys + p * key_stride if p else t.keys)
        offsets.append(t.offsets + base if base else t.offsets)
        nxt.append(t.next_ids)
        vals.append(t.values)
        lgam.append(t.log_gamma)
        base += t.entries
    keys.append(torch.full((1,), _SENTINEL_KEY, dtype=torch.int64, device=device))
    offsets.append(torch.full((2,), base, dtype=torch.int64, device=device))
    nxt.append(torch.zeros(1, dtype=torch.int64, device=device))
    vals.append(torch.zeros(1, dtype=dtype, device=device))
    lgam.append(torch.full((1,), -math.inf, dtype=dtype, device=device))  # log γ = log 0
    return DeviceOrder(
        keys=torch.cat(keys),
        offsets=torch.cat(offsets),
        next_ids=torch.cat(nxt),
        values=torch.cat(vals),
        log_gamma=torch.cat(lgam),
        max_len=max((t.max_len for t in tables), default=0),
    )


def _log64(x: np.ndarray) -> np.ndarray:
    """``log x`` in float64 with ``log 0 = -inf`` (no warning)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(x, dtype=np.float64))


def log_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    """``log w`` of Jelinek–Mercer weights in float64 (``-inf`` for a zero weight)."""
    a, b, c = (math.log(w) if w > 0 else -math.inf for w in weights)
    return a, b, c


@dataclass(frozen=True)
class _PriorTables:
    """One prior's tables on one device, uploaded once (see :func:`device_tables`)."""

    unigram: torch.Tensor  # (V,)
    log_unigram: torch.Tensor  # (V,)
    bi: _PriorOrder
    tri: _PriorOrder


_COMBINED: OrderedDict[tuple[Any, ...], DeviceTables] = OrderedDict()
_PER_PRIOR: OrderedDict[tuple[Any, ...], _PriorTables] = OrderedDict()
_COMBINED_LOCK = threading.Lock()
_COMBINED_MAX = 8
_PER_PRIOR_MAX = 16


def _prior_tables(prior: NgramPrior, device: torch.device, dtype: torch.dtype) -> _PriorTables:
    """``prior``'s device tables: the one host→device upload of that prior (LRU of 16)."""
    key = (prior.uid, str(device), dtype)
    with _COMBINED_LOCK:
        hit = _PER_PRIOR.get(key)
        if hit is not None:
            _PER_PRIOR.move_to_end(key)
            return hit
    t = prior.tables
    built = _PriorTables(
        unigram=torch.from_numpy(np.ascontiguousarray(t.unigram)).to(device, dtype),
        log_unigram=torch.from_numpy(_log64(t.unigram)).to(device, dtype),
        bi=_prior_order(t.bi, device, dtype),
        tri=_prior_order(t.tri, device, dtype),
    )
    with _COMBINED_LOCK:
        _PER_PRIOR[key] = built
        while len(_PER_PRIOR) > _PER_PRIOR_MAX:
            _PER_PRIOR.popitem(last=False)
    return built


def device_tables(
    priors: Sequence[NgramPrior], device: torch.device, dtype: torch.dtype = torch.float32
) -> DeviceTables:
    """Stacked device tables of ``priors`` (cached per combination, LRU of 8).

    Each prior is uploaded once (:func:`_prior_tables`); a new combination of priors in
    the batch is stacked from those on the device, with no host→device copy.
    """
    key = (tuple(p.uid for p in priors), str(device), dtype)
    with _COMBINED_LOCK:
        hit = _COMBINED.get(key)
        if hit is not None:
            _COMBINED.move_to_end(key)
            return hit
    V = priors[0].vocab_size
    if any(p.vocab_size != V for p in priors):
        raise ValueError("priors stacked in one batch must share one vocabulary")
    tabs = [_prior_tables(p, device, dtype) for p in priors]
    built = DeviceTables(
        vocab_size=V,
        unigram=torch.stack([t.unigram for t in tabs]),
        log_unigram=torch.stack([t.log_unigram for t in tabs]),
        bi=_device_order([t.bi for t in tabs], V, device, dtype),
        tri=_device_order([t.tri for t in tabs], V * V, device, dtype),
    )
    with _COMBINED_LOCK:
        _COMBINED[key] = built
        while len(_COMBINED) > _COMBINED_MAX:
            _COMBINED.popitem(last=False)
    return built


def _find(order: DeviceOrder, key: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Locate ``key (B,)`` in ``order``; returns (found, start, length, log γ), all (B,)."""
    idx = torch.searchsorted(order.keys, key.contiguous())  # (B,) in [0, C]
    # index_select, not t[idx]: advanced indexing costs several times more per call.
    found = ok & (order.keys.index_select(0, idx) == key)
    bounds = order.offsets.index_select(0, torch.stack([idx, idx + 1]).view(-1)).view(2, -1)
    start = bounds[0]
    length = torch.where(found, bounds[1] - start, 0)
    return found, start, length, order.log_gamma.index_select(0, idx)


def _slice_entries(
    order: DeviceOrder, start: torch.Tensor, length: torch.Tensor, coef: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row b's slice of ``order`` as ``(ids, values · coef[b])``, both ``(B, L)``.

    The slice is gathered as a fixed ``(B, L)`` block whose tail points at the zero
    sentinel entry (id 0, value 0), so there is no data-dependent shape and no host
    sync. None when the table has no entries.
    """
    L = order.max_len
    if L == 0:
        return None
    j = torch.arange(L, device=start.device)  # (L,)
    pos = start.unsqueeze(1) + j  # (B, L)
    pos = torch.where(j < length.unsqueeze(1), pos, order.sentinel_entry).view(-1)
    ids = order.next_ids.index_select(0, pos).view(start.shape[0], L)
    vals = order.values.index_select(0, pos).view(start.shape[0], L)
    return ids, vals * coef.unsqueeze(1)


def _coefficients(
    found2: torch.Tensor, found3: torch.Tensor, lg2: torch.Tensor, lg3: torch.Tensor,
    log_w: torch.Tensor, is_kn: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log c1 (B, 1), log c_max (B, 1), c / c_max (B, 3))`` of every row on the device
    (:func:`style_logprobs` explains them)."""
    zero = torch.zeros_like(lg2)
    ninf = torch.full_like(lg2, -math.inf)
    # Jelinek–Mercer: log c_n = log w_n − log Σ_{matched m} w_m (w1 > 0: always finite).
    matched = torch.stack([torch.ones_like(found2), found2, found3], dim=1)  # (B, 3)
    lw = torch.where(matched, log_w, torch.full_like(log_w, -math.inf))
    jm = lw - torch.logsumexp(lw, dim=1, keepdim=True)
    # Kneser–Ney: p = [m3](a3 + g3·q2) + [¬m3] q2, q2 = [m2](a2 + g2·p1) + [¬m2] p1.
    kn2 = torch.where(found3, lg3, zero)
    kn1 = kn2 + torch.where(found2, lg2, zero)
    kn = torch.stack([kn1, kn2, torch.where(found3, zero, ninf)], dim=1)
    log_c = torch.where(is_kn.unsqueeze(1), kn, jm)  # (B, 3); column 0 finite
    top = log_c.amax(dim=1, keepdim=True)  # (B, 1)
    coef = (log_c - top).exp()  # (B, 3) in [0, 1], the largest exactly 1
    return log_c[:, :1], top, coef


def jm_coefficients(weights: Sequence[float]) -> list[float]:
    """A Jelinek–Mercer row's ``[log c1, log c_max, c1, c2, c3]`` (scaled by ``c_max``)
    for the match patterns ``found2 + 2·found3 = 0..3``, flattened (20 floats), computed
    in float64 on the host: ``log c_n = log w_n − log Σ_{matched m} w_m``."""
    lw = log_weights(weights)
    out: list[float] = []
    for pattern in range(4):
        matched = (True, bool(pattern & 1), bool(pattern & 2))
        logs = [x if m else -math.inf for x, m in zip(lw, matched, strict=True)]
        finite = [x for x in logs if x > -math.inf]
        hi = max(finite)
        lse = hi + math.log(sum(math.exp(x - hi) for x in finite))
        log_c = [x - lse if x > -math.inf else -math.inf for x in logs]
        top = max(log_c)
        out += [log_c[0], top, *(math.exp(x - top) if x > -math.inf else 0.0 for x in log_c)]
    return out


def style_logprobs(
    tables: DeviceTables,
    last_tokens: torch.Tensor,
    prior_idx: torch.Tensor,
    log_w: torch.Tensor,
    is_kn: torch.Tensor,
    jm: torch.Tensor | None = None,
    any_kn: bool = True,
) -> torch.Tensor:
    """``log p_style(· | context)`` for every row: ``(B, V_prior)``, finite everywhere.

    Args:
        tables: stacked tables of the batch's priors.
        last_tokens: ``(B, 2)`` int64, oldest first; ``-1`` (or any id outside the
            prior's vocabulary) means "no token": that order then does not match.
        prior_idx: ``(B,)`` int64 which prior of ``tables`` each row uses.
        log_w: ``(B, 3)`` log Jelinek–Mercer weights (:func:`log_weights`; ignored for
            Kneser–Ney rows).
        is_kn: ``(B,)`` bool, rows whose prior is Kneser–Ney.
        jm: optional ``(B, 4, 5)``: each Jelinek–Mercer row's
            ``[log c1, log c_max, c1, c2, c3]`` (below) for the four match patterns
            ``found2 + 2·found3``, from :func:`jm_coefficients` (host float64; anything
            for Kneser–Ney rows). Those rows then look their coefficients up instead of
            computing them (~20 small ops), whatever else the batch holds, so a row's
            values never depend on the other rows. Without it (the float64 host
            reference) every row's coefficients are computed on the device.
        any_kn: whether some row is Kneser–Ney (host flag; with ``jm``, False skips
            the device computation of Kneser–Ney coefficients).

    Numerics. ``p(w) = c1·p1(w) + c2·a2(w) + c3·a3(w)`` in the served float32 would
    underflow when a coefficient or ``p1`` is tiny (weights ``[1e-50, 1, 1]``, add-k
    ``1e-50``, a Kneser–Ney discount ``1e-20``): tokens then got ``-inf`` and z-scores
    NaN. So the coefficients are built in log space (``log c`` from host-side float64
    logs), the mixture is summed with its coefficients scaled by their row maximum
    (the largest becomes 1, so the leading terms cannot underflow) and the result is
    ``max(log(mixture) + log c_max, log c1 + log p1(w))``, where a scaled sum below
    float32's smallest normal number counts as 0 (subnormals have lost their
    precision). The second term is the dense unigram part in log space: a lower bound
    of ``log p(w)`` that is always finite, and the whole value wherever the scaled sum
    underflowed. Where nothing underflows the first term is the float32 mixture itself.
    What can still be lost is a sparse term more than ~1e38 times smaller than the
    row's largest term yet larger than its dense term: then the result is the dense
    lower bound (finite, never favouring the token).

    Cost. Only the tokens of the row's bigram and trigram slices (``(B, L2 + L3)``,
    ``L`` the longest slice of each table) get a mixture; every other token's mixture is
    ``c1·p1(w)``, whose value is the dense term itself, so it is computed as one
    ``(B, V)`` add of the precomputed ``log p1`` row and ``log c1``: no full-vocabulary
    ``log``, compare or mask (issue 13's steering overhead on the fast path).
    """
    V = tables.vocab_size
    u, v = last_tokens[:, 0], last_tokens[:, 1]
    ok2 = (v >= 0) & (v < V)
    ok3 = ok2 & (u >= 0) & (u < V)
    vv, uu = v.clamp(0, V - 1), u.clamp(0, V - 1)
    found2, start2, len2, lg2 = _find(tables.bi, prior_idx * V + vv, ok2)
    found3, start3, len3, lg3 = _find(tables.tri, (prior_idx * V + uu) * V + vv, ok3)
    if jm is None:
        log_c1, top, coef = _coefficients(found2, found3, lg2, lg3, log_w, is_kn)
    else:
        combo = (found2.long() + 2 * found3.long()).view(-1, 1, 1).expand(-1, 1, 5)
        row = jm.gather(1, combo).squeeze(1)  # (B, 5)
        log_c1, top, coef = row[:, 0:1], row[:, 1:2], row[:, 2:5]
        if any_kn:  # Kneser–Ney rows: computed; the others keep their looked-up ones
            kn_c1, kn_top, kn_coef = _coefficients(found2, found3, lg2, lg3, log_w, is_kn)
            kn = is_kn.view(-1, 1)
            log_c1 = torch.where(kn, kn_c1, log_c1)
            top = torch.where(kn, kn_top, top)
            coef = torch.where(kn, kn_coef, coef)
    B = last_tokens.shape[0]
    # The dense part, log c1 + log p1(w): the whole value of every token no bigram or
    # trigram entry of the row adds mass to, i.e. of all but the (B, L2+L3) touched
    # ones. One (B, V) pass (a broadcast when the batch uses one prior).
    if tables.log_unigram.shape[0] == 1:
        out = tables.log_unigram + log_c1  # (B, V)
    else:
        out = tables.log_unigram.index_select(0, prior_idx).add_(log_c1)
    parts = [
        e for e in (_slice_entries(tables.bi, start2, len2, coef[:, 1]),
                    _slice_entries(tables.tri, start3, len3, coef[:, 2]))
        if e is not None
    ]
    if not parts:
        return out
    ids = torch.cat([p[0] for p in parts], dim=1)  # (B, L) touched token ids
    vals = torch.cat([p[1] for p in parts], dim=1)  # (B, L) their scaled masses
    # Sum the sparse masses per token (an id may be in both slices), then read the sums
    # back at the touched ids: the mixture there is c1·p1 + that sum (scaled by c_max).
    extra = torch.zeros(B, V, dtype=vals.dtype, device=vals.device)
    s_at = extra.scatter_add_(1, ids, vals).gather(1, ids)  # (B, L)
    at = ((prior_idx * V).unsqueeze(1) + ids).view(-1)  # (B·L,) flat unigram positions
    u_at = tables.unigram.view(-1).index_select(0, at).view_as(ids)  # (B, L) p1 there
    mix = u_at * coef[:, :1] + s_at
    # A subnormal sum has lost its precision (and 0 has no log): use the dense bound there.
    mixed = mix.log().masked_fill_(mix < torch.finfo(mix.dtype).tiny, -math.inf)
    dense_at = out.gather(1, ids)
    # Where no mass was added (s_at = 0: the sentinel's padding, which points at token 0,
    # or a zero coefficient) the value is the dense one, exactly as for untouched tokens,
    # so duplicate writes of one id agree and the padding changes nothing.
    val = torch.where(s_at > 0, torch.maximum(mixed + top, dense_at), dense_at)
    return out.scatter_(1, ids, val)


# ------------------------------------------------------------------ the artifact
@dataclass(eq=False)
class NgramPrior:
    """A trained style prior: tables plus what it was built from and for.

    Attributes:
        name: artifact name.
        tables: the estimator's numbers (host, float64).
        tokenizer_fingerprint: the tokenizer whose ids the prior counts.
        default_weights: Jelinek–Mercer weights used when a request gives none.
        info: descriptive metadata (corpus, counts, build parameters, timing) as shown by
            ``GET /v1/priors/{name}``.
        uid: unique per loaded object (keys the device-table cache).
    """

    name: str
    tables: NgramTables
    tokenizer_fingerprint: str = ""
    default_weights: tuple[float, float, float] = DEFAULT_WEIGHTS
    info: dict[str, Any] = field(default_factory=dict)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def estimator(self) -> str:
        """``jelinek_mercer`` or ``kneser_ney``."""
        return self.tables.estimator

    @property
    def vocab_size(self) -> int:
        """The prior's vocabulary size ``V``."""
        return self.tables.vocab_size

    @classmethod
    def build(
        cls,
        name: str,
        documents: Iterable[Sequence[int] | np.ndarray],
        vocab_size: int,
        *,
        estimator: str = "jelinek_mercer",
        weights: tuple[float, float, float] = DEFAULT_WEIGHTS,
        add_k: float = DEFAULT_ADD_K,
        discount: float = DEFAULT_DISCOUNT,
        tokenizer_fingerprint: str = "",
        info: Mapping[str, Any] | None = None,
        progress: ProgressFn | None = None,
    ) -> NgramPrior:
        """Count tokenized ``documents`` and build a prior (see ``build_tables``)."""
        t0 = time.perf_counter()
        tables, counts = build_tables(
            documents, vocab_size, estimator, add_k=add_k, discount=discount, progress=progress
        )
        params: dict[str, Any] = (
            {"weights": list(weights), "add_k": add_k}
            if estimator == "jelinek_mercer"
            else {"discount": discount}
        )
        meta: dict[str, Any] = dict(info or {})
        meta.update(
            estimator=estimator,
            orders=[1, 2, 3],
            vocab_size=vocab_size,
            params=params,
            counts={
                "tokens": counts.tokens,
                "documents": counts.documents,
                "unigrams": int((counts.unigram > 0).sum()),
                "bigrams": int(counts.bi_keys.size),
                "trigrams": int(counts.tri_keys.size),
                "bigram_contexts": tables.bi.contexts,
                "trigram_contexts": tables.tri.contexts,
                "max_continuations": [tables.bi.max_len, tables.tri.max_len],
            },
            build_seconds=round(time.perf_counter() - t0, 4),
        )
        w1, w2, w3 = weights  # a tuple copy even if a caller passed a list
        return cls(name, tables, tokenizer_fingerprint, (w1, w2, w3), meta)

    # ---- persistence (server.artifacts stores the arrays and this metadata)
    def to_artifact(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays (float64/int64, no pickle) and JSON-able metadata."""
        meta = {
            "format": ARTIFACT_FORMAT,
            "estimator": self.estimator,
            "vocab_size": self.vocab_size,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "default_weights": list(self.default_weights),
            "info": self.info,
        }
        return tables_to_arrays(self.tables), meta

    @classmethod
    def from_artifact(
        cls, name: str, arrays: dict[str, np.ndarray], meta: Mapping[str, Any]
    ) -> NgramPrior:
        """Rebuild a stored prior; raises ValueError if anything is inconsistent."""
        if meta.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"unsupported prior format {meta.get('format')!r}")
        estimator = meta.get("estimator")
        vocab = meta.get("vocab_size")
        if not isinstance(estimator, str) or not isinstance(vocab, int):
            raise ValueError("metadata lacks 'estimator'/'vocab_size'")
        tables = tables_from_arrays(arrays, estimator, vocab)
        weights = check_weights(meta.get("default_weights", list(DEFAULT_WEIGHTS)))
        info = meta.get("info", {})
        return cls(
            name,
            tables,
            str(meta.get("tokenizer_fingerprint", "")),
            weights,
            dict(info) if isinstance(info, Mapping) else {},
        )

    # ---- host reference
    def logprobs(
        self,
        context: Sequence[int],
        weights: Sequence[float] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> np.ndarray:
        """``log p(· | context)`` as ``(V,)`` numpy, via the same code as the device path.

        ``context`` holds the last 0, 1 or 2 tokens (oldest first).
        """
        ctx = [-1, -1, *[int(t) for t in context]][-2:]
        tables = device_tables([self], torch.device("cpu"), dtype)
        w = torch.tensor([log_weights(weights or self.default_weights)], dtype=dtype)
        out = style_logprobs(
            tables,
            torch.tensor([ctx], dtype=torch.long),
            torch.zeros(1, dtype=torch.long),
            w,
            torch.tensor([self.estimator == "kneser_ney"]),
        )
        return out[0].numpy()


# ------------------------------------------------------------------ the processor
@dataclass(frozen=True)
class NgramSpec:
    """One request's validated ngram entry."""

    prior: NgramPrior
    lam: float
    weights: tuple[float, float, float]
    scale: Scale


def add_token_stat(ctx: StepContext, name: str, table: torch.Tensor, rows: torch.Tensor) -> None:
    """Set stat ``name`` to ``table (B, V)``, read at the sampled tokens by the engine.

    Rows where ``rows (B, 1)`` is false become NaN ("undefined"); a table already
    registered under ``name`` by an earlier processor keeps those rows.
    """
    prev = ctx.stats.get(name)
    fallback = prev if prev is not None else torch.full_like(table, math.nan)
    ctx.stats[name] = torch.where(rows, table, fallback)


def _pad_columns(
    x: torch.Tensor, V: int, fill: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Fit ``x (B, Vp)`` to the model's ``V`` columns: cut, or pad with ``fill(x) (B, 1)``
    (computed only when padding is needed: it is a reduction over the vocabulary)."""
    Vp = x.shape[1]
    if Vp == V:
        return x
    if Vp > V:
        return x[:, :V]
    return torch.cat([x, fill(x).expand(-1, V - Vp)], dim=1)


class NgramProcessor(Processor[NgramSpec]):
    """Add ``λ · s(log p_style(· | last two tokens))`` to each steered row's logits.

    See the module docstring for the parameters and a runnable example.
    """

    type_name = "ngram"

    @classmethod
    def validate(cls, params: Mapping[str, Any], env: ProcessorEnv) -> NgramSpec:
        check_keys(params, {"prior", "lambda", "weights", "scale", "allow_lambda_above_one"})
        name = params.get("prior")
        if not isinstance(name, str) or not name:
            raise ParamError("prior", f"'prior' must be the name of a prior, got {name!r}")
        prior = env.priors.get(name)
        if not isinstance(prior, NgramPrior):
            raise ParamError("prior", f"unknown prior '{name}'", status=404)
        if prior.tokenizer_fingerprint != env.tokenizer_fingerprint:
            raise ParamError(
                "prior",
                f"prior '{name}' was built with another tokenizer (fingerprint "
                f"{prior.tokenizer_fingerprint[:12] or '?'}) than the serving model's "
                f"({env.tokenizer_fingerprint[:12] or '?'}); rebuild it for this model",
            )
        allow = get_bool(params, "allow_lambda_above_one", False)
        lam = get_number(
            params,
            "lambda",
            0.1,
            lo=0.0,
            hi=MAX_LAMBDA if allow else 1.0,
            hint="" if allow else '(set "allow_lambda_above_one": true to go above 1)',
        )
        raw_weights = params.get("weights")
        if raw_weights is None:
            weights = prior.default_weights
        elif prior.estimator != "jelinek_mercer":
            raise ParamError(
                "weights",
                f"'weights' apply to jelinek_mercer priors only; prior '{name}' uses "
                f"{prior.estimator}",
            )
        else:
            weights = check_weights(raw_weights)
        scale: Scale = get_choice(params, "scale", "raw", ("raw", "zscore"))
        return NgramSpec(prior, lam, weights, scale)

    def update_state(self, specs: Sequence[NgramSpec | None]) -> None:
        self.slots = RowSlots([s is not None for s in specs], self.device)
        mine = [s for s in specs if s is not None]  # the compact rows, in batch order
        self._active = bool(mine)
        self._mine = mine
        self._flags()
        if not mine:
            return
        uids: dict[str, NgramPrior] = {s.prior.uid: s.prior for s in mine}
        # Stack the priors in a canonical order so the device-table cache hits whatever
        # the row order of the batch.
        priors = [uids[u] for u in sorted(uids)]
        rank = {p.uid: i for i, p in enumerate(priors)}
        self.tables = device_tables(priors, self.device, torch.float32)
        # One upload of the compact rows' parameters, (k, 28) float64: prior index, λ,
        # log w1..w3 (taken in float64 on the host: a weight like 1e-50 is 0 in float32,
        # its log isn't), Kneser–Ney, z-score, steers (λ ≠ 0), then the Jelinek–Mercer
        # coefficients per match pattern (jm_coefficients; zeros for Kneser–Ney rows).
        # float64 holds them exactly.
        table = torch.tensor(
            [[float(rank[s.prior.uid]), s.lam, *log_weights(s.weights),
              float(s.prior.estimator == "kneser_ney"), float(s.scale == "zscore"),
              float(s.lam != 0.0),
              *(jm_coefficients(s.weights) if s.prior.estimator != "kneser_ney"
                else [0.0] * 20)] for s in mine],
            dtype=torch.float64,
        ).to(self.device)
        self._split(table)

    def _split(self, table: torch.Tensor) -> None:
        """The per-row tensors of the compact rows from their ``(k, 28)`` table."""
        self._table = table
        self.prior_idx = table[:, 0].long()  # (k,)
        f32 = table[:, 1:5].float()
        self.lam = f32[:, 0:1]  # (k, 1)
        self.log_w = f32[:, 1:4]  # (k, 3)
        self.is_kn = table[:, 5] > 0.5  # (k,)
        self.zscore = table[:, 6:7] > 0.5  # (k, 1)
        self.steer = table[:, 7:8] > 0.5  # (k, 1)
        # Jelinek–Mercer rows look their coefficients up (Kneser–Ney rows compute theirs).
        self.any_kn = any(s.prior.estimator == "kneser_ney" for s in self._mine)
        self.jm = table[:, 8:28].float().view(-1, 4, 5)  # (k, 4, 5)

    def _flags(self) -> None:
        """Host flags of the compact rows (``self._mine``)."""
        steer = [s.lam != 0.0 for s in self._mine]
        self._any_steer = any(steer)
        self._all_steer = all(steer)
        self._any_zscore = any(s.scale == "zscore" and s.lam != 0.0 for s in self._mine)
        self._all_zscore = all(s.scale == "zscore" for s in self._mine)

    def select(self, keep: Sequence[int], index: torch.Tensor) -> bool:
        """Rows left: the compact rows' table follows the kept rows on the device (no
        upload); the stacked prior tables stay (they may hold a prior no row uses now)."""
        rows = [b for b, u in enumerate(self.slots.used) if u]
        by_row = dict(zip(rows, self._mine, strict=True))
        self._mine = [by_row[b] for b in keep if b in by_row]  # new batch order
        sel = self.slots.select(keep, index)
        self._active = bool(self._mine)
        self._flags()
        if self._active:
            self._split(self._table.index_select(0, sel))
        return True

    # The stack may hand apply_ a tensor it owns (processors.stack: in-place stages);
    # before it owns one, apply (a fresh result buffer, no copy of the input) is cheaper.
    in_place = True
    fresh_apply = True

    def apply(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        if not (self._any_steer or ctx.want_stats):
            return logits
        new = self._steered(ctx, logits, None)
        if new is None:
            return logits
        if self.slots.index is None:
            return new
        return logits.index_copy(0, self.slots.index, new)

    def apply_(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` writing into ``logits (B, V)``, which the caller owns."""
        if not (self._any_steer or ctx.want_stats):
            return logits
        whole = self.slots.index is None and self._all_steer
        new = self._steered(ctx, logits, logits if whole else None)
        if new is not None and not whole:
            if self.slots.index is None:
                logits.copy_(new)
            else:
                logits.index_copy_(0, self.slots.index, new)
        return logits

    def _steered(
        self, ctx: StepContext, logits: torch.Tensor, out: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The compact rows' steered logits ``(k, V)`` (None: nothing steers).

        ``out``: write them there (``logits`` itself, when every row is ours and steers).
        Registers ``style_nll`` when the batch wants stats.
        """
        B, V = logits.shape
        logp = style_logprobs(  # (k, Vp), a fresh tensor: ours to modify below
            self.tables, self.slots.gather(ctx.last_tokens), self.prior_idx, self.log_w,
            self.is_kn, self.jm, self.any_kn,
        )
        if ctx.want_stats:
            nll = _pad_columns(logp.neg(), V, lambda x: x.amax(1, True))
            self._stat(ctx, "style_nll", nll, B)
        if not self._any_steer:
            return None
        s = logp
        if self._any_zscore:
            # Raw rows subtract 0 and divide by 1: their values are untouched, bit for bit.
            mean = s.mean(dim=1, keepdim=True)
            s.sub_(mean if self._all_zscore else torch.where(self.zscore, mean, 0.0))
            # Population std by hand: Tensor.std is several times slower on CPU.
            std = s.square().mean(dim=1, keepdim=True).sqrt().clamp_min(1e-6)
            s.div_(std if self._all_zscore else torch.where(self.zscore, std, 1.0))
        s = _pad_columns(s, V, lambda x: x.amin(1, True)).to(logits.dtype)
        x = self.slots.gather(logits)  # (k, V)
        if out is not None:
            return torch.addcmul(x, self.lam, s, out=out)
        if not s.is_contiguous():
            s = s.contiguous()
        new = torch.addcmul(x, self.lam, s, out=s)  # x + λ·s, in s's memory
        # λ = 0 rows keep their logits bit-for-bit (they still report style_nll).
        return new if self._all_steer else torch.where(self.steer, new, x)

    def _stat(self, ctx: StepContext, name: str, table: torch.Tensor, B: int) -> None:
        """Register the compact rows' ``table (k, V)`` as the per-token stat ``name``
        (rows the processor does not own keep an earlier entry's values, else NaN)."""
        if self.slots.index is None:
            ctx.stats[name] = table
            return
        prev = ctx.stats.get(name)
        base = prev.clone() if prev is not None else torch.full(
            (B, table.shape[1]), math.nan, dtype=table.dtype, device=table.device)
        ctx.stats[name] = base.index_copy_(0, self.slots.index, table)


register(NgramProcessor)

__all__ = [
    "ESTIMATORS",
    "MAX_LAMBDA",
    "NgramPrior",
    "NgramProcessor",
    "NgramSpec",
    "add_token_stat",
    "check_weights",
    "device_tables",
    "jm_coefficients",
    "log_weights",
    "style_logprobs",
]
