"""Unsteered twins: the reference distribution for rows steered inside the forward pass.

Diagnostics (and calibration) compare the steered distribution with the frozen model's,
``base_logits``. For logits processors those are simply the forward's logits; a control
vector, however, steers the forward itself, so its logits are already steered. For each
control-steered row that needs the reference (it asked for diagnostics, or it has a
``margin`` entry) the engine keeps a *twin*: a row of a second :class:`BatchState` with its
own KV cache, fed the same tokens as its owner but run without any delta.

* The twin's prompt is prefilled in the **same forward** as its owner's group (an extra
  row with zero delta; a twin whose prompt is unsteered — ``positions: "generated"`` —
  shares its owner's prefill row).
* Each decode step runs one extra forward for the twins only (none when no row has one),
  in the same engine step, before the next sampling. Cost: only when asked.
* ``base_logits`` of those rows become the twins' logits; every other row keeps the
  forward's logits object unchanged (no copy when no row has a twin).

Twin ``j`` belongs to the ``j``-th row whose flag is set; flags follow the engine's rows
through joins (:meth:`add`) and leaves (:meth:`select`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from processors.control import ControlSpec
from server.engine.batch import BatchState, layer_kv
from server.engine.runner import ModelRunner
from server.engine.types import GenerationRequest


def wants_twin(request: GenerationRequest, specs: Sequence[ControlSpec]) -> bool:
    """Whether ``request`` needs unsteered reference logits: it has a control entry that
    changes something, and diagnostics on or a ``margin`` entry."""
    if not any(s.alpha != 0.0 for s in specs):
        return False
    return request.diagnostics != "off" or any(e.type == "margin" for e in request.steering)


def select_rows(cache: DynamicCache, idx: torch.Tensor, config: Any) -> DynamicCache:
    """A new cache holding rows ``idx (N,)`` of ``cache`` (``cache`` is not changed)."""
    data = []
    for lay in cache.layers:
        keys, values = layer_kv(lay)
        data.append((keys.index_select(0, idx), values.index_select(0, idx)))
    return DynamicCache(ddp_cache_data=data, config=config)


class UnsteeredTwins:
    """The twin rows of the running batch (see the module docstring)."""

    def __init__(self, runner: ModelRunner, vocab_size: int, device: torch.device) -> None:
        self.runner = runner
        self.vocab_size = vocab_size
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Drop every twin (the engine's batch was reset)."""
        self.batch = BatchState(self.vocab_size, self.device)
        self.flags: list[bool] = []  # one per engine row: has a twin
        self._pos: torch.Tensor | None = None  # (J,) engine-row index of each twin

    @property
    def active(self) -> bool:
        """Whether any row has a twin."""
        return self._pos is not None

    def _update_pos(self) -> None:
        pos = [b for b, f in enumerate(self.flags) if f]
        self._pos = torch.tensor(pos, dtype=torch.long, device=self.device) if pos else None

    def add(
        self,
        flags: Sequence[bool],
        cache: DynamicCache,
        mask: torch.Tensor,
        last_tokens: torch.Tensor,
        logits: torch.Tensor,
        idx: torch.Tensor | None,
    ) -> None:
        """Rows joined the engine's batch: ``flags[i]`` says whether new row ``i`` has a
        twin; the twins' prefill state is rows ``idx`` of the group's prefill outputs."""
        self.flags.extend(bool(f) for f in flags)
        if idx is not None and idx.numel():
            self.batch.add(
                select_rows(cache, idx, self.runner.model.config),
                mask[idx],
                last_tokens[idx],
                logits[idx],
            )
        self._update_pos()

    def select(self, keep: Sequence[int]) -> None:
        """The engine kept rows ``keep``; keep their twins, drop the others'."""
        if len(keep) == len(self.flags):
            return
        twin_of = {b: j for j, b in enumerate(b for b, f in enumerate(self.flags) if f)}
        kept = [twin_of[b] for b in keep if b in twin_of]
        if len(kept) != len(twin_of):
            self.batch.select(kept)
        self.flags = [self.flags[b] for b in keep]
        self._update_pos()

    def base_logits(self, forward_logits: torch.Tensor) -> torch.Tensor:
        """``forward_logits (B, V)`` with the twin rows' unsteered logits swapped in."""
        if self._pos is None:
            return forward_logits
        return forward_logits.index_copy(0, self._pos, self.batch.next_logits)

    def decode(self, tokens: torch.Tensor) -> None:
        """Feed the engine rows' sampled ``tokens (B,)`` to their twins (no steering)."""
        if self._pos is None:
            return
        tok = tokens.index_select(0, self._pos)  # (J,)
        self.batch.append_tokens(tok)
        self.batch.next_logits = self.runner.decode(self.batch, tok)


__all__ = ["UnsteeredTwins", "select_rows", "wants_twin"]
