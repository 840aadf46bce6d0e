"""Per-request additive logit bias with OpenAI semantics.

``{"type": "logit_bias", "bias": {"<token id>": value}}`` adds ``value`` (in
``[-100, 100]``) to that token's logit: about ``+100`` forces it. A value of exactly
``-100`` is a *ban*, a hard constraint: besides adding −100 in stack order, the token
is set to ``-inf`` after every processor of the stack and after the sampler's penalties
(:meth:`LogitBias.hard_mask`, ``ProcessorStack.bans``), so a later ``margin`` entry
cannot restore it. Other values (``+100`` included) are soft biases like any other
processor's, which later stages may override. It is the simplest processor and
exercises the whole framework.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from processors.base import (
    ParamError,
    Processor,
    ProcessorEnv,
    StepContext,
    check_keys,
    check_number,
)
from processors.stack import register

MAX_BIAS_ENTRIES = 1024
BAN = -100.0  # a bias of exactly this value is a hard ban


@dataclass(frozen=True)
class LogitBiasSpec:
    """Validated bias of one request: parallel tuples of token ids and values."""

    token_ids: tuple[int, ...]
    values: tuple[float, ...]


class LogitBias(Processor[LogitBiasSpec]):
    """Add a sparse per-row bias to the logits.

    The batch's biases are kept as three flat tensors (row index, token id, value) and
    added with one ``index_put`` per step: O(entries), independent of ``B·V``.

    Example:
        >>> import torch
        >>> from processors.base import ProcessorEnv, StepContext
        >>> spec = LogitBias.validate({"bias": {"2": -100}}, ProcessorEnv(vocab_size=3))
        >>> p = LogitBias(torch.device("cpu"), 3)
        >>> p.update_state([spec, None])
        >>> x = torch.zeros(2, 3)
        >>> p.apply(StepContext(base_logits=x, last_tokens=torch.full((2, 2), -1)), x)
        tensor([[   0.,    0., -100.],
                [   0.,    0.,    0.]])
    """

    type_name = "logit_bias"

    @classmethod
    def validate(cls, params: Mapping[str, Any], env: ProcessorEnv) -> LogitBiasSpec:
        check_keys(params, {"bias"})
        bias = params.get("bias")
        if not isinstance(bias, Mapping) or not bias:
            raise ParamError("bias", "'bias' must be a non-empty object {token_id: value}")
        if len(bias) > MAX_BIAS_ENTRIES:
            raise ParamError("bias", f"at most {MAX_BIAS_ENTRIES} entries, got {len(bias)}")
        ids: list[int] = []
        values: list[float] = []
        for key, value in bias.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise ParamError("bias", f"keys must be token ids, got {key!r}") from None
            if not 0 <= token < env.vocab_size:
                raise ParamError(
                    "bias", f"token id {token} is outside the vocabulary [0, {env.vocab_size})"
                )
            ids.append(token)
            values.append(check_number(value, f"bias.{key}", lo=-100.0, hi=100.0))
        if sum(v <= BAN for v in values) >= env.vocab_size:
            raise ParamError("bias", "'bias' bans every token of the vocabulary")
        return LogitBiasSpec(tuple(ids), tuple(values))

    @classmethod
    def hard_mask(cls, spec: LogitBiasSpec) -> tuple[int, ...]:
        """The banned token ids: those with a bias of exactly −100."""
        return tuple(t for t, v in zip(spec.token_ids, spec.values, strict=True) if v <= BAN)

    def update_state(self, specs: Sequence[LogitBiasSpec | None]) -> None:
        rows: list[int] = []
        ids: list[int] = []
        vals: list[float] = []
        for b, spec in enumerate(specs):
            if spec is None:
                continue
            rows.extend([b] * len(spec.token_ids))
            ids.extend(spec.token_ids)
            vals.extend(spec.values)
        self._active = bool(rows)
        self._batch = len(specs)
        self._has = [s is not None for s in specs]  # rows with entries
        # One upload (float64 holds the ids exactly), split on the device.
        table = torch.tensor([rows, ids, vals], dtype=torch.float64).to(self.device)
        self.rows = table[0].long()  # (N,)
        self.ids = table[1].long()  # (N,)
        self.vals = table[2].float()  # (N,)

    def select(self, keep: Sequence[int], index: torch.Tensor) -> bool:
        """Rows left: the entries follow their rows on the device (no upload). Entries of
        rows that left stay in the tables as no-ops: row 0, value ``-0.0`` (``x + -0.0``
        is ``x`` bit for bit, ``-0.0`` and NaN included) until the next rebuild."""
        new_of_old = torch.full((self._batch,), -1, dtype=torch.long, device=index.device)
        new_of_old[index] = torch.arange(len(keep), device=index.device)
        rows = new_of_old[self.rows]  # (N,) new row or -1
        gone = rows < 0
        self.rows = rows.clamp_min(0)
        self.vals = torch.where(gone, -0.0, self.vals)
        self._batch = len(keep)
        self._has = [self._has[b] for b in keep]
        self._active = any(self._has)
        return True

    # The stack may hand apply_ a tensor it owns (processors.stack: in-place stages).
    in_place = True

    def apply(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        # Out of place: ``logits`` may alias ``ctx.base_logits``.
        return logits.index_put((self.rows, self.ids), self.vals, accumulate=True)

    def apply_(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` writing into ``logits (B, V)``, which the caller owns (no copy)."""
        return logits.index_put_((self.rows, self.ids), self.vals, accumulate=True)


register(LogitBias)
