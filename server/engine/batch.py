"""Device-side state of a group of decoding rows: KV cache, attention mask, last tokens.

Rows are kept left-padded: row ``b`` of every cache layer is ``(H_kv, L, head_dim)``
with its real positions at the right end, and ``mask[b]`` is 1 on real positions. The
real length of every row is also kept on the host (``lengths``), so trimming padding
columns and deciding whether a forward needs a mask at all never read the device.

A new group of rows (prefilled together, itself a ``BatchState``) joins with
:meth:`BatchState.add` (left-pad whichever side is shorter, concatenate on the batch
dim); :meth:`BatchState.gather` makes a new state from chosen rows (shared prefills,
twins); :meth:`BatchState.select` keeps rows in place (finished rows leave). Every other
module goes through these three: none reaches into ``DynamicCache`` layers itself.

An empty state holds no device memory (its placeholders live on the CPU), so resetting
after a device failure allocates nothing on the failed device.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def layer_kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys, values`` ``(B, H_kv, L, head_dim)`` of one filled attention layer.

    ``DynamicCache.layers`` is typed as a union that includes linear-attention layers
    (no keys/values) and unfilled ones (``None``); the models served here only have
    filled full-attention layers by the time the engine touches them, so anything else
    is a bug, raised here rather than as an ``AttributeError`` deep inside a gather.
    """
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError(f"expected a filled attention cache layer, got {type(layer).__name__}")
    return keys, values


