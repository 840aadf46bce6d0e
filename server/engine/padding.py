"""Left padding and the attention mask every forward of the engine passes to the model.

One home for the glue the main runner, the auxiliary (fusion) models and control-vector
extraction all need:

* :func:`left_pad` turns prompts of different lengths into ``ids``/``mask``/``positions``
  with the real tokens at the right end (so the last position is real for every row) and
  position ids counted from each row's first real token.
* :func:`attention_mask_4d` builds the additive ``(N, 1, Q, K)`` mask the model receives.

Why the engine builds the 4-D mask itself:

1. **No fully-masked query rows.** In a left-padded prefill the padding positions'
   queries may attend to nothing (causal ∧ padding is empty for them). CPU SDPA returns 0
   for such rows; CUDA SDPA kernels may return NaN, which then sits in that row's KV cache
   (at a padded position) and, through a NaN × 0 in the value product, poisons every later
   step. Here every query also attends to its own position, so no row is ever empty; the
   padding queries' outputs are finite garbage that no real query ever reads (their keys
   stay masked for every real query).
2. **No host sync.** Given a 2-D mask, transformers decides whether it may skip the mask
   with a host-side ``mask.all()`` (one device→host sync per forward). A 4-D mask is used
   as-is, and a batch without any padding passes ``None`` (SDPA's ``is_causal`` path),
   decided from host-side lengths.

Models with sliding-window layers need transformers' own per-layer masks; for them
:func:`model_takes_4d_mask` is false and the 2-D mask is passed as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Padded:
    """A left-padded group of prompts.

    Attributes:
        ids: ``(N, T)`` int64 token ids (0 on padding).
        mask: ``(N, T)`` int64, 1 on real tokens.
        positions: ``(N, T)`` int64 position ids (0 on padding, then 0, 1, ... on real).
        lengths: the real length of each row (host ints; ``T == max(lengths)``).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    lengths: tuple[int, ...]


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> Padded:
    """Left-pad ``prompts`` (each non-empty) into one group on ``device`` (one upload)."""
    lengths = tuple(len(p) for p in prompts)
    N, T = len(prompts), max(lengths)
    ids = torch.zeros(N, T, dtype=torch.long)
    mask = torch.zeros(N, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, T - len(p) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    both = torch.stack([ids, mask, positions]).to(device)
    return Padded(both[0], both[1], both[2], lengths)


def model_takes_4d_mask(config: Any) -> bool:
    """False for models with sliding-window layers (they need transformers' own masks)."""
    layer_types = getattr(config, "layer_types", None) or ()
    if any("sliding" in str(t) for t in layer_types):
        return False
    return not bool(getattr(config, "use_sliding_window", False))


def attention_mask_4d(mask: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask for ``q_len`` new queries over ``mask (N, K)``.

    Query ``q`` sits at key position ``K - q_len + q``. It may attend to key ``k`` when
    ``k`` is a real token at or before it (causal ∧ padding) — and always to itself, so
    no query row is fully masked (see the module docstring).

    Returns:
        ``(N, 1, q_len, K)`` tensor of ``dtype``: 0 where attended, the dtype's most
        negative finite value elsewhere (finite, so even a degenerate row cannot NaN).
    """
    N, K = mask.shape
    q_pos = torch.arange(K - q_len, K, device=mask.device).view(q_len, 1)  # (Q, 1)
    k_pos = torch.arange(K, device=mask.device).view(1, K)  # (1, K)
    causal = k_pos <= q_pos  # (Q, K)
    allowed = causal.unsqueeze(0) & mask.bool().view(N, 1, K)  # (N, Q, K)
    allowed |= (k_pos == q_pos).unsqueeze(0)  # every query sees itself
    out = torch.zeros(N, 1, q_len, K, dtype=dtype, device=mask.device)
    return out.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)


def model_mask(
    model: Any, mask: torch.Tensor, q_len: int, lengths: Sequence[int]
) -> torch.Tensor | None:
    """What to pass as ``attention_mask`` for ``q_len`` new tokens over ``mask (N, K)``.

    ``None`` when no row has padding (``lengths``, host ints, all equal ``K``): the model
    then uses SDPA's causal path with no mask to build. Otherwise the 4-D mask of
    :func:`attention_mask_4d` in the model's dtype, or the 2-D mask for sliding-window
    models.
    """
    K = mask.shape[1]
    if all(n == K for n in lengths):
        return None
    config = model.config
    if not model_takes_4d_mask(config):
        return mask
    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:  # quantized storage: masks follow the activations
        dtype = torch.float32
    return attention_mask_4d(mask, q_len, dtype)


__all__ = ["Padded", "attention_mask_4d", "left_pad", "model_mask", "model_takes_4d_mask"]
