"""Unsteered twins: the reference distribution for rows steered inside the forward pass.

Diagnostics (and calibration) compare the steered distribution with the frozen model's,
``base_logits``. For logits processors those are simply the forward's logits; a control
vector, however, steers the forward itself, so its logits are already steered. For each
control-steered row that needs the reference (it asked for diagnostics, or it has a
``margin`` or ``guard`` entry) the engine keeps a *twin*: an extra row **of the main
batch** (its own KV rows, after all the engine's rows), fed the same token as its owner
and run with a zero delta. Twins never sample and never emit.

* The twin's prompt is prefilled in the **same forward** as its owner's group (an extra
  row with zero delta; a twin whose prompt is unsteered — ``positions: "generated"`` —
  shares its owner's prefill row).
* Each decode step is **one** forward for the engine's rows and the twins together:
  the decode phase gives the twin rows no control entry (zero delta), and
  :meth:`UnsteeredTwins.feed` appends the owners' sampled tokens for them.
* ``base_logits`` of the owner rows become their twins' logits; every other row keeps
  the forward's logits (no copy when no row has a twin).

Layout of the main :class:`~server.engine.batch.BatchState` with ``B`` engine rows and
``J`` twins: rows ``0..B-1`` are the engine's, row ``B + j`` is twin ``j``, which belongs
to the ``j``-th engine row whose flag is set (so twins are in owner order; joins append
new rows before the old twins' block and new twins after it, leaves keep both in order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from processors.control import ControlSpec
from server.engine.types import GenerationRequest


def wants_twin(request: GenerationRequest, specs: Sequence[ControlSpec]) -> bool:
    """Whether ``request`` needs unsteered reference logits: it has a control entry that
    changes something, and diagnostics on or a ``margin``/``guard`` entry."""
    if not any(s.alpha != 0.0 for s in specs):
        return False
    # margin and guard read ctx.base_logits as the frozen model's distribution.
    return request.diagnostics != "off" or any(
        e.type in ("margin", "guard") for e in request.steering
    )


class UnsteeredTwins:
    """Which engine rows have a twin, and the index arithmetic of the twin block (see
    the module docstring). Holds no cache of its own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Drop every twin (the engine's batch was reset); allocates nothing (the
        device may have failed)."""
        self.flags: list[bool] = []  # one per engine row: has a twin
        self.owners: list[int] = []  # engine-row index of each twin, in twin order
        self._pos: torch.Tensor | None = None  # (J,) device copy of ``owners``

    @property
    def active(self) -> bool:
        """Whether any row has a twin."""
        return bool(self.owners)

    @property
    def count(self) -> int:
        """``J``, the number of twin rows after the engine's rows."""
        return len(self.owners)

    def _update(self) -> None:
        self.owners = [b for b, f in enumerate(self.flags) if f]
        self._pos = (torch.tensor(self.owners, dtype=torch.long).to(self.device)
                     if self.owners else None)

    def join(self, flags: Sequence[bool]) -> None:
        """Rows joined the engine's batch: ``flags[i]`` says whether new row ``i`` has a
        twin (the batch received their twins' rows at the end)."""
        self.flags.extend(bool(f) for f in flags)
        self._update()

    def select(self, keep: Sequence[int]) -> list[int]:
        """The engine keeps its rows ``keep``; return the batch rows to keep (those rows,
        then the twins of the kept owners) and forget the other twins."""
        B = len(self.flags)
        twin_of = {b: j for j, b in enumerate(self.owners)}
        rows = list(keep) + [B + twin_of[b] for b in keep if b in twin_of]
        self.flags = [self.flags[b] for b in keep]
        self._update()
        return rows

    def base_logits(self, logits: torch.Tensor, B: int) -> torch.Tensor:
        """The reference logits ``(B, V)`` from the forward's ``logits (B + J, V)``: the
        engine rows' own, with each owner's row replaced by its twin's."""
        fwd = logits[:B]
        if self._pos is None:
            return fwd
        return fwd.index_copy(0, self._pos, logits[B:])

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B + J,)``: the engine rows' sampled ``tokens (B,)`` and, for every twin,
        its owner's token."""
        if self._pos is None:
            return tokens
        return torch.cat([tokens, tokens.index_select(0, self._pos)])


__all__ = ["UnsteeredTwins", "wants_twin"]
