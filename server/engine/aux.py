"""Auxiliary models (fusion's small base and experts) decoding beside the main model.

Each auxiliary model keeps its own :class:`BatchState` (KV cache, mask) holding only the
rows whose request uses that model, in join order. Rows are identified by a *key* (the
engine uses ``id(handle)``); whenever the engine's row list changes, :meth:`AuxPool.sync`
drops the rows that left (freeing their cache with ``index_select``, exactly as for the
main model) and recomputes where each auxiliary row sits in the engine's batch.

Per engine iteration:

* a row joins → :meth:`AuxPool.prefill` runs its prompt through every auxiliary model it
  uses (its own prompt ids when the expert has a template, see
  ``GenerationRequest.aux_prompt_ids``); rows that share a prompt share one prefill;
* before the processors → :meth:`AuxPool.logits` scatters each model's next-token logits
  into a zero ``(B, V)`` tensor (the ``ctx.extras["aux_logits"]`` contract of
  ``processors.fusion``);
* after the main decode → :meth:`AuxPool.decode` feeds each model the tokens the main
  model just sampled for its rows.

With no row using an auxiliary model nothing here runs (``active`` is false), so rows
without fusion cost nothing extra.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from processors.fusion import fusion_models
from server.engine.batch import BatchState
from server.engine.runner import forward_last_logits
from server.engine.types import GenerationRequest


@dataclass
class AuxModel:
    """One auxiliary model and the rows it is decoding.

    ``keys[j]`` is the engine key of row ``j`` of ``batch``; ``rows (n,)`` the engine
    batch index of each of those rows (valid after a sync).
    """

    name: str
    model: PreTrainedModel
    batch: BatchState
    keys: list[Hashable] = field(default_factory=list)
    rows: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.batch.device

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> None:
        """Left-pad ``prompts``, run them as one group and append them to the batch."""
        N, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(N, T, dtype=torch.long)
        mask = torch.zeros(N, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, T - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = forward_last_logits(self.model, ids, mask, positions, cache)
        last = torch.full((N, 2), -1, dtype=torch.long, device=self.device)
        self.batch.add(cache, mask, last, logits)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> None:
        """Feed ``tokens (n,)`` (one per row of this model) and keep the next logits."""
        assert self.batch.cache is not None
        self.batch.append_tokens(tokens)
        self.batch.next_logits = forward_last_logits(
            self.model, tokens.view(-1, 1), self.batch.mask, self.batch.positions(),
            self.batch.cache,
        )


class AuxPool:
    """All auxiliary models of the engine, by name."""

    def __init__(self, models: Mapping[str, PreTrainedModel], vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.models: dict[str, AuxModel] = {}
        for name, model in models.items():
            model.eval()
            device = next(model.parameters()).device
            self.models[name] = AuxModel(name, model, BatchState(vocab_size, device))
        self._keys: list[Hashable] | None = []

    @property
    def active(self) -> bool:
        """Whether any auxiliary model holds a row."""
        return any(m.keys for m in self.models.values())

    def sync(self, keys: Sequence[Hashable]) -> None:
        """Match the engine's rows ``keys`` (in batch order): drop rows that left and
        recompute every model's row index. Cheap when nothing changed."""
        if not self.active:
            self._keys = None  # nothing to index; recomputed once rows join
            return
        if self._keys is not None and list(keys) == self._keys:
            return
        where = {k: b for b, k in enumerate(keys)}
        for m in self.models.values():
            keep = [j for j, k in enumerate(m.keys) if k in where]
            if len(keep) != len(m.keys):
                m.batch.select(keep)  # frees the departed rows' cache
                m.keys = [m.keys[j] for j in keep]
            m.rows = torch.tensor([where[k] for k in m.keys], dtype=torch.long,
                                  device=m.device)
        self._keys = list(keys)

    def prefill(
        self, keys: Sequence[Hashable], new: Sequence[tuple[Hashable, GenerationRequest]]
    ) -> None:
        """Prefill the new rows ``(key, request)`` in each auxiliary model they use;
        ``keys`` are all of the engine's rows after the join (new ones included)."""
        uses = [fusion_models(req.steering) for _, req in new]
        if not any(uses) and not self.active:
            return  # no fusion anywhere: nothing to do
        present = [k for k in keys if k not in {key for key, _ in new}]
        self.sync(present)
        for name, m in self.models.items():
            joining = [(key, req) for (key, req), u in zip(new, uses, strict=True) if name in u]
            if not joining:
                continue
            prompts = [dict(req.aux_prompt_ids).get(name, req.prompt_ids) for _, req in joining]
            unique: dict[tuple[int, ...], int] = {}
            owner = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
            before = m.batch.size
            m.prefill(list(unique))
            if len(unique) != len(joining):  # duplicate the shared rows (sweeps)
                idx = list(range(before)) + [before + o for o in owner]
                m.batch.select(idx)
            m.keys.extend(key for key, _ in joining)
        self._keys = None  # force the index rebuild
        self.sync(keys)

    def logits(self, keys: Sequence[Hashable], batch: int) -> dict[str, torch.Tensor]:
        """``name → (B, V)`` next-token logits; rows not using the model are zeros."""
        self.sync(keys)
        out: dict[str, torch.Tensor] = {}
        for name, m in self.models.items():
            if m.keys:
                assert m.rows is not None
                full = m.batch.next_logits.new_zeros(batch, m.batch.next_logits.shape[1])
                out[name] = full.index_copy(0, m.rows, m.batch.next_logits)
        return out

    def decode(self, keys: Sequence[Hashable], tokens: torch.Tensor) -> None:
        """Feed each model the engine's sampled ``tokens (B,)`` of its rows."""
        self.sync(keys)
        for m in self.models.values():
            if m.keys:
                assert m.rows is not None
                m.decode(tokens.index_select(0, m.rows))

    def reset(self) -> None:
        """Forget every row (after a failed step or on shutdown)."""
        for m in self.models.values():
            m.batch = BatchState(self.vocab_size, m.device)
            m.keys, m.rows = [], None
        self._keys = []
