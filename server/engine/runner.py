"""Forward passes of the main model: prefill a group of new rows, decode one step.

Everything runs under ``torch.inference_mode()`` on the engine thread. Prompts of a
group are left-padded so that the last position is real for every row; position ids
come from the attention mask so padding never shifts a row's positions. A forward that
steers gets its per-row control-vector deltas (``PhaseDeltas``) through the model's
hooks (``server.engine.hooks``), set for that call only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from processors.control import PhaseDeltas
from server.engine.batch import BatchState
from server.engine.hooks import ControlHooks


def forward_last_logits(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """One cached forward of ``ids (N, T)``; the last position's logits ``(N, V)`` float32.

    Shared by the main model's runner and the auxiliary (fusion) models.
    """
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :].float()


class ModelRunner:
    """Owns the main model's forward calls."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.config.vocab_size)
        self.hooks = ControlHooks.install(model)
        self.dtype = next(model.parameters()).dtype

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        phase: PhaseDeltas | None = None,
    ) -> torch.Tensor:
        with self.hooks.steering(phase, mask, positions):
            return forward_last_logits(self.model, input_ids, mask, positions, cache)

    @torch.inference_mode()
    def prefill(
        self, prompts: Sequence[Sequence[int]], phase: PhaseDeltas | None = None
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prompts of new rows together (``phase``: their control deltas, row
        ``i`` of each delta belonging to ``prompts[i]``).

        Returns:
            cache: a new ``DynamicCache`` for these rows.
            mask: ``(N, T)`` int64 attention mask (left padding = 0).
            last_tokens: ``(N, 2)`` int64 last two prompt tokens (``-1`` if absent).
            logits: ``(N, V)`` float32 next-token logits.
        """
        N = len(prompts)
        T = max(len(p) for p in prompts)
        ids = torch.zeros(N, T, dtype=torch.long)
        mask = torch.zeros(N, T, dtype=torch.long)
        last = torch.full((N, 2), -1, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, T - len(p) :] = 1
            tail = list(p[-2:])
            last[i, 2 - len(tail) :] = torch.tensor(tail, dtype=torch.long)
        ids, mask, last = ids.to(self.device), mask.to(self.device), last.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache, phase)
        return cache, mask, last, logits

    @torch.inference_mode()
    def decode(
        self, batch: BatchState, tokens: torch.Tensor, phase: PhaseDeltas | None = None
    ) -> torch.Tensor:
        """Feed ``tokens (B,)`` (already recorded in ``batch.mask``); return ``(B, V)``."""
        assert batch.cache is not None
        return self._forward(
            tokens.view(-1, 1), batch.mask, batch.positions(), batch.cache, phase
        )
