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
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch


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
class ProcessorEnv:
    """What validators may consult: the serving model's vocabulary and the artifacts.

    ``resources`` maps a resource kind (e.g. ``"priors"``) to a lookup object owned by
    the server; processors only read from it.
    """

    vocab_size: int
    tokenizer_fingerprint: str = ""
    resources: Mapping[str, Any] = field(default_factory=dict)


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
        stats: per-step diagnostics a processor wants to report, name → ``(B,)`` float32
            tensor. Only filled when ``want_stats`` is true, so unused diagnostics are free.
        want_stats: whether any row of the batch asked for diagnostics.
    """

    base_logits: torch.Tensor
    last_tokens: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    want_stats: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


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

    @property
    def active(self) -> bool:
        """Whether any row of the current batch uses this processor."""
        return self._active


def check_keys(params: Mapping[str, Any], allowed: set[str]) -> None:
    """Reject keys a steering entry does not define (``type`` is always allowed)."""
    for key in params:
        if key != "type" and key not in allowed:
            known = ", ".join(sorted(allowed))
            raise ParamError(key, f"unknown field '{key}' (known fields: {known})")


def get_number(
    params: Mapping[str, Any],
    key: str,
    default: float,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    """Read a finite real number from ``params[key]`` and check it lies in ``[lo, hi]``."""
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(key, f"'{key}' must be a number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ParamError(key, f"'{key}' must be finite, got {value}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        bracket = "(" if lo_open else "["
        raise ParamError(key, f"'{key}' must be in {bracket}{lo}, {hi}], got {value}")
    if hi is not None and value > hi:
        bracket = "(" if lo_open else "["
        raise ParamError(key, f"'{key}' must be in {bracket}{lo}, {hi}], got {value}")
    return value
