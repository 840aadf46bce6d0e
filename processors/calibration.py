"""Margin calibration: keep steering from flipping tokens the frozen model is sure of.

After "Mitigating Negative Flips via Margin Preserving Training", carried to decoding. A
*negative flip* is a step where the frozen model was confident in token ``t`` and the
steered distribution no longer ranks ``t`` first. For each row using the processor:

* ``t = argmax base_logits``, ``p0(t)`` its base probability,
  ``m0 = base_logits[t] − max_{j≠t} base_logits[j]`` the base margin (≥ 0);
* where ``p0(t) ≥ τ``: ``logits[t] ← max(logits[t], max_{j≠t} logits[j] + γ·m0)``.

Only ``logits[t]`` is ever raised, so the steered ranking of every other token is kept.
With ``γ = 0`` the confident token is only guaranteed to tie for first (greedy decoding
then keeps ``t`` whenever it has the lower id, so prefer ``γ > 0``); with ``γ = 1`` the
steered margin is at least the frozen model's. Rows where the base model is unsure
(``p0(t) < τ``) are left to the steering. It guards what runs *before* it in the stack,
so it belongs last (the validator warns otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from processors.base import (
    Processor,
    ProcessorEnv,
    RowSlots,
    StepContext,
    check_keys,
    get_number,
)
from processors.stack import register

DEFAULT_TAU = 0.5
DEFAULT_GAMMA = 1.0


@dataclass(frozen=True)
class MarginSpec:
    """Validated margin entry: confidence threshold τ and margin fraction γ."""

    tau: float
    gamma: float


class MarginCalibration(Processor[MarginSpec]):
    """Raise the frozen model's confident token back to first place.

    Example:
        >>> import torch
        >>> from processors.base import ProcessorEnv, StepContext
        >>> spec = MarginCalibration.validate({"tau": 0.5, "gamma": 1.0}, ProcessorEnv(4))
        >>> p = MarginCalibration(torch.device("cpu"), 4)
        >>> p.update_state([spec])
        >>> base = torch.tensor([[4.0, 1.0, 0.0, 0.0]])     # confident in token 0, m0 = 3
        >>> steered = torch.tensor([[4.0, 6.0, 0.0, 0.0]])  # steering flipped it to token 1
        >>> p.apply(StepContext(base_logits=base, last_tokens=torch.full((1, 2), -1)), steered)
        tensor([[9., 6., 0., 0.]])
    """

    type_name = "margin"

    @classmethod
    def validate(cls, params: Mapping[str, Any], env: ProcessorEnv) -> MarginSpec:
        check_keys(params, {"tau", "gamma"})
        tau = get_number(params, "tau", DEFAULT_TAU, lo=0.0, hi=1.0, lo_open=True)
        gamma = get_number(params, "gamma", DEFAULT_GAMMA, lo=0.0, hi=1.0)
        return MarginSpec(tau, gamma)

    def update_state(self, specs: Sequence[MarginSpec | None]) -> None:
        self.slots = RowSlots([s is not None for s in specs], self.device)
        self._active = self.slots.k > 0
        mine = [s for s in specs if s is not None]
        # One upload: τ and γ of the rows that use the processor, (k, 2).
        table = torch.tensor([[s.tau, s.gamma] for s in mine], dtype=torch.float32)
        table = table.view(-1, 2).to(self.device)
        self.tau, self.gamma = table[:, 0:1], table[:, 1:2]  # (k, 1) each

    def select(self, keep: Sequence[int], index: torch.Tensor) -> bool:
        """Rows left: τ and γ follow the kept rows on the device (no upload)."""
        sel = self.slots.select(keep, index)
        self._active = self.slots.k > 0
        self.tau, self.gamma = self.tau[sel], self.gamma[sel]
        return True

    # The stack may hand apply_ a tensor it owns (processors.stack: in-place stages).
    in_place = True

    def apply(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        return self.apply_(ctx, logits.clone())

    def apply_(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` writing into ``logits (B, V)``, which the caller owns (no copy).

        Column ``t`` of each of the processor's rows is set to ``-inf`` to take the best
        other steered logit (a masked ``amax``, several times cheaper than ``topk(2)`` on
        the CPU) and then written with its final value, so nothing else changes.
        """
        whole = self.slots.index is None
        steered = logits if whole else self.slots.gather(logits)  # (k, V), ours
        t, new_t = self._targets(ctx, steered)  # (k, 1) each
        if whole:
            return logits.scatter_(1, t, new_t)
        # Flat positions row·V + t of the compact rows' one column each.
        assert self.slots.index is not None
        flat = self.slots.index.view(-1, 1) * logits.shape[1] + t
        logits.view(-1).index_copy_(0, flat.view(-1), new_t.view(-1))
        return logits

    def _targets(
        self, ctx: StepContext, steered: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, value)`` ``(k, 1)``: the column each compact row writes and its value.

        ``steered (k, V)``: the processor's rows of the steered logits, a tensor the
        caller owns (column ``t`` is overwritten with ``-inf``; the caller writes it
        back with ``value``). Only the ``k`` rows that use the processor are read. Cost:
        a max, a ``log_softmax``, one ``(k, V)`` copy and two ``amax`` of ``(k, V)``
        (``max`` + masked ``amax`` instead of ``topk(2)`` and ``argmax``,
        ``log_softmax`` instead of ``logsumexp``: each several times cheaper on the CPU).
        """
        base = self.slots.gather(ctx.base_logits).float()  # (k, V)
        # The frozen model's (greedy) choice; max gives the first maximal index, as argmax.
        top, t = base.max(dim=-1, keepdim=True)  # (k, 1) each
        second = base.scatter(1, t, -math.inf).amax(dim=-1, keepdim=True)  # max_{j≠t} base
        m0 = top - second  # (k, 1) base margin ≥ 0
        p0 = base.log_softmax(dim=-1).gather(1, t).exp()  # (k, 1)
        confident = p0 >= self.tau  # (k, 1)
        current = steered.gather(1, t)  # (k, 1)
        best_other = steered.scatter_(1, t, -math.inf).amax(dim=-1, keepdim=True)
        target = best_other + self.gamma * m0
        acted = confident & (current < target)  # (k, 1)
        new_t = torch.where(acted, target, current)
        if ctx.want_stats:
            # A negative flip prevented: confident, and steering had moved the argmax away.
            flip = confident & (best_other > current)
            B = ctx.base_logits.shape[0]
            for name, value in (
                ("margin_confident", confident),
                ("margin_acted", acted),
                ("margin_flip_prevented", flip),
            ):
                # Merge per row: another stage's margin instance may own other rows of
                # this batch (different stack depths), and its values must survive.
                prev = ctx.stats.get(name)
                if prev is None:
                    prev = torch.full((B,), math.nan, dtype=torch.float32, device=base.device)
                col = value.float().view(-1)
                ctx.stats[name] = col if self.slots.index is None else \
                    prev.index_copy(0, self.slots.index, col)
        return t, new_t.to(steered.dtype)


register(MarginCalibration)
