"""The processor interface every steering method implements.

A processor turns the main model's next-token logits ``(B, V)`` into steered logits for
the rows of the batch that asked for it and leaves every other row bit-for-bit alone.

Life cycle (DESIGN.md, "Processor interface"):

* ``validate(params, env)`` — classmethod, called once per request at the HTTP
  boundary. It checks meaning (ranges, artifact names) and returns a frozen *spec*
  object. It raises :class:`ParamError` naming the offending parameter.
* ``update_state(specs)`` — host side, called when the batch composition changes
  (a row joins or leaves). ``specs[b]`` is the spec of row ``b`` or ``None`` when that
  row does not use this processor. Python loops over rows are allowed here only: the
  per-row parameters become ``[B, 1]`` device tensors.
* ``apply(ctx, logits)`` — every decode step; pure tensor code over the whole batch:
  no loop over rows or vocabulary, no ``.item()``/``.tolist()``, no host sync.
* ``active`` — ``False`` when no row uses the processor; the stack then skips it, so
  an unused method costs nothing.
* ``select(keep, index)`` — optional: rows only *left* the batch; keep rows ``keep``
  (old batch order), given also as the device tensor ``index (B',)``. A processor that
  keeps its per-row tables on the device indexes them with ``index`` (no host→device
  upload) and returns True; the default returns False, and the stack then rebuilds it
  with ``update_state`` from the kept rows' specs (the same result, with uploads).
  :class:`RowSlots` does the index arithmetic for processors that work on a subset of
  the rows.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch

if TYPE_CHECKING:  # the artifact types import this module
    from processors.control import ControlVector
    from processors.ngram import NgramPrior


class ParamError(ValueError):
    """A request parameter has a bad value.

    ``param`` is the dotted path of the parameter as the user wrote it, e.g.
    ``steering.0.lambda``; the HTTP layer turns this into a 400 with that ``param``.
    ``status`` lets a validator say "unknown artifact" (404) or "too large" (413).
    """

    def __init__(self, param: str, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.status = status

    def with_prefix(self, prefix: str) -> ParamError:
        """Return the same error with ``prefix.`` prepended to ``param``."""
        param = f"{prefix}.{self.param}" if self.param else prefix
        return ParamError(param, self.message, status=self.status)


@dataclass(frozen=True)
class ModelGeometry:
    """The serving model's shape as control vectors see it: ``num_layers`` decoder
    blocks, each with a ``hidden_size``-wide output."""

    num_layers: int
    hidden_size: int


@dataclass(frozen=True)
class ProcessorEnv:
    """What validators may consult: the serving model's vocabulary and the artifacts.

    Every lookup is a typed field (a misspelled name is a type error, not a silent
    empty lookup). The server owns the objects behind them (the artifact registries are
    ``Mapping`` views that refresh themselves); processors only read from them.

    Attributes:
        vocab_size: the main model's output rows ``V``.
        tokenizer_fingerprint: the serving tokenizer's fingerprint (a prior built with
            another tokenizer is refused).
        priors: n-gram style priors by name (``processors.ngram``).
        control_vectors: control vectors by name (``processors.control``).
        aux_roles: the auxiliary (fusion) models, name → ``"small_base"`` | ``"expert"``
            (``processors.fusion``).
        geometry: the model's blocks and hidden size, or None when unknown (a vector is
            then only checked against itself).
    """

    vocab_size: int
    tokenizer_fingerprint: str = ""
    priors: Mapping[str, NgramPrior] = field(default_factory=dict)
    control_vectors: Mapping[str, ControlVector] = field(default_factory=dict)
    aux_roles: Mapping[str, str] = field(default_factory=dict)
    geometry: ModelGeometry | None = None


@dataclass
class StepContext:
    """Per-step tensors shared by all processors of one batch.

    Attributes:
        base_logits: ``(B, V)`` float32, the main model's logits as they came out of the
            forward pass (before any processor). The reference for calibration and
            diagnostics; processors must not modify it in place.
        last_tokens: ``(B, 2)`` int64, the last two tokens of each row's sequence
            (prompt followed by generated tokens), oldest first; ``-1`` where the
            sequence is shorter than two tokens.
        stats: the one channel for per-step diagnostics, name → float32 tensor, either
            ``(B,)`` (one value per row) or ``(B, V)`` (one value per candidate token:
            a processor cannot know the sampled token in ``apply``, so the engine reads
            such a table at the token it samples, :meth:`row_stats`). NaN means
            "undefined for this row". Only filled when ``want_stats`` is true, so unused
            diagnostics are free.
        want_stats: whether any row of the batch asked for diagnostics.
        aux_logits: the auxiliary (fusion) models' logits of this step, name →
            ``(B, V)``; empty when no row of the batch uses fusion.
    """

    base_logits: torch.Tensor
    last_tokens: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    want_stats: bool = False
    aux_logits: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def row_stats(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every stat as ``(B,)``: per-candidate ``(B, V)`` tables read at the sampled
        ``tokens (B,)`` (a gather on the device: no host sync)."""
        idx = tokens.view(-1, 1)
        return {
            name: value.gather(1, idx).squeeze(1) if value.dim() == 2 else value
            for name, value in self.stats.items()
        }


