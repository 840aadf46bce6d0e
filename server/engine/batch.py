"""Device-side state of the running batch: KV cache, attention mask, token bookkeeping.

Rows are kept left-padded: row ``b`` of every cache layer is ``(H_kv, L, head_dim)``
with its real positions at the right end, and ``mask[b]`` is 1 on real positions. A new
group of rows (prefilled together) joins by left-padding whichever side is shorter and
concatenating on the batch dim; finished rows leave with ``index_select``. Columns that
became padding for every row are trimmed so the cache does not grow without bound.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def _left_pad(t: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
    """Prepend ``extra`` zeros to ``t`` along ``dim``."""
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BatchState:
    """KV cache and per-row tensors of the rows currently decoding.

    Attributes:
        cache: the model's ``DynamicCache`` for all rows.
        mask: ``(B, L)`` int64 attention mask (1 = real token).
        last_tokens: ``(B, 2)`` int64, last two tokens per row (``-1`` if absent).
        seen: ``(B, V)`` bool token-presence mask (only when ``track_seen``).
        next_logits: ``(B, V)`` float32 logits for each row's next token.
    """

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.last_tokens = torch.zeros(0, 2, dtype=torch.long, device=device)
        self.next_logits = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)
        self.seen: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Number of rows."""
        return self.mask.shape[0]

    def add(
        self,
        cache: DynamicCache,
        mask: torch.Tensor,
        last_tokens: torch.Tensor,
        logits: torch.Tensor,
    ) -> None:
        """Append a freshly prefilled group of rows at the end of the batch."""
        if self.cache is None or self.size == 0:
            self.cache, self.mask = cache, mask
            self.last_tokens, self.next_logits = last_tokens, logits
            return
        L_old, L_new = self.mask.shape[1], mask.shape[1]
        L = max(L_old, L_new)
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            (ok, ov), (nk, nv) = layer_kv(old), layer_kv(new)
            set_layer_kv(
                old,
                torch.cat([_left_pad(ok, L - L_old, 2), _left_pad(nk, L - L_new, 2)], 0),
                torch.cat([_left_pad(ov, L - L_old, 2), _left_pad(nv, L - L_new, 2)], 0),
            )
        self.mask = torch.cat(
            [_left_pad(self.mask, L - L_old, 1), _left_pad(mask, L - L_new, 1)], 0
        )
        self.last_tokens = torch.cat([self.last_tokens, last_tokens], 0)
        self.next_logits = torch.cat([self.next_logits, logits], 0)

    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (in that order) and trim all-padding columns."""
        if len(keep) == self.size:
            return
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.device)
        if len(keep) == 0:
            self.cache = None
            self.mask = self.mask[:0, :0]
            self.last_tokens = self.last_tokens[:0]
            self.next_logits = self.next_logits[:0]
            self.seen = None if self.seen is None else self.seen[:0]
            return
        assert self.cache is not None
        self.mask = self.mask.index_select(0, idx)
        self.last_tokens = self.last_tokens.index_select(0, idx)
        self.next_logits = self.next_logits.index_select(0, idx)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, idx)
        # Columns that are padding in every remaining row can go (host sync is fine
        # here: composition changes are rare compared with decode steps).
        real_cols = self.mask.any(dim=0)
        first = int(real_cols.nonzero()[0, 0]) if bool(real_cols.any()) else 0
        for layer in self.cache.layers:
            keys, values = layer_kv(layer)
            set_layer_kv(
                layer, keys.index_select(0, idx)[:, :, first:],
                values.index_select(0, idx)[:, :, first:],
            )
        self.mask = self.mask[:, first:]

    def rebuild_seen(self, histories: Sequence[Sequence[int]]) -> None:
        """Recompute the ``(B, V)`` presence mask from each row's full token history."""
        seen = torch.zeros(len(histories), self.vocab_size, dtype=torch.bool, device=self.device)
        for b, ids in enumerate(histories):
            if ids:
                seen[b, torch.tensor(list(ids), dtype=torch.long, device=self.device)] = True
        self.seen = seen

    def append_tokens(self, tokens: torch.Tensor) -> None:
        """Record the tokens ``(B,)`` just sampled (mask, last tokens, presence)."""
        B = tokens.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)
        self.last_tokens = torch.cat([self.last_tokens[:, 1:], tokens.view(B, 1)], dim=1)
        if self.seen is not None:
            self.seen.scatter_(1, tokens.view(B, 1), True)

    def positions(self) -> torch.Tensor:
        """``(B, 1)`` position id of the newest token of each row."""
        return (self.mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
