"""Forward passes of the main model: prefill a group of new rows, decode one step.

Everything runs under ``torch.inference_mode()`` on the engine thread. Prompts of a
group are left-padded (``server.engine.padding``) so that the last position is real for
every row; position ids come from the attention mask so padding never shifts a row's
positions, and the attention mask the model receives never leaves a query row fully
masked. A forward that
steers gets its per-row control-vector deltas (``PhaseDeltas``) through the model's
hooks (``server.engine.hooks``), set for that call only.

On the low-precision fast paths (bf16 / int4 weights) the forward of a Llama-family model
is the lean one (``server.engine.lean``: same math, same cache, same steering, a fraction
of the per-block host work); fp32 keeps the transformers forward unless asked
(``lean=True``), so the exactness tests compare the engine with ``transformers.generate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from processors.control import PhaseDeltas
from server.engine.batch import BatchState
from server.engine.hooks import ControlHooks
from server.engine.lean import LeanForward
from server.engine.padding import left_pad, model_mask


def forward_last_logits(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: DynamicCache,
    lengths: Sequence[int],
) -> torch.Tensor:
    """One cached forward of ``ids (N, T)``; the last position's logits ``(N, V)`` float32.

    ``mask (N, K)`` is the 2-D padding mask over cache + new tokens and ``lengths`` the
    rows' real lengths (host ints); the model gets the mask of
    ``server.engine.padding.model_mask`` (no fully-masked query row, no host sync).
    Shared by the main model's runner and the auxiliary (fusion) models.
    """
    out = model(
        input_ids=ids,
        attention_mask=model_mask(model, mask, ids.shape[1], lengths),
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :].float()


class ModelRunner:
    """Owns the main model's forward calls.

    ``lean``: run the lean forward (``server.engine.lean``) where the model supports it;
    ``None`` (default) = on for low-precision weights (the embedding is not float32),
    off for fp32, the exact reference. ``self.lean`` is the forward in use (None: the
    transformers forward).
    """

    def __init__(self, model: PreTrainedModel, lean: bool | None = None) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.config.vocab_size)
        self.hooks = ControlHooks.install(model)
        self.dtype = next(model.parameters()).dtype
        if lean is None:
            embed = model.get_input_embeddings()
            lean = getattr(embed, "weight", None) is not None and \
                embed.weight.dtype != torch.float32
        self.lean = LeanForward.build(model, self.hooks) if lean else None

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        lengths: Sequence[int],
        phase: PhaseDeltas | None = None,
    ) -> torch.Tensor:
        with self.hooks.steering(phase, mask, positions):
            if self.lean is not None:
                attn = model_mask(self.model, mask, input_ids.shape[1], lengths)
                return self.lean(input_ids, attn, positions, cache)
            return forward_last_logits(self.model, input_ids, mask, positions, cache, lengths)

    @torch.inference_mode()
    def prefill(
        self, prompts: Sequence[Sequence[int]], phase: PhaseDeltas | None = None
    ) -> BatchState:
        """Run the prompts of new rows together (``phase``: their control deltas, row
        ``i`` of each delta belonging to ``prompts[i]``).

        Returns a new :class:`BatchState` of these rows: their cache, ``(N, T)`` mask,
        ``(N, 2)`` last two prompt tokens (``-1`` if absent) and ``(N, V)`` float32
        next-token logits.
        """
        padded = left_pad(prompts, self.device)
        last = torch.full((len(prompts), 2), -1, dtype=torch.long)
        for i, p in enumerate(prompts):
            tail = list(p[-2:])
            last[i, 2 - len(tail) :] = torch.tensor(tail, dtype=torch.long)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(
            padded.ids, padded.mask, padded.positions, cache, padded.lengths, phase
        )
        return BatchState.from_prefill(
            self.vocab_size, cache, padded.mask, padded.lengths, last.to(self.device), logits
        )

    @torch.inference_mode()
    def decode(
        self, batch: BatchState, tokens: torch.Tensor, phase: PhaseDeltas | None = None
    ) -> torch.Tensor:
        """Feed ``tokens (B,)`` (already recorded in ``batch.mask``); return ``(B, V)``."""
        assert batch.cache is not None
        return self._forward(
            tokens.view(-1, 1), batch.mask, batch.positions(), batch.cache, batch.lengths,
            phase,
        )
