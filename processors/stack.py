"""The ordered per-request processor stack, batched across requests.

Every request lists its steering entries in the order they must run. Requests in one
batch may list different methods in different orders, yet ``apply`` must stay a fixed
sequence of tensor ops. The stack is therefore organised by *stage*: stage ``k`` holds,
for each processor type, one instance that owns the rows whose ``k``-th entry has that
type. Within a stage the instances touch disjoint rows, so running them one after the
other equals running each row's own ``k``-th entry; stages run in order. The number of
stages is the longest stack in the batch (bounded by a setting).

Entries whose type acts inside the forward pass (``control``) are registered with
``in_forward=True``: they are validated here but never become logits stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from processors.base import ParamError, Processor, ProcessorEnv, StepContext

_REGISTRY: dict[str, type[Processor[Any]]] = {}
_IN_FORWARD: set[str] = set()

def register(cls: type[Processor[Any]], *, in_forward: bool = False) -> type[Processor[Any]]:
    """Make ``cls`` available as ``steering[].type == cls.type_name``."""
    _REGISTRY[cls.type_name] = cls
    if in_forward:
        _IN_FORWARD.add(cls.type_name)
    return cls


def acts_in_forward(type_name: str) -> bool:
    """Whether entries of ``type_name`` act inside the forward pass (no logits stage)."""
    return type_name in _IN_FORWARD


def registered_types() -> list[str]:
    """The ``type`` strings this build accepts, sorted."""
    return sorted(_REGISTRY)


def processor_class(type_name: str) -> type[Processor[Any]]:
    """Look up a registered processor class (KeyError if unknown)."""
    return _REGISTRY[type_name]


@dataclass(frozen=True)
class StackEntry:
    """One validated steering entry: its type and the processor's frozen spec."""

    type: str
    spec: Any


def parse_stack(
    entries: Sequence[Mapping[str, Any]], env: ProcessorEnv, *, max_len: int
) -> tuple[StackEntry, ...]:
    """Validate a request's ``steering`` list; raise ParamError naming ``steering.i.*``."""
    if len(entries) > max_len:
        raise ParamError(
            "steering", f"at most {max_len} steering entries are allowed, got {len(entries)}"
        )
    parsed: list[StackEntry] = []
    for i, entry in enumerate(entries):
        prefix = f"steering.{i}"
        if not isinstance(entry, Mapping):
            raise ParamError(prefix, f"each steering entry must be an object, got {entry!r}")
        type_name = entry.get("type")
        if not isinstance(type_name, str):
            raise ParamError(f"{prefix}.type", "each steering entry needs a string 'type'")
        cls = _REGISTRY.get(type_name)
        if cls is None:
            known = ", ".join(registered_types())
            raise ParamError(
                f"{prefix}.type", f"unknown steering type '{type_name}' (available: {known})"
            )
        try:
            spec = cls.validate(entry, env)
        except ParamError as err:
            raise err.with_prefix(prefix) from None
        if any(e.type == type_name and e.spec == spec for e in parsed):
            raise ParamError(
                prefix, f"this '{type_name}' entry repeats an earlier one exactly; list it once"
            )
        if type_name in _SINGLETONS and any(e.type == type_name for e in parsed):
            raise ParamError(prefix, f"at most one '{type_name}' entry per request")
        parsed.append(StackEntry(type_name, spec))
    return tuple(parsed)


# Types of which a second entry has no meaning (a second guard after the first is a no-op
# or contradicts it).
_SINGLETONS = {"margin", "fusion", "guard"}


def stack_warnings(stack: Sequence[StackEntry]) -> list[str]:
    """Legal but probably unintended combinations, reported to the user as warnings."""
    warnings: list[str] = []
    types = [e.type for e in stack]
    # margin and guard are stack-level guards: each needs steering to guard (before it, or
    # a control vector anywhere: those act in the forward pass, so the reference is the
    # unsteered twin's logits, server.engine.twins) and belongs after the logits entries.
    # The fluency guard belongs after margin (it guards the calibrated distribution).
    warnings += _guard_warnings(types, "margin", "put 'margin' last", also_after={"guard"})
    warnings += _guard_warnings(types, "guard", "put 'guard' last (after 'margin')")
    return warnings


