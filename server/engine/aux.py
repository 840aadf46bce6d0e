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
  into a zero ``(B, V)`` tensor (the ``ctx.aux_logits`` contract of
  ``processors.fusion``);
* after the main decode → :meth:`AuxPool.decode` feeds each model the tokens the main
  model just sampled for its rows.

With no row using an auxiliary model nothing here runs (``active`` is false), so rows
without fusion cost nothing extra.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from processors.fusion import fusion_models
from server.engine.batch import BatchState
from server.engine.padding import left_pad
from server.engine.runner import forward_last_logits
from server.engine.types import GenerationRequest

log = logging.getLogger("steerserve.engine")


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
        padded = left_pad(prompts, self.device)
        cache = DynamicCache(config=self.model.config)
        logits = forward_last_logits(
            self.model, padded.ids, padded.mask, padded.positions, cache, padded.lengths
        )
        last = torch.full((len(prompts), 2), -1, dtype=torch.long, device=self.device)
        self.batch.add(BatchState.from_prefill(
            self.batch.vocab_size, cache, padded.mask, padded.lengths, last, logits
        ))

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> None:
        """Feed ``tokens (n,)`` (one per row of this model) and keep the next logits."""
        assert self.batch.cache is not None
        self.batch.append_tokens(tokens)
        self.batch.next_logits = forward_last_logits(
            self.model, tokens.view(-1, 1), self.batch.mask, self.batch.positions(),
            self.batch.cache, self.batch.lengths,
        )


def _same(a: torch.device, b: torch.device) -> bool:
    """Same device, ``cuda`` and ``cuda:0`` alike."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _on_device(
    name: str, model: PreTrainedModel, device: torch.device | None
) -> PreTrainedModel:
    """``model`` on ``device`` (moved if needed; ValueError if that fails)."""
    here = next(model.parameters()).device
    if device is None or _same(here, device):
        return model
    log.warning("auxiliary model '%s' is on %s, the main model on %s: moving it", name,
                here, device)
    try:
        moved_model: Any = torch.nn.Module.to(model, device)  # (PreTrainedModel.to is wrapped)
        model = moved_model
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(
            f"auxiliary model '{name}' is on {here} but the main model is on {device}, and "
            f"moving it failed ({err}); load it on {device}"
        ) from err
    moved = {p.device for p in model.parameters()}
    if not all(_same(d, device) for d in moved):
        raise ValueError(
            f"auxiliary model '{name}' has parameters on {sorted(map(str, moved))}; the main "
            f"model is on {device}: load it there"
        )
    return model


class AuxPool:
    """All auxiliary models of the engine, by name."""

    def __init__(
        self,
        models: Mapping[str, PreTrainedModel],
        vocab_size: int,
        device: torch.device | None = None,
    ) -> None:
        """``device``: the main model's device. An auxiliary model elsewhere is moved
        there (its logits are mixed with the main model's on every step, so a model on
        another device would cost a cross-device copy per step, or fail); a model that
        cannot be moved is refused with a ValueError naming it."""
        self.vocab_size = vocab_size
        self.models: dict[str, AuxModel] = {}
        for name, model in models.items():
            model.eval()
            model = _on_device(name, model, device)
            here = next(model.parameters()).device
            self.models[name] = AuxModel(name, model, BatchState(vocab_size, here))
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
                m.batch.select(list(range(before)) + [before + o for o in owner])
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
                out[name] = full.index_copy_(0, m.rows, m.batch.next_logits)  # into ours
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
            m.batch.clear()  # allocates nothing on the device (it may have failed)
            m.keys, m.rows = [], None
        self._keys = []
