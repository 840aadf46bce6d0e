"""Forward hooks on the main model's decoder blocks: per-row control-vector deltas.

The hooks are registered **once** per model (:meth:`ControlHooks.install`) and hold no
steering of their own. A forward pass that steers runs inside
``with hooks.steering(phase):``, which makes ``phase`` (a
:class:`processors.control.PhaseDeltas`) visible to the hooks *of the calling thread
only* and clears it in ``finally`` — an exception inside the forward cannot leave a delta
behind, and another thread's forward (a second engine over the same model, an offline
extraction in a benchmark) never sees it. With no phase set, each hook returns at once
and the block's output is untouched (``None`` from a forward hook keeps the output as it is).

Block ``ℓ``'s output ``h (B, T, D)`` goes through ``processors.control.apply_layer`` —
in prefill (``T`` = the padded prompt length) and in decode (``T = 1``) alike: the
row's ablations, then its additions, computed in float32 and added once; rows without
an entry at ``ℓ`` pass through unchanged. ``steering`` also hands the forward's attention
mask (prefill: receipts count real prompt positions only) and position ids (decode: a
row's generated index ``t`` is its position minus its prompt length, which windows and
schedules read) to the phase.

:class:`ReceiptBook` and :class:`RowControl` are the engine's side of the receipts and of
``after`` triggers: per-forward stats travel with the step's one host copy into each
row's records, and ``summarize_receipt`` turns them into the response's ``receipt``.

:meth:`ControlHooks.capture` records the last position's output of chosen blocks (the
states control vectors are extracted from), through the same hooks, so extraction and
application agree on what "layer ℓ" is.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from processors.control import (
    AfterWatch,
    ControlSpec,
    PhaseDeltas,
    apply_layer,
    control_indices,
    control_specs,
    summarize_receipt,
)

_ATTR = "_steerserve_control_hooks"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (``model.model.layers`` for Llama-likes)."""
    n = int(getattr(model.config, "num_hidden_layers", -1))
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and (n < 0 or len(obj) == n):
            return obj
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


class _Capture:
    """Last-position outputs ``(B, D)`` of some blocks, filled by the hooks."""

    def __init__(self, layers: Sequence[int]) -> None:
        self.layers = frozenset(layers)
        self.states: dict[int, torch.Tensor] = {}


class ControlHooks:
    """The control-vector hooks of one model (use :meth:`install`, not the constructor)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        # A transformers config; nn.Module types unknown attributes as submodules.
        config: Any = model.config
        self.hidden_size = int(config.hidden_size)
        self._local = threading.local()
        self._handles = [
            layer.register_forward_hook(partial(self._hook, i))
            for i, layer in enumerate(self.layers)
        ]

    def __deepcopy__(self, memo: dict[int, Any]) -> ControlHooks:
        """A deep copy of a hooked model (e.g. a perturbed copy of the served model used
        as a fusion expert) gets hooks of its own: the copied layers' hook registrations
        are bound to this copy, which has fresh per-thread state (a ``threading.local``
        cannot be copied, and sharing one would mix the two models' steering)."""
        new = object.__new__(ControlHooks)
        memo[id(self)] = new
        new.layers = copy.deepcopy(self.layers, memo)
        new.num_layers, new.hidden_size = self.num_layers, self.hidden_size
        new._local = threading.local()
        new._handles = []  # the copy's registrations came with its layers' hook dicts
        return new

    @classmethod
    def install(cls, model: nn.Module) -> ControlHooks:
        """The model's hooks, registering them on first use."""
        hooks = getattr(model, _ATTR, None)
        if not isinstance(hooks, ControlHooks):
            hooks = cls(model)
            object.__setattr__(model, _ATTR, hooks)  # not a submodule / parameter
        return hooks

    def remove(self) -> None:
        """Unregister the hooks (tests)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def steering(
        self,
        phase: PhaseDeltas | None,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """Apply ``phase`` to forwards run by this thread inside the block.

        Args:
            phase: the per-row entries (None: nothing to do).
            mask: ``(B, T)`` attention mask of the forward (prefill: only real prompt
                positions count in the receipts).
            positions: ``(B, T)`` position ids (decode: ``T = 1``; the fed token's
                generated index is its position minus the prompt length).
        """
        if phase is None:
            yield
            return
        phase.begin(mask, positions[:, -1:] if positions is not None else None)
        self._local.phase = phase
        try:
            yield
        finally:
            self._local.phase = None
        phase.finish()

    @contextlib.contextmanager
    def capture(self, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Record the last position's output ``(B, D)`` of ``layers`` in the yielded dict
        during forwards run by this thread inside the block."""
        cap = _Capture(layers)
        self._local.capture = cap
        try:
            yield cap.states
        finally:
            self._local.capture = None

    def active(self) -> bool:
        """Whether this thread has a phase or a capture set (tests)."""
        local = self._local.__dict__
        return local.get("phase") is not None or local.get("capture") is not None

    def current(self) -> tuple[PhaseDeltas | None, _Capture | None]:
        """This thread's phase and capture (either may be None). The hooks read it per
        block; the lean forward (``server.engine.lean``) once per forward."""
        local = self._local.__dict__
        return local.get("phase"), local.get("capture")

    def _hook(self, idx: int, module: nn.Module, args: Any, output: Any) -> Any:
        phase, cap = self.current()
        if phase is None and cap is None:
            return None  # nobody steers: leave the block's output alone
        h = output[0] if isinstance(output, tuple) else output  # (B, T, D)
        out = block_output(idx, h, phase, cap)
        if out is h:
            return None
        return (out, *output[1:]) if isinstance(output, tuple) else out


def block_output(
    idx: int, h: torch.Tensor, phase: PhaseDeltas | None, cap: _Capture | None
) -> torch.Tensor:
    """Block ``idx``'s output ``h (B, T, D)`` after this forward's steering: the phase's
    entries at ``idx`` (``apply_layer``), then the capture of the last position
    ``(B, D)`` float32 when ``idx`` is captured. Returns ``h`` itself when nothing
    applies. The one body of the forward hooks and of the lean forward's per-block step,
    so both paths steer and capture identically."""
    out = h
    if phase is not None and idx in phase.by_layer:
        out = apply_layer(phase, idx, h)
    if cap is not None and idx in cap.layers:
        cap.states[idx] = out[:, -1, :].detach().float().clone()
    return out


@dataclass
class RowControl:
    """The engine's control bookkeeping for one row.

    Attributes:
        specs: the row's control entries, in order.
        indices: their positions in the request's ``steering`` list.
        watch: the row's ``after`` triggers (None when no entry waits for a marker).
        records: one ``{stat: value}`` dict per forward the row took part in (receipts).
    """

    specs: tuple[ControlSpec, ...]
    indices: tuple[int, ...]
    watch: AfterWatch | None
    records: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def of(cls, steering: Sequence[Any]) -> RowControl | None:
        """The state of a request with control entries (None without any)."""
        specs = control_specs(steering)
        if not specs:
            return None
        return cls(specs, control_indices(steering), AfterWatch.of(specs))

    def receipt(self) -> dict[str, Any] | None:
        """The steering receipt from the records so far."""
        return summarize_receipt(self.records, self.specs, self.indices)


__all__ = ["ControlHooks", "RowControl", "block_output", "decoder_layers"]
