"""Forward hooks on the main model's decoder blocks: per-row control-vector deltas.

The hooks are registered **once** per model (:meth:`ControlHooks.install`) and hold no
steering of their own. A forward pass that steers runs inside
``with hooks.steering(phase):``, which makes ``phase`` (a
:class:`processors.control.PhaseDeltas`) visible to the hooks *of the calling thread
only* and clears it in ``finally`` — an exception inside the forward cannot leave a delta
behind, and another thread's forward (an extraction request, a second engine over the
same model) never sees it. With no phase set, each hook returns at once and the block's
output is untouched (``None`` from a forward hook keeps the output as it is).

Block ``ℓ``'s output ``h (B, T, D)`` becomes ``h + delta_ℓ (B, 1, D)`` — in prefill
(``T`` = the padded prompt length) and in decode (``T = 1``) alike; rows without a delta
for ``ℓ`` have zeros there. Left-padded positions get the delta too, which is harmless:
they are never attended and their outputs are discarded.

:meth:`ControlHooks.capture` records the last position's output of chosen blocks (the
states control vectors are extracted from), through the same hooks, so extraction and
application agree on what "layer ℓ" is.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from processors.control import PhaseDeltas, apply_delta

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
        self.calls = 0  # forwards that steered (tests)
        self._handles = [
            layer.register_forward_hook(partial(self._hook, i))
            for i, layer in enumerate(self.layers)
        ]

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
    def steering(self, phase: PhaseDeltas | None) -> Iterator[None]:
        """Apply ``phase`` to forwards run by this thread inside the block."""
        if phase is None:
            yield
            return
        self._local.phase = phase
        self.calls += 1
        try:
            yield
        finally:
            self._local.phase = None

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

    def _hook(self, idx: int, module: nn.Module, args: Any, output: Any) -> Any:
        local = self._local.__dict__
        phase: PhaseDeltas | None = local.get("phase")
        cap: _Capture | None = local.get("capture")
        if phase is None and cap is None:
            return None  # nobody steers: leave the block's output alone
        h = output[0] if isinstance(output, tuple) else output  # (B, T, D)
        out = h
        if phase is not None:
            delta = phase.deltas.get(idx)
            if delta is not None:
                out = apply_delta(h, delta, phase.preserve.get(idx))
        if cap is not None and idx in cap.layers:
            cap.states[idx] = out[:, -1, :].detach().float().clone()
        if out is h:
            return None
        return (out, *output[1:]) if isinstance(output, tuple) else out


__all__ = ["ControlHooks", "decoder_layers"]
