"""Per-row sampling: penalties, EOS control, hard bans, temperature, truncation, seeds.

All per-row settings are ``(B, 1)`` tensors rebuilt only when the batch composition
changes (``update_state``); ``sample`` is tensor code with no host sync. Order:
repetition penalty (prompt + output tokens, as in ``transformers``) → presence and
frequency penalties (OpenAI semantics, output tokens only:
``logit[j] −= frequency·count[j] + presence·[count[j] > 0]``) → EOS masking
(``min_tokens``/``ignore_eos``) → hard bans (``logit_bias`` of −100, see below) →
greedy rows take the argmax → temperature → top-k → top-p → min-p → exponential race.

What wins. The processor stack (steering, ``margin`` included) shapes the *steered*
distribution — what diagnostics and logprobs report. The sampler then applies the
request's decoding choices on top, so the penalties and EOS blocking can still move
a token that ``margin`` put first: margin guards against *steering*, not against the
decoding settings the user asked for. Hard bans come last of all (after every
processor and every penalty; −inf survives temperature and truncation), so nothing can
undo them.

Temperature. A temperature below :data:`GREEDY_TEMPERATURE` (``1e-6``) is decoded
greedily: ``logits / T`` would overflow float32 for tiny ``T`` (``1e-38`` gave NaN
probabilities and token 0), and at such a ``T`` sampling *is* the argmax unless two
logits are within ``1e-6·|gap|`` of each other.

Reproducibility: every sampled row owns a ``torch.Generator`` seeded from its request's
seed, and draws exactly ``V`` exponentials per step from it. A row's draws therefore
depend only on its own seed and step count, never on which other requests share the
batch. The draw is one small kernel per sampled row (a loop over rows, but no sync);
greedy rows draw nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.types import GREEDY_TEMPERATURE, SamplingParams

__all__ = ["GREEDY_TEMPERATURE", "Sampler", "SamplerRow", "is_greedy", "make_generator"]


def is_greedy(params: SamplingParams) -> bool:
    """Whether a row decodes by argmax: temperature 0, or below :data:`GREEDY_TEMPERATURE`."""
    return params.greedy


@dataclass
class SamplerRow:
    """What the sampler needs to know about one row."""

    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    generated: int  # tokens generated so far
    # (V,) float32 counts of this row's output tokens, kept by the sampler while the row
    # has a presence/frequency penalty (saved here when the batch composition changes).
    counts: torch.Tensor | None = None


class Sampler:
    """Vectorized sampler for one batch composition."""

    def __init__(self, device: torch.device, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.eos_ids = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
        self.rows: list[SamplerRow] = []
        self._counts: torch.Tensor | None = None  # (B, V) output-token counts
        self._eos_cols: torch.Tensor | None = None  # (V,) bool, built once
        self._eos_key: tuple[bool, ...] | None = None
        self._eos_mask: torch.Tensor | None = None

    def update_state(self, rows: Sequence[SamplerRow]) -> None:
        """Rebuild the per-row tensors; called when rows join or leave."""
        if self._counts is not None:  # hand each old row its counts before regrouping
            for b, old in enumerate(self.rows):
                old.counts = self._counts[b].clone()
        self.rows = list(rows)
        dev = self.device
        params = [r.params for r in rows]
        greedy = [is_greedy(p) for p in params]
        pairs = list(zip(params, greedy, strict=True))
        V = self.vocab_size
        # Every per-row parameter in one host table and one upload (issue 20.5): columns
        # greedy, temperature, top_k, top_p, min_p, repetition, presence, frequency.
        # float64 holds top_k (< 2**53) exactly.
        table = torch.tensor(
            [[float(g), 1.0 if g else p.temperature,
              float(min(p.top_k, V) if p.top_k > 0 else V), p.top_p, p.min_p,
              p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
             for p, g in pairs],
            dtype=torch.float64,
        ).view(-1, 8).to(dev)
        self._columns(table)
        self._counts = None
        if self.any_pen:
            zeros = torch.zeros(self.vocab_size, dtype=torch.float32, device=dev)
            self._counts = torch.stack(
                [r.counts if r.counts is not None else zeros for r in rows]
            ) if rows else None  # (B, V)
        self._eos_key = None
        self._eos_mask = None

    def select(self, keep: Sequence[int], index: torch.Tensor) -> None:
        """Rows only left: keep rows ``keep`` (old batch order; ``index (B',)`` their device
        copy). The parameter table, the output-token counts and the EOS-block mask follow
        the kept rows on the device (no upload); the same state as ``update_state`` of the
        kept rows."""
        self.rows = [self.rows[b] for b in keep]
        self._columns(self._table.index_select(0, index))
        if self._counts is not None:
            self._counts = self._counts.index_select(0, index) if self.any_pen else None
        if self._eos_mask is not None and self._eos_key is not None:
            self._eos_mask = self._eos_mask.index_select(0, index)
            self._eos_key = tuple(self._eos_key[b] for b in keep)

    def _columns(self, table: torch.Tensor) -> None:
        """The per-row tensors from the ``(B, 8)`` parameter ``table`` (device) and the
        host flags from ``self.rows``."""
        self._table = table
        params = [r.params for r in self.rows]
        greedy = [is_greedy(p) for p in params]
        pairs = list(zip(params, greedy, strict=True))
        f32 = table.to(torch.float32)

        def col(j: int) -> torch.Tensor:
            return f32[:, j : j + 1]  # (B, 1)

        self.greedy = table[:, 0:1] > 0.5  # (B,1)
        self.all_greedy = all(greedy)
        self.any_greedy = any(greedy)
        self.temperature = col(1)
        self.any_temp = any(not g and p.temperature != 1.0 for p, g in pairs)
        # Rows that draw noise: sampled rows with a generator (greedy rows draw nothing).
        self._draws = [
            (b, r.generator)
            for b, (r, g) in enumerate(zip(self.rows, greedy, strict=True))
            if not g and r.generator is not None
        ]
        sampled = [p for p, g in pairs if not g]
        self.top_k_max = max((p.top_k for p in sampled if p.top_k > 0), default=0)
        self.top_k_max = min(self.top_k_max, self.vocab_size)
        self.top_k = table[:, 2:3].to(torch.long)
        self.any_top_p = any(p.top_p < 1.0 for p in sampled)
        self.top_p = col(3)
        self.any_min_p = any(p.min_p > 0.0 for p in sampled)
        self.min_p = col(4)
        self.any_rep = any(p.repetition_penalty != 1.0 for p in params)
        self.rep = col(5)
        self.any_pen = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
        self.presence = col(6)  # (B,1)
        self.frequency = col(7)  # (B,1)
        self._bans: tuple[torch.Tensor, torch.Tensor] | None = None
        self.any_eos_block = self.eos_ids.numel() > 0 and any(
            p.ignore_eos or p.min_tokens > 0 for p in params
        )
        if self._eos_cols is None:
            self._eos_cols = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            self._eos_cols[self.eos_ids] = True

    def _eos_block_mask(self) -> torch.Tensor:
        """``(B, V)`` bool: EOS columns of rows that may not emit EOS this step.

        Which rows are blocked changes only when a row reaches its ``min_tokens``, so the
        mask is rebuilt only then (host-side counters, no device sync).
        """
        key = tuple(r.params.ignore_eos or r.generated < r.params.min_tokens for r in self.rows)
        if key != self._eos_key or self._eos_mask is None:
            assert self._eos_cols is not None  # set by update_state
            rows = torch.tensor(key, dtype=torch.bool, device=self.device).view(-1, 1)
            self._eos_key, self._eos_mask = key, rows & self._eos_cols
        return self._eos_mask

    def sample(
        self,
        logits: torch.Tensor,
        seen: torch.Tensor | None,
        bans: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Pick one token per row.

        Args:
            logits: ``(B, V)`` float32 steered logits (not modified).
            seen: ``(B, V)`` bool, tokens present in the row's prompt or output; needed
                only when some row has a repetition penalty.
            bans: ``(rows (N,), token ids (N,))`` int64, tokens that may not be emitted
                (``ProcessorStack.bans``); set to ``-inf`` after every penalty.

        Returns:
            ``(B,)`` int64 token ids.
        """
        tokens = self._pick(logits, seen, bans)
        if self._counts is not None:
            self._counts.scatter_add_(
                1, tokens.view(-1, 1), torch.ones_like(tokens, dtype=torch.float32).view(-1, 1)
            )
        return tokens

    def _pick(
        self,
        logits: torch.Tensor,
        seen: torch.Tensor | None,
        bans: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        B, V = logits.shape
        # ``logits`` is the caller's (not modified); once a step has made a fresh tensor
        # (``owned``), the later steps write into it instead of allocating another (B, V)
        # — in-place ops give the same bits as their out-of-place forms.
        owned = False
        if self.any_rep and seen is not None:
            penalized = torch.where(logits > 0, logits / self.rep, logits * self.rep)
            logits, owned = torch.where(seen, penalized, logits), True
        if self._counts is not None:
            logits = (
                logits
                - self.frequency * self._counts
                - self.presence * (self._counts > 0).to(logits.dtype)
            )
            owned = True
        if self.any_eos_block:
            mask = self._eos_block_mask()
            logits = logits.masked_fill_(mask, -math.inf) if owned else \
                logits.masked_fill(mask, -math.inf)
            owned = True
        if bans is not None and bans[0].numel():
            ninf = torch.tensor(-math.inf, device=logits.device)
            logits = logits.index_put_(bans, ninf) if owned else logits.index_put(bans, ninf)
            owned = True
        greedy_tokens = logits.argmax(dim=-1)
        if self.all_greedy:
            return greedy_tokens
        if self.any_temp:
            logits = logits.div_(self.temperature) if owned else logits / self.temperature
            owned = True
        if self.top_k_max > 0:
            top_vals = logits.topk(self.top_k_max, dim=-1).values  # (B, Kmax)
            kth = top_vals.gather(1, (self.top_k.clamp(max=self.top_k_max) - 1))
            kth = torch.where(self.top_k >= V, torch.full_like(kth, -math.inf), kth)
            drop = logits < kth
            logits = logits.masked_fill_(drop, -math.inf) if owned else \
                logits.masked_fill(drop, -math.inf)
        if self.any_top_p:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            drop = (before > self.top_p) & (self.top_p < 1.0)
            drop[:, 0] = False  # always keep the most likely token
            sorted_logits = sorted_logits.masked_fill_(drop, -math.inf)
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)  # fresh: written in place from here on
        if self.any_min_p:
            floor = self.min_p * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill_(probs < floor, 0.0)
        # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) samples i with prob ∝ p_i.
        noise = torch.ones_like(probs)
        for b, gen in self._draws:
            noise[b].exponential_(generator=gen)
        sampled = probs.div_(noise).argmax(dim=-1)
        if self.any_greedy:
            return torch.where(self.greedy.view(-1), greedy_tokens, sampled)
        return sampled


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A per-request generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