def _guard_warnings(
    types: Sequence[str], name: str, fix: str, also_after: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """Placement warnings for the stack-level guard ``name`` (``margin`` or ``guard``):
    nothing to guard, or logits entries after it (other than ``also_after``)."""
    if name not in types:
        return []
    i = types.index(name)
    out: list[str] = []
    guarded = [t for t in types[:i] if t != "margin"] + [t for t in types if t in _IN_FORWARD]
    if not guarded:
        out.append(f"steering: the '{name}' entry has no steering before it to guard; it has "
                   "no effect")
    if any(t not in _IN_FORWARD and t not in also_after for t in types[i + 1 :]):
        out.append(f"steering: entries after '{name}' are not guarded by it; {fix}")
    return out


class ProcessorStack:
    """All logits processors of one batch composition, grouped in stages.

    Example:
        >>> import torch
        >>> from processors.logit_bias import LogitBias
        >>> env = ProcessorEnv(vocab_size=4)
        >>> rows = [parse_stack([{"type": "logit_bias", "bias": {"1": 5.0}}], env, max_len=4), ()]
        >>> stack = ProcessorStack(torch.device("cpu"), 4)
        >>> stack.update_state(rows)
        >>> logits = torch.zeros(2, 4)
        >>> ctx = StepContext(base_logits=logits, last_tokens=torch.full((2, 2), -1))
        >>> stack.apply(ctx, logits)
        tensor([[0., 5., 0., 0.],
                [0., 0., 0., 0.]])
    """

    def __init__(
        self,
        device: torch.device,
        vocab_size: int,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.device = device
        self.vocab_size = vocab_size
        # Server-wide processor options (Processor.configure), e.g. fusion's memory budget.
        self.options: Mapping[str, Any] = dict(options or {})
        self.stages: list[list[Processor[Any]]] = []
        # ``(rows (N,), token ids (N,))`` int64 banned tokens of the batch, or None.
        # Not applied by ``apply`` (the steered logits stay finite for diagnostics and
        # logprobs): the sampler sets them to -inf after its penalties, last of all.
        self.bans: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rows: list[tuple[StackEntry, ...]] = []  # each row's stack (select rebuilds)

    def update_state(self, rows: Sequence[Sequence[StackEntry]]) -> None:
        """Build the stages for a batch whose row ``b`` has the stack ``rows[b]``."""
        self._rows = [tuple(r) for r in rows]
        logit_rows = [[e for e in row if e.type not in _IN_FORWARD] for row in rows]
        depth = max((len(r) for r in logit_rows), default=0)
        stages: list[list[Processor[Any]]] = []
        for k in range(depth):
            types = sorted({r[k].type for r in logit_rows if len(r) > k})
            stage: list[Processor[Any]] = []
            for type_name in types:
                proc = self._build(k, type_name, logit_rows)
                if proc.active:
                    stage.append(proc)
            stages.append(stage)
        self.stages = stages
        self._set_bans(rows)

    def _build(
        self, k: int, type_name: str, logit_rows: Sequence[Sequence[StackEntry]]
    ) -> Processor[Any]:
        """The stage-``k`` instance of ``type_name`` for the batch's ``logit_rows``."""
        specs = [r[k].spec if len(r) > k and r[k].type == type_name else None
                 for r in logit_rows]
        proc = _REGISTRY[type_name](self.device, self.vocab_size)
        proc.configure(self.options)
        proc.update_state(specs)
        return proc

    def _set_bans(self, rows: Sequence[Sequence[StackEntry]]) -> None:
        """Hard masks of every entry (bans), applied by the sampler after its penalties."""
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for b, row in enumerate(rows):
            for e in row:
                ids = _REGISTRY[e.type].hard_mask(e.spec)
                ban_rows.extend([b] * len(ids))
                ban_ids.extend(ids)
        self.bans = None
        if ban_ids:
            self.bans = (
                torch.tensor(ban_rows, dtype=torch.long, device=self.device),
                torch.tensor(ban_ids, dtype=torch.long, device=self.device),
            )

    def select(self, keep: Sequence[int], index: torch.Tensor) -> None:
        """Rows only left the batch: keep rows ``keep`` (old batch order; ``index (B',)``
        their device copy). Each processor follows the kept rows with its own
        :meth:`Processor.select` (device indexing, no upload) or, if it has none, is
        rebuilt from the kept rows' specs; the result equals ``update_state`` of the kept
        rows' stacks (tests/unit/test_stack_select.py)."""
        rows = [self._rows[b] for b in keep]
        had_bans = self.bans is not None
        logit_rows = [[e for e in row if e.type not in _IN_FORWARD] for row in rows]
        self._rows = rows
        stages: list[list[Processor[Any]]] = []
        for k, stage in enumerate(self.stages):  # stage k holds the rows' k-th entries
            kept: list[Processor[Any]] = []
            for proc in stage:
                if not proc.select(keep, index):
                    proc = self._build(k, proc.type_name, logit_rows)
                if proc.active:
                    kept.append(proc)
            stages.append(kept)
        self.stages = stages
        if had_bans:  # rare: re-upload the kept rows' bans (the mask is sparse per row)
            self._set_bans(rows)

    @property
    def active(self) -> bool:
        """Whether any row of the batch has a logits processor."""
        return any(self.stages)

    def apply(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        """Run every stage in order on ``logits (B, V)`` and return the steered logits.

        ``logits`` (and ``ctx.base_logits``, which may be the same tensor) are never
        written. A processor with ``in_place = True`` has an ``apply_`` that writes into
        a tensor the stack owns: the first output of an out-of-place processor, or one
        copy made for the first in-place one; so a stack of k such processors makes one
        ``(B, V)`` copy instead of k. A processor with ``fresh_apply = True`` (``ngram``)
        computes its result in a buffer of its own anyway, so before the stack owns a
        tensor its out-of-place ``apply`` runs instead of a copy plus ``apply_``.
        """
        owned = False
        for stage in self.stages:
            for proc in stage:
                apply_ = getattr(proc, "apply_", None) if getattr(proc, "in_place", False) \
                    else None
                if apply_ is not None and (owned or not getattr(proc, "fresh_apply", False)):
                    if not owned:
                        logits, owned = logits.clone(), True
                    logits = apply_(ctx, logits)
                else:
                    out = proc.apply(ctx, logits)
                    # A fresh tensor is ours to write; the input or the base never is.
                    owned = owned or (out is not logits and out is not ctx.base_logits)
                    logits = out
        return logits

    def processors(self) -> list[Processor[Any]]:
        """All processor instances, stage by stage (for diagnostics and tests)."""
        return [p for stage in self.stages for p in stage]