def set_layer_kv(layer: object, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace one attention layer's ``keys, values`` (see :func:`layer_kv`)."""
    if not isinstance(layer, DynamicLayer):
        raise TypeError(f"expected a DynamicLayer, got {type(layer).__name__}")
    layer.keys, layer.values = keys, values

_HOST = torch.device("cpu")


def _left_pad(t: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
    """Prepend ``extra`` zeros to ``t`` along ``dim``."""
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's per-layer objects, each with ``keys``/``values`` ``(B, H, L, d)``.

    Typed ``Any``: transformers types ``cache.layers`` as a union that includes
    linear-attention layers without ``keys``; the engine only builds attention caches.
    """
    return list(cache.layers)


class BatchState:
    """KV cache and per-row tensors of a group of rows.

    Attributes:
        cache: the model's ``DynamicCache`` for all rows (None when empty).
        mask: ``(B, L)`` int64 attention mask (1 = real token).
        lengths: host list, real length of each row (``max(lengths) == L`` when B > 0).
        last_tokens: ``(B, 2)`` int64, last two tokens per row (``-1`` if absent).
        seen: ``(B, V)`` bool token-presence mask (only when the sampler needs it).
        next_logits: ``(B, V)`` float32 logits for each row's next token.
        next_stats: per-row scalars the forward that made ``next_logits`` recorded
            (control-vector hooks' ``phase.stats``): name → ``(B,)`` float32, NaN for
            rows a stat does not apply to. They follow the rows like ``next_logits``.
    """

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        # Empty host-side placeholders, made once: clear() only rebinds them.
        self._empty = (
            torch.zeros(0, 0, dtype=torch.long, device=_HOST),
            torch.zeros(0, 2, dtype=torch.long, device=_HOST),
            torch.zeros(0, vocab_size, dtype=torch.float32, device=_HOST),
        )
        self.clear()

    def clear(self) -> None:
        """Drop every row. Allocates nothing at all (it rebinds the empty host-side
        placeholders), so it is safe after a device failure."""
        self.cache: DynamicCache | None = None
        self.mask, self.last_tokens, self.next_logits = self._empty
        self.lengths: list[int] = []
        self.seen: torch.Tensor | None = None
        self.next_stats: dict[str, torch.Tensor] = {}

    @classmethod
    def from_prefill(
        cls,
        vocab_size: int,
        cache: DynamicCache,
        mask: torch.Tensor,
        lengths: Sequence[int],
        last_tokens: torch.Tensor,
        logits: torch.Tensor,
    ) -> BatchState:
        """A state holding a freshly prefilled group (``mask (N, T)``, ``logits (N, V)``)."""
        state = cls(vocab_size, mask.device)
        state.cache, state.mask, state.lengths = cache, mask, list(lengths)
        state.last_tokens, state.next_logits = last_tokens, logits
        return state

    @property
    def size(self) -> int:
        """Number of rows."""
        return len(self.lengths)

    @property
    def padded(self) -> bool:
        """Whether any row has padding columns (host-side; no device read)."""
        return bool(self.lengths) and min(self.lengths) != self.mask.shape[1]

    def add(self, other: BatchState, at: int | None = None, head: int | None = None) -> None:
        """Add the rows of ``other`` (a freshly prefilled group).

        By default they go at the end. With ``at``/``head``, the first ``head`` rows of
        ``other`` go before row ``at`` of ``self`` and the rest at the end — the order
        ``self[:at], other[:head], self[at:], other[head:]`` in one concatenation per
        tensor (the engine keeps its rows first and the twins' rows after them).
        """
        if other.size == 0:
            return
        n_self = self.size if (self.cache is not None) else 0
        at = n_self if at is None else at
        head = other.size if head is None else head

        def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([a[:at], b[:head], a[at:], b[head:]], 0)

        if self.cache is None or self.size == 0:
            self.cache, self.mask, self.lengths = other.cache, other.mask, list(other.lengths)
            self.last_tokens, self.next_logits = other.last_tokens, other.next_logits
            self.next_stats = dict(other.next_stats)
            self.seen = None
            return
        assert other.cache is not None
        L_old, L_new = self.mask.shape[1], other.mask.shape[1]
        L = max(L_old, L_new)
        for old, new in zip(_layers(self.cache), _layers(other.cache), strict=True):
            old.keys = merge(_left_pad(old.keys, L - L_old, 2), _left_pad(new.keys, L - L_new, 2))
            old.values = merge(
                _left_pad(old.values, L - L_old, 2), _left_pad(new.values, L - L_new, 2)
            )
        self.mask = merge(_left_pad(self.mask, L - L_old, 1), _left_pad(other.mask, L - L_new, 1))
        self.lengths = (self.lengths[:at] + other.lengths[:head] + self.lengths[at:]
                        + other.lengths[head:])
        self.last_tokens = merge(self.last_tokens, other.last_tokens)
        self.next_logits = merge(self.next_logits, other.next_logits)
        names = set(self.next_stats) | set(other.next_stats)
        n_old, n_new = n_self, other.size
        nan = float("nan")
        self.next_stats = {
            k: merge(
                self.next_stats.get(k, self.next_logits.new_full((n_old,), nan)),
                other.next_stats.get(k, self.next_logits.new_full((n_new,), nan)),
            ) for k in names
        }
        self.seen = None  # the owner rebuilds it for the new composition

    def _rows(
        self, keep: Sequence[int], idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, int]:
        """``(idx, first)``: the device index of rows ``keep`` (uploaded unless the caller
        has it) and the first column that is real for at least one of them (host
        arithmetic on ``lengths``)."""
        if idx is None:
            idx = torch.tensor(list(keep), dtype=torch.long).to(self.device, non_blocking=True)
        longest = max(self.lengths[b] for b in keep)
        return idx, self.mask.shape[1] - longest

    def gather(self, keep: Sequence[int]) -> BatchState:
        """A new state holding copies of rows ``keep`` (in that order, repeats allowed);
        ``self`` is unchanged."""
        out = BatchState(self.vocab_size, self.device)
        if not keep:
            return out
        assert self.cache is not None
        idx, first = self._rows(keep)
        # Shallow copies keep each layer's type (and so any sliding-window behaviour).
        out.cache = copy.copy(self.cache)
        out.cache.layers = []
        for lay in _layers(self.cache):
            new = copy.copy(lay)
            new.keys = lay.keys.index_select(0, idx)[:, :, first:]
            new.values = lay.values.index_select(0, idx)[:, :, first:]
            out.cache.layers.append(new)
        out.mask = self.mask.index_select(0, idx)[:, first:]
        out.lengths = [self.lengths[b] for b in keep]
        out.last_tokens = self.last_tokens.index_select(0, idx)
        out.next_logits = self.next_logits.index_select(0, idx)
        out.seen = None if self.seen is None else self.seen.index_select(0, idx)
        out.next_stats = {k: v.index_select(0, idx) for k, v in self.next_stats.items()}
        return out

    def select(self, keep: Sequence[int], idx: torch.Tensor | None = None) -> None:
        """Keep only rows ``keep`` (in that order) and trim all-padding columns; ``idx``
        is ``keep`` on the device when the caller has uploaded it already."""
        if list(keep) == list(range(self.size)):
            return
        if not keep:
            self.clear()
            return
        assert self.cache is not None
        idx, first = self._rows(keep, idx)
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]
        self.mask = self.mask.index_select(0, idx)[:, first:]
        self.lengths = [self.lengths[b] for b in keep]
        self.last_tokens = self.last_tokens.index_select(0, idx)
        self.next_logits = self.next_logits.index_select(0, idx)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, idx)
        self.next_stats = {k: v.index_select(0, idx) for k, v in self.next_stats.items()}

    def rebuild_seen(self, histories: Sequence[Sequence[int]]) -> None:
        """Recompute the ``(B, V)`` presence mask from each row's full token history
        (one upload of the flattened ids, one scatter)."""
        rows = [b for b, ids in enumerate(histories) for _ in ids]
        cols = [int(t) for ids in histories for t in ids]
        seen = torch.zeros(len(histories), self.vocab_size, dtype=torch.bool, device=self.device)
        if cols:
            both = torch.tensor([rows, cols], dtype=torch.long).to(self.device)
            seen[both[0], both[1]] = True
        self.seen = seen

    def append_tokens(self, tokens: torch.Tensor) -> None:
        """Record the tokens ``(B,)`` just sampled (mask, lengths, last tokens, presence)."""
        B = tokens.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)
        self.lengths = [n + 1 for n in self.lengths]
        self.last_tokens = torch.cat([self.last_tokens[:, 1:], tokens.view(B, 1)], dim=1)
        if self.seen is not None:
            self.seen.scatter_(1, tokens.view(B, 1), True)

    def positions(self) -> torch.Tensor:
        """``(B, 1)`` position id of the newest token of each row."""
        return (self.mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
