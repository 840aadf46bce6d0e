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

from processors.base import Processor, ProcessorEnv, StepContext, check_keys, get_number
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
        used = [s is not None for s in specs]
        self._active = any(used)
        dev = self.device
        self.rows = torch.tensor(used, dtype=torch.bool, device=dev).view(-1, 1)  # (B,1)
        # Rows without the processor get τ = +inf: never "confident", never touched.
        self.tau = torch.tensor(
            [s.tau if s else float("inf") for s in specs], dtype=torch.float32, device=dev
        ).view(-1, 1)
        self.gamma = torch.tensor(
            [s.gamma if s else 0.0 for s in specs], dtype=torch.float32, device=dev
        ).view(-1, 1)

    # The stack may hand apply_ a tensor it owns (processors.stack: in-place stages).
    in_place = True

    def apply(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        t, new_t = self._targets(ctx, logits)
        return logits.scatter(1, t, new_t)

    def apply_(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` writing into ``logits (B, V)``, which the caller owns (no copy;
        everything is read before the one column per row is written)."""
        t, new_t = self._targets(ctx, logits)
        return logits.scatter_(1, t, new_t)

    def _targets(
        self, ctx: StepContext, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, value)`` ``(B, 1)``: the column each row writes and its new value."""
        base = ctx.base_logits.float()  # (B, V)
        top_vals = base.topk(2, dim=-1).values  # (B, 2); values are tie-safe, indices not
        t = base.argmax(dim=-1, keepdim=True)  # (B, 1) the frozen model's (greedy) choice
        m0 = top_vals[:, :1] - top_vals[:, 1:]  # (B, 1) base margin ≥ 0
        p0 = torch.exp(top_vals[:, :1] - torch.logsumexp(base, dim=-1, keepdim=True))  # (B,1)
        confident = p0 >= self.tau  # (B, 1); False for rows without the processor
        s_vals, s_idx = logits.topk(2, dim=-1)  # (B, 2) steered
        best_other = torch.where(s_idx[:, :1] == t, s_vals[:, 1:], s_vals[:, :1])  # (B, 1)
        current = logits.gather(1, t)  # (B, 1)
        target = best_other + self.gamma * m0
        acted = confident & (current < target)  # (B, 1)
        new_t = torch.where(acted, target, current)
        if ctx.want_stats:
            # A negative flip prevented: confident, and steering had moved the argmax away.
            flip = confident & (s_vals[:, :1] > current)
            rows = self.rows.view(-1)
            for name, value in (
                ("margin_confident", confident),
                ("margin_acted", acted),
                ("margin_flip_prevented", flip),
            ):
                # Merge per row: another stage's margin instance may own other rows of
                # this batch (different stack depths), and its values must survive.
                prev = ctx.stats.get(name)
                if prev is None:
                    prev = torch.full_like(rows, math.nan, dtype=torch.float32)
                ctx.stats[name] = torch.where(rows, value.float().view(-1), prev)
        return t, new_t.to(logits.dtype)


register(MarginCalibration)