SpecT = TypeVar("SpecT")


class Processor(abc.ABC, Generic[SpecT]):
    """Base class of the logits processors (see the module docstring for the contract).

    Subclasses set ``type_name`` (the ``steering[].type`` string) and implement
    ``validate``, ``update_state`` and ``apply``.
    """

    type_name: ClassVar[str]

    def __init__(self, device: torch.device, vocab_size: int) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self._active = False

    @classmethod
    @abc.abstractmethod
    def validate(cls, params: Mapping[str, Any], env: ProcessorEnv) -> SpecT:
        """Check one steering entry's parameters and return its frozen spec."""

    @abc.abstractmethod
    def update_state(self, specs: Sequence[SpecT | None]) -> None:
        """Rebuild per-row device tensors for a new batch composition."""

    @abc.abstractmethod
    def apply(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        """Return steered logits ``(B, V)``; rows without a spec must be unchanged."""

    @classmethod
    def hard_mask(cls, spec: SpecT) -> Sequence[int]:
        """Token ids this entry forbids outright (default: none).

        Hard masks are not logits arithmetic: the engine applies them after every
        processor of the stack and after the sampler's penalties, so no later stage
        (``margin``, a repetition penalty) can undo them (``ProcessorStack.bans``).
        """
        return ()

    def configure(self, options: Mapping[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Take server-wide options (from the settings) before ``update_state``.

        ``options`` maps an option name to its value, e.g. ``fusion_memory_budget``;
        processors read only the names they know, so the default ignores them all.
        """

    def select(self, keep: Sequence[int], index: torch.Tensor) -> bool:
        """Rows only left: keep batch rows ``keep`` (host list, old order) whose device
        copy is ``index (B',)`` int64. Return True when the per-row state now follows the
        kept rows (indexed on the device, no upload); False (the default) asks the stack
        to rebuild this processor with ``update_state`` instead."""
        return False

    @property
    def active(self) -> bool:
        """Whether any row of the current batch uses this processor."""
        return self._active


class RowSlots:
    """Which batch rows a processor works on, as a compact row list on the device.

    A processor used by ``k`` of the batch's ``B`` rows keeps its per-row tables as
    ``(k, ...)`` tensors, one row per *used* batch row in batch order, and computes on
    those rows only (gathered with :attr:`index`, written back with ``index_copy_``);
    when every row uses it (:attr:`all_rows`) no gather is needed.

    On a leave step (:meth:`select`) the new compact list is derived on the device from
    the kept rows' index (``pos`` of the kept rows, stably sorted so that used rows come
    first; their count is known on the host): no upload and no host sync. It returns the
    old compact positions of the new compact rows, to index the ``(k, ...)`` tables with.

    Attributes:
        used: host flags, one per batch row.
        k: how many rows are used.
        all_rows: ``k == B``.
        index: ``(k,)`` int64 batch rows of the compact rows (None when ``all_rows``).
        pos: ``(B,)`` int64 compact position of each batch row, ``-1`` where unused.
    """

    def __init__(self, used: Sequence[bool], device: torch.device) -> None:
        self.used = [bool(u) for u in used]
        self.k = sum(self.used)
        self.all_rows = self.k == len(self.used)
        pos, j = [], 0
        for u in self.used:
            pos.append(j if u else -1)
            j += u
        # One upload: batch rows of the compact rows, then each batch row's position.
        rows = [b for b, u in enumerate(self.used) if u]
        both = torch.tensor(rows + pos, dtype=torch.long).to(device)
        self.index: torch.Tensor | None = None if self.all_rows else both[: self.k]
        self.pos = both[self.k :]

    def select(self, keep: Sequence[int], index: torch.Tensor) -> torch.Tensor:
        """Follow the kept rows ``keep`` (``index (B',)`` on the device); return the
        ``(k',)`` old compact positions of the new compact rows, in order."""
        self.used = [self.used[b] for b in keep]
        self.k = sum(self.used)
        self.all_rows = self.k == len(self.used)
        kept = self.pos.index_select(0, index)  # (B',) old compact position or -1
        unused = (kept < 0).to(torch.uint8)
        # Used rows first, in batch order (stable); their count k' is host knowledge.
        rows = torch.sort(unused, stable=True).indices[: self.k]  # (k',)
        self.index = None if self.all_rows else rows
        self.pos = torch.where(kept >= 0, (kept >= 0).cumsum(0) - 1, -1)  # (B',)
        return kept.index_select(0, rows)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The compact rows of ``x (B, ...)`` (``x`` itself when every row is used)."""
        return x if self.index is None else x.index_select(0, self.index)


def check_keys(params: Mapping[str, Any], allowed: set[str]) -> None:
    """Reject keys a steering entry does not define (``type`` is always allowed)."""
    for key in params:
        if key != "type" and key not in allowed:
            known = ", ".join(sorted(allowed))
            raise ParamError(key, f"unknown field '{key}' (known fields: {known})")


def _fmt(x: float) -> str:
    """A bound or value as the user would write it (``1`` not ``1.0``, ``1e-06``)."""
    return f"{x:g}" if math.isfinite(x) else str(x)


def _digits(value: int) -> int:
    """About how many decimal digits ``value`` has (no ``str()``: Python caps it)."""
    return int(abs(value).bit_length() * 0.30103) + 1


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    """``[0, 1]``, ``(0, 100]``, ``>= 0`` or ``> 0`` — the interval a value must lie in."""
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_fmt(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_fmt(hi)}"
    return "finite"


def check_number(
    value: Any,
    param: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    hint: str = "",
) -> float:
    """Validate one real number ``value`` named ``param`` and return it as a float.

    The one number check every processor uses, so every message has the same form
    (STYLE §4): "`lambda` must be in [0, 1], got 1.5". ``hint`` is appended to the
    range message (e.g. how to lift a limit). Overflow-safe: a JSON integer too large
    for a float (``10**400``) is a 400 naming ``param``, never an ``OverflowError``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(param, f"`{param}` must be a number, got {value!r:.60}")
    try:
        x = float(value)
    except OverflowError:
        # Only ints reach here (a float is already a float); say so without printing
        # 400 digits back.
        digits = _digits(value) if isinstance(value, int) else 0
        raise ParamError(
            param,
            f"`{param}` must be {_range_text(lo, hi, lo_open, hi_open)}, got an integer with "
            f"{digits} digits (too large for a float)",
        ) from None
    if not math.isfinite(x):
        raise ParamError(param, f"`{param}` must be finite, got {x}")
    bad_lo = lo is not None and (x < lo or (lo_open and x == lo))
    bad_hi = hi is not None and (x > hi or (hi_open and x == hi))
    if bad_lo or bad_hi:
        extra = f" {hint}" if hint else ""
        raise ParamError(
            param,
            f"`{param}` must be {_range_text(lo, hi, lo_open, hi_open)}, got {_fmt(x)}{extra}",
        )
    return x


def get_number(
    params: Mapping[str, Any],
    key: str,
    default: float,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    hint: str = "",
    param: str | None = None,
) -> float:
    """Read ``params[key]`` (``default`` when absent) with :func:`check_number`.

    ``param`` names the parameter in errors when it differs from ``key`` (e.g.
    ``grid.max`` for the key ``max`` of a nested object).
    """
    return check_number(
        params.get(key, default),
        param or key,
        lo=lo,
        hi=hi,
        lo_open=lo_open,
        hi_open=hi_open,
        hint=hint,
    )


def check_int(
    value: Any, param: str, *, lo: int | None = None, hi: int | None = None
) -> int:
    """Validate an integer in ``[lo, hi]`` (a float such as ``2.0`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(param, f"`{param}` must be an integer, got {value!r:.60}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        shown = str(value) if abs(value) < 10**30 else f"an integer with {_digits(value)} digits"
        lo_f = None if lo is None else float(lo)
        hi_f = None if hi is None else float(hi)
        raise ParamError(
            param, f"`{param}` must be {_range_text(lo_f, hi_f, False, False)}, got {shown}"
        )
    return value


def get_int(
    params: Mapping[str, Any],
    key: str,
    default: int,
    *,
    lo: int | None = None,
    hi: int | None = None,
    param: str | None = None,
) -> int:
    """Read ``params[key]`` (``default`` when absent) with :func:`check_int`."""
    return check_int(params.get(key, default), param or key, lo=lo, hi=hi)


def get_bool(
    params: Mapping[str, Any], key: str, default: bool, *, param: str | None = None
) -> bool:
    """Read a JSON boolean (``1``/``"true"`` are refused: they are usually mistakes)."""
    value = params.get(key, default)
    if not isinstance(value, bool):
        name = param or key
        raise ParamError(name, f"`{name}` must be true or false, got {value!r:.60}")
    return value


ChoiceT = TypeVar("ChoiceT", bound=str)


def get_choice(
    params: Mapping[str, Any],
    key: str,
    default: ChoiceT,
    choices: Sequence[ChoiceT],
    *,
    param: str | None = None,
) -> ChoiceT:
    """Read one of the strings ``choices`` (the message lists them)."""
    value = params.get(key, default)
    for choice in choices:
        if isinstance(value, str) and value == choice:
            return choice
    name = param or key
    known = ", ".join(f"'{c}'" for c in choices)
    raise ParamError(name, f"`{name}` must be one of {known}, got {value!r:.60}")
