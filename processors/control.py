"""Control vectors: ``h_ℓ ← h_ℓ + α · v_ℓ`` at the output of decoder block ℓ, per row.

After "Improving Reasoning Performance in Large Language Models via Representation
Engineering"; file formats from repeng and llama.cpp (``processors.control_gguf``).

This module holds the pure parts; the server wires them to the model:

* **the artifact** :class:`ControlVector` — one ``(D,)`` float32 vector per block index;
* **extraction math** :func:`fit_direction` / :func:`fit_layers` — from the last-token
  hidden states of contrastive pairs, one direction per layer by ``pca_diff`` (default),
  ``pca_center`` or ``mean_diff``, oriented so positives project higher than negatives on
  average, with a per-layer separation score;
* **the request entry** :class:`ControlProcessor` (``type: "control"``) — validated here,
  applied inside the forward pass (registered ``in_forward``: it is never a logits stage);
* **the per-row slot builder** :func:`build_phase` and :func:`apply_layer` — per phase,
  ``(B, 1, D)`` float32 directions and ``(B,)`` per-row parameters that the engine's
  forward hooks (``server.engine.hooks``) apply to the residual stream, filling the
  receipt statistics as they go;
* **the receipt** :func:`summarize_receipt` — what each entry did, from those statistics.

Layer indices are 0-based block indices: layer ``ℓ`` is the output of
``model.model.layers[ℓ]`` (after its residual add), i.e. ``hidden_states[ℓ + 1]`` in
transformers' ``output_hidden_states`` numbering. GGUF ``direction.N`` maps to layer ``N``.

Scale: an extracted vector is the unit direction ``u`` times the mean positive−negative
gap along it, ``mean((h⁺ − h⁻)·u)``. So ``α = 1`` shifts a state by one average gap
(for ``mean_diff`` the vector *is* the mean difference), and ``α`` means roughly the same
across layers and models. Imported GGUF vectors are used as they are.

Request parameters (``steering[]`` entry; docs/control.md has the full rules):

* ``vector`` — the artifact's name (unknown → 404);
* ``mode`` — ``add`` (default, ``h + α v``), ``ablate`` (``h − s (h·û) û``) or ``clamp``
  (``h + (value − h·û) û``), ``û = v / ‖v‖``;
* ``alpha`` — (add) strength in ``[-100, 100]`` (default 1.0), or a schedule
  ``{"start", "end", "over", "shape"}`` over generated tokens; ``alpha = 0`` leaves the
  row bit-identical to an unsteered run (the entry is skipped entirely);
* ``strength`` — (ablate) ``s`` in ``[0, 1]`` (default 1); ``value`` — (clamp) the
  projection to set;
* ``layers`` — which of the vector's layers to apply (default: all of them);
* ``positions`` — ``"all"`` (default), ``"prompt"`` (prefill positions only),
  ``"generated"`` (decode positions only), ``{"from": i, "to": j}`` (generated indices
  ``i ≤ t < j``) or ``{"after": "TEXT"}`` (from the token that completes TEXT);
* ``preserve_norm`` — (add) rescale the state after this entry's addition back to the
  norm it had before it.

At one layer: ablations first (in order), then additions (in order), each addition's
``preserve_norm`` acting on its own step; the change is accumulated in float32 and added
once in the activation dtype.

Example:
    >>> import numpy as np, torch
    >>> v = ControlVector("up", {1: np.ones(4, dtype=np.float32)})
    >>> env = ProcessorEnv(vocab_size=8, control_vectors={"up": v})
    >>> spec = ControlProcessor.validate({"vector": "up", "alpha": 2.0}, env)
    >>> phase = build_phase([(spec,), ()], "prompt", torch.device("cpu"))
    >>> phase.begin(torch.ones(2, 1, dtype=torch.long))
    >>> apply_layer(phase, 1, torch.zeros(2, 1, 4))[:, 0]
    tensor([[2., 2., 2., 2.],
            [0., 0., 0., 0.]])
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

from processors.base import (
    ParamError,
    Processor,
    ProcessorEnv,
    StepContext,
    check_int,
    check_keys,
    get_bool,
    get_choice,
    get_number,
)
from processors.stack import StackEntry, register

Method = Literal["pca_diff", "pca_center", "mean_diff"]
Positions = Literal["all", "prompt", "generated"]
Phase = Literal["prompt", "generated"]
Mode = Literal["add", "ablate", "clamp"]
METHODS: tuple[str, ...] = ("pca_diff", "pca_center", "mean_diff")
POSITIONS: tuple[str, ...] = ("all", "prompt", "generated")
MODES: tuple[Mode, ...] = ("add", "ablate", "clamp")
SHAPES: tuple[str, ...] = ("linear", "cosine", "exp")
MAX_ALPHA = 100.0
MAX_VALUE = 1e6  # |clamp value| (a projection, in hidden-state units)
MAX_OVER = 1_000_000  # schedule length in generated tokens
MAX_INDEX = 1_000_000  # token-window bounds
MAX_MARKER = 256  # characters of an "after" marker
EXP_RATE = 5.0  # the "exp" schedule shape's rate per schedule length
ARTIFACT_FORMAT = 1


# ------------------------------------------------------------------ the artifact
@dataclass(eq=False)
class ControlVector:
    """A named control vector: one ``(D,)`` float32 direction per block index.

    Attributes:
        name: artifact name.
        directions: block index ``ℓ`` → ``(D,)`` float32 numpy vector.
        model_hint: the model family it was made for (GGUF ``controlvector.model_hint``).
        info: descriptive metadata (method, pairs, per-layer separation, source).
        uid: unique per loaded object (keys the device-tensor cache).
    """

    name: str
    directions: dict[int, np.ndarray]
    model_hint: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if not self.directions:
            raise ValueError("a control vector needs at least one layer")
        dims = {int(np.asarray(v).shape[-1]) for v in self.directions.values()}
        if len(dims) != 1:
            raise ValueError(f"all directions must have one length, got {sorted(dims)}")
        self.directions = {
            int(k): np.ascontiguousarray(np.asarray(v, dtype=np.float32).reshape(-1))
            for k, v in sorted(self.directions.items())
        }
        for k, v in self.directions.items():
            if k < 0:
                raise ValueError(f"layer indices must be >= 0, got {k}")
            if not np.isfinite(v).all():
                raise ValueError(f"direction of layer {k} has non-finite values")
        self._device: dict[tuple[str, torch.dtype], dict[int, torch.Tensor]] = {}

    @property
    def hidden_size(self) -> int:
        """``D``, the length of every direction."""
        return int(next(iter(self.directions.values())).shape[0])

    @property
    def layers(self) -> tuple[int, ...]:
        """The block indices this vector has a direction for, ascending."""
        return tuple(self.directions)

    def tensors(self, device: torch.device, dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """The directions as ``(D,)`` device tensors (cached per device and dtype)."""
        key = (str(device), dtype)
        hit = self._device.get(key)
        if hit is None:
            hit = {
                k: torch.from_numpy(v).to(device=device, dtype=dtype)
                for k, v in self.directions.items()
            }
            self._device[key] = hit
        return hit

    # ---- persistence (server.artifacts stores the arrays and this metadata)
    def to_artifact(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays ``direction.N`` (float32, no pickle) and JSON-able metadata."""
        arrays = {f"direction.{k}": v for k, v in self.directions.items()}
        meta = {
            "format": ARTIFACT_FORMAT,
            "model_hint": self.model_hint,
            "hidden_size": self.hidden_size,
            "layers": list(self.layers),
            "info": self.info,
        }
        return arrays, meta

    @classmethod
    def from_artifact(
        cls, name: str, arrays: dict[str, np.ndarray], meta: Mapping[str, Any]
    ) -> ControlVector:
        """Rebuild a stored vector; raises ValueError if anything is inconsistent."""
        if meta.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"unsupported control vector format {meta.get('format')!r}")
        directions: dict[int, np.ndarray] = {}
        for key, arr in arrays.items():
            stem, _, idx = key.partition(".")
            if stem != "direction" or not idx.isdigit():
                raise ValueError(f"unexpected array '{key}'")
            if arr.dtype != np.float32 or arr.ndim != 1:
                raise ValueError(f"'{key}' must be a 1-D float32 array")
            directions[int(idx)] = arr
        if sorted(directions) != list(meta.get("layers", [])):
            raise ValueError("stored layers do not match the metadata")
        vec = cls(name, directions, str(meta.get("model_hint", "")), dict(meta.get("info", {})))
        if vec.hidden_size != meta.get("hidden_size"):
            raise ValueError("stored hidden size does not match the metadata")
        return vec


# ------------------------------------------------------------------ extraction math
@dataclass(frozen=True)
class LayerFit:
    """One layer's fitted vector and how well its direction separates the pairs.

    Attributes:
        vector: ``(D,)`` float32, unit direction × mean gap.
        gap: mean of ``(h⁺ − h⁻)·u`` (≥ 0 after orientation): the vector's norm.
        accuracy: fraction of pairs whose positive projects higher than its negative.
        separation: paired effect size of the projections, ``mean(g) / std(g)`` with
            ``g = (h⁺ − h⁻)·u`` per pair: how consistently each positive lands above its
            own negative (large = clean contrast; ~0 = the layer does not see it).
        explained: fraction of the differences' second moment along ``u``.
    """

    vector: np.ndarray
    gap: float
    accuracy: float
    separation: float
    explained: float

    def report(self) -> dict[str, float]:
        """The JSON the API shows per layer."""
        return {
            "separation": _finite(self.separation),
            "accuracy": self.accuracy,
            "gap": self.gap,
            "explained": self.explained,
        }


def _finite(x: float, cap: float = 1e6) -> float:
    return float(max(-cap, min(cap, x))) if math.isfinite(x) else (cap if x > 0 else -cap)


def _top_axis(x: torch.Tensor) -> torch.Tensor | None:
    """First right singular vector of ``x (N, D)`` (unit norm), None if ``x`` is ~0."""
    if x.shape[0] == 0:
        return None
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    if s[0] <= 1e-12 * max(1.0, float(x.abs().max())):
        return None
    return vh[0]


def fit_direction(pos: torch.Tensor, neg: torch.Tensor, method: str = "pca_diff") -> LayerFit:
    """Fit one control vector from paired hidden states.

    Args:
        pos: ``(N, D)`` hidden states of the positive prompts (last token).
        neg: ``(N, D)`` hidden states of the matching negative prompts.
        method: ``pca_diff`` — first principal axis of the differences ``h⁺ − h⁻`` with
            the pair order randomized, as in RepE (the ±d cloud has mean 0, so this is the
            top right singular vector of the uncentred difference matrix; centring the
            differences first, as sklearn's PCA in repeng does, would subtract exactly
            the shared shift we are after and fails on consistent contrasts);
            ``pca_center`` — first principal component of the pair-centred states
            ``h± − (h⁺ + h⁻)/2`` (repeng's ``pca_center``; in exact arithmetic the same
            axis as ``pca_diff``, since the pair-centred states are ±d/2 — kept for
            compatibility, it differs only by rounding); ``mean_diff`` — the mean
            difference. The PCA methods fall back to the mean difference when their data
            is ~0.

    Returns:
        The oriented, scaled vector and its separation statistics (computed on ``pos`` and
        ``neg`` themselves, so they are optimistic for few pairs).
    """
    if pos.shape != neg.shape or pos.ndim != 2 or pos.shape[0] == 0:
        raise ValueError(f"pos and neg must be (N, D) with N >= 1, got {pos.shape}, {neg.shape}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    p, n = pos.double(), neg.double()
    diff = p - n  # (N, D)
    mean = diff.mean(dim=0)  # (D,)
    u: torch.Tensor | None = None
    if method == "pca_diff":
        u = _top_axis(diff)
    elif method == "pca_center":
        centre = (p + n) / 2
        u = _top_axis(torch.cat([p - centre, n - centre], dim=0))
    if u is None:  # mean_diff, or a degenerate PCA
        norm = float(mean.norm())
        u = mean / norm if norm > 0 else torch.zeros_like(mean)
    proj_d = diff @ u  # (N,)
    if float(proj_d.mean()) < 0:  # orient: positives project higher on average
        u = -u
        proj_d = -proj_d
    gap = float(proj_d.mean())
    pp, pn = p @ u, n @ u  # (N,)
    std = float(proj_d.std(unbiased=False))
    separation = gap / std if std > 0 else (math.inf if gap > 0 else 0.0)
    total = float(diff.square().sum())
    explained = float(proj_d.square().sum()) / total if total > 0 else 0.0
    return LayerFit(
        vector=(u * gap).float().numpy(),
        gap=gap,
        accuracy=float((pp > pn).double().mean()),
        separation=separation,
        explained=explained,
    )


def fit_layers(
    pos: Mapping[int, torch.Tensor], neg: Mapping[int, torch.Tensor], method: str = "pca_diff"
) -> dict[int, LayerFit]:
    """:func:`fit_direction` for every layer of ``pos``/``neg`` (layer → ``(N, D)``)."""
    return {layer: fit_direction(pos[layer], neg[layer], method) for layer in sorted(pos)}


def expand_template(
    template: str,
    positive_words: Sequence[str],
    negative_words: Sequence[str],
    suffixes: Sequence[str] = ("",),
) -> list[tuple[str, str]]:
    """Pairs from a template: ``{}`` takes each (positive, negative) word pair, zipped;
    every pair is combined with every suffix (appended after the filled template).

    A template with an inline ``{pos|neg}`` alternative and no word lists gives that pair.

    >>> expand_template("I feel {}.", ["happy"], ["sad"], [" Today", " Now"])
    [('I feel happy. Today', 'I feel sad. Today'), ('I feel happy. Now', 'I feel sad. Now')]
    >>> expand_template("I am {glad|upset} now", [], [])
    [('I am glad now', 'I am upset now')]
    """
    import re

    if not positive_words and not negative_words:
        m = re.search(r"\{([^{}|]*)\|([^{}|]*)\}", template)
        if m is None:
            raise ValueError("the template needs '{}' with word lists, or '{positive|negative}'")
        positive_words, negative_words = [m.group(1)], [m.group(2)]
        template = template[: m.start()] + "{}" + template[m.end() :]
    if len(positive_words) != len(negative_words):
        raise ValueError(
            f"positive_words and negative_words must have one length, got "
            f"{len(positive_words)} and {len(negative_words)}"
        )
    if template.count("{}") != 1:
        raise ValueError("the template must contain exactly one '{}' placeholder")
    head, tail = template.split("{}")
    return [
        (head + pw + tail + s, head + nw + tail + s)
        for s in suffixes
        for pw, nw in zip(positive_words, negative_words, strict=True)
    ]


# ------------------------------------------------------------------ the request entry
@dataclass(frozen=True)
class Schedule:
    """A strength that changes over generated tokens: ``α(t)`` for generated index ``t``.

    ``α(t) = start + (end − start) · w(min(t / over, 1))`` with ``w(p) = p`` (linear),
    ``(1 − cos πp) / 2`` (cosine) or ``(1 − e^{−5p}) / (1 − e^{−5})`` (exp: most of the
    change early, like a decay with time constant ``over / 5``). Constant ``end`` from
    ``t = over`` on; prompt positions (if the window includes them) use ``start``.
    """

    start: float
    end: float
    over: int
    shape: str = "linear"

    def at(self, t: int) -> float:
        """``α(t)`` on the host (docs and examples; the engine evaluates it on the device)."""
        p = min(max(t, 0) / self.over, 1.0)
        if self.shape == "cosine":
            w = (1.0 - math.cos(math.pi * p)) / 2.0
        elif self.shape == "exp":
            w = (1.0 - math.exp(-EXP_RATE * p)) / (1.0 - math.exp(-EXP_RATE))
        else:
            w = p
        return self.start + (self.end - self.start) * w


@dataclass(frozen=True)
class Window:
    """Which positions an entry acts on.

    ``kind``: ``all`` (prompt and generated), ``prompt``, ``generated``, ``range``
    (generated indices ``start <= t < stop``; ``stop`` None = open-ended) or ``after``
    (generated positions from the token that completes ``marker`` in the emitted text on).
    """

    kind: Literal["all", "prompt", "generated", "range", "after"] = "all"
    start: int = 0
    stop: int | None = None
    marker: str = ""

    @property
    def in_prompt(self) -> bool:
        """Whether prefill positions are in the window."""
        return self.kind in ("all", "prompt")

    @property
    def in_generated(self) -> bool:
        """Whether some generated position may be in the window."""
        return self.kind != "prompt" and (self.stop is None or self.stop > self.start)

    def to_wire(self) -> str | dict[str, Any]:
        """The request's spelling (receipts echo it)."""
        if self.kind == "range":
            return {"from": self.start, **({"to": self.stop} if self.stop is not None else {})}
        if self.kind == "after":
            return {"after": self.marker}
        return self.kind


@dataclass(frozen=True)
class ControlSpec:
    """One request's validated control entry.

    Attributes:
        vector: the artifact.
        alpha: the coefficient — α (a number or a :class:`Schedule`) for ``add``, the
            strength ``s`` for ``ablate``, 1 for ``clamp``; 0 means the entry does nothing.
        layers: block indices, ascending.
        positions: the :class:`Window`.
        preserve_norm: (``add``) rescale the state after this entry's addition to the norm
            it had before it.
        mode: ``add`` (``h + α v``), ``ablate`` (``h − s (h·û) û``) or ``clamp``
            (``h + (value − h·û) û``), with ``û = v / ‖v‖`` per layer.
        value: the clamped projection (``clamp``).
    """

    vector: ControlVector
    alpha: float | Schedule
    layers: tuple[int, ...]
    positions: Window = Window()
    preserve_norm: bool = False
    mode: Mode = "add"
    value: float = 0.0

    @property
    def ablative(self) -> bool:
        """``ablate`` or ``clamp``: applied before every addition at a layer."""
        return self.mode != "add"

    @property
    def prompt_alpha(self) -> float:
        """The coefficient on prompt positions (a schedule's ``start``)."""
        return self.alpha.start if isinstance(self.alpha, Schedule) else self.alpha

    @property
    def is_noop(self) -> bool:
        """A constant zero coefficient (``alpha = 0``, ``strength = 0``) changes nothing."""
        return self.alpha == 0.0

    def acts_in(self, phase: Phase) -> bool:
        """Whether this entry can change anything in ``phase``."""
        if self.is_noop:
            return False
        if phase == "prompt":
            return self.positions.in_prompt and (self.prompt_alpha != 0.0 or self.ablative)
        return self.positions.in_generated

    def key(self) -> tuple[Any, ...]:
        """Hashable identity of what the entry does to prompt positions (shared-prefill
        grouping: equal keys give equal prefill states)."""
        return (self.vector.uid, self.mode, self.prompt_alpha, self.value, self.layers,
                self.preserve_norm)


def control_specs(steering: Iterable[StackEntry]) -> tuple[ControlSpec, ...]:
    """The control entries of one request's validated stack, in order."""
    return tuple(e.spec for e in steering if e.type == ControlProcessor.type_name)


def control_indices(steering: Iterable[StackEntry]) -> tuple[int, ...]:
    """Where the control entries sit in the request's ``steering`` list."""
    return tuple(i for i, e in enumerate(steering) if e.type == ControlProcessor.type_name)


def phase_key(specs: Sequence[ControlSpec], phase: Phase) -> tuple[Any, ...]:
    """What ``specs`` do in ``phase`` — equal keys mean equal interventions (``()`` = none)."""
    return tuple((i, s.key()) for i, s in enumerate(specs) if s.acts_in(phase))


# ------------------------------------------------------------------ per-row phase tensors
_SHAPE_CODE = {"linear": 0, "cosine": 1, "exp": 2}
_NO_STOP = 2**62


@dataclass(eq=False)
class Slot:
    """The ``j``-th additive (``kind = "add"``) or ablative (``"abl"``) entry of every row.

    Rows are compared slot by slot, so a row's arithmetic never depends on what the other
    rows of the batch do (mixed batch == solo). Rows without a ``j``-th entry of this kind
    (or whose entry does not act in this phase) have ``has = False``, zero directions and
    a zero coefficient: their state passes unchanged.

    Attributes:
        kind: ``add`` or ``abl``.
        j: the slot's index among the row entries of this kind.
        dirs: block index → ``(B, 1, D)`` float32: ``v`` (add) or the unit ``û`` (abl).
        has: ``(B,)`` bool.
        a0, a1, over: ``(B,)`` float32 schedule start, end and length (constants: a0 = a1).
        shape: ``(B,)`` int64 schedule shape code.
        bias: ``(B,)`` float32 clamp value (0 for add and ablate).
        lo, hi: ``(B,)`` int64 generated-index window ``[lo, hi)``.
        gate: ``(B,)`` bool, the ``after`` trigger (True for every other window).
        in_prompt: ``(B,)`` bool, prefill positions are in the window.
        preserve: ``(B, 1, 1)`` bool, or None when no row of the slot asks.
        coef, cbias: per-forward ``(B, 1, 1)`` float32 effective coefficient and clamp
            value (0 outside the window), set by :meth:`PhaseDeltas.begin`.
        active: per-forward ``(B,)`` bool.
    """

    kind: str
    j: int
    dirs: dict[int, torch.Tensor]
    has: torch.Tensor
    a0: torch.Tensor
    a1: torch.Tensor
    over: torch.Tensor
    shape: torch.Tensor
    bias: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    gate: torch.Tensor
    in_prompt: torch.Tensor
    preserve: torch.Tensor | None
    scheduled: bool
    coef: torch.Tensor | None = None
    cbias: torch.Tensor | None = None
    active: torch.Tensor | None = None
    members: tuple[int, ...] = ()  # host: the rows that have this slot
    layer_rows: dict[int, tuple[int, ...]] = field(default_factory=dict)  # host: per block

    def select(self, keep: Sequence[int], idx: torch.Tensor) -> Slot | None:
        """This slot for rows ``keep`` (host) / ``idx (B',)`` (device), None when none
        of them has it. Every per-row tensor is gathered on the device (no upload)."""
        pos = {b: j for j, b in enumerate(keep)}
        members = tuple(pos[b] for b in self.members if b in pos)
        if not members:
            return None
        # A block only rows that left touched leaves the slot, as build_phase would have it.
        layer_rows = {k: tuple(sorted(pos[b] for b in rows if b in pos))
                      for k, rows in self.layer_rows.items()}
        layer_rows = {k: rows for k, rows in layer_rows.items() if rows}

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, idx)

        return replace(
            self, dirs={k: take(v) for k, v in self.dirs.items() if k in layer_rows},
            has=take(self.has),
            a0=take(self.a0), a1=take(self.a1), over=take(self.over), shape=take(self.shape),
            bias=take(self.bias), lo=take(self.lo), hi=take(self.hi), gate=take(self.gate),
            in_prompt=take(self.in_prompt),
            preserve=None if self.preserve is None else take(self.preserve),
            coef=None, cbias=None, active=None, members=tuple(sorted(members)),
            layer_rows=layer_rows,
        )

    def name(self, phase: str, layer: int | None, stat: str) -> str:
        """Stat name, e.g. ``control.add0.g.12.dsum`` (``layer`` None: per slot)."""
        mid = "" if layer is None else f".{layer}"
        return f"control.{self.kind}{self.j}.{phase}{mid}.{stat}"


@dataclass(eq=False)
class PhaseDeltas:
    """Everything the hooks need for the forwards of one phase of one batch composition.

    Built on the host by :func:`build_phase` when the composition changes; per forward,
    :meth:`begin` evaluates schedules and windows on the device (no host sync) and the
    hooks call :func:`apply_layer`, which fills :attr:`stats` for the receipts.

    Attributes:
        phase: ``prompt`` (prefill) or ``generated`` (decode).
        slots: ablative slots first, then additive ones, each in entry order.
        by_layer: block index → the slots touching it, in application order.
        prompt_lens: ``(B,)`` int64 prompt length per row (decode: ``t = position − len``).
        stats: name → ``(B,)`` float32 of the last forward; NaN for rows a stat does not
            apply to (rows without the slot, or with no acted position).
    """

    phase: Phase
    slots: list[Slot]
    by_layer: dict[int, list[Slot]]
    prompt_lens: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    _valid: torch.Tensor | None = None  # (B, T) bool real prompt positions (prefill)
    _acts: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (slot, layer)

    @property
    def batch_size(self) -> int:
        """``B``."""
        return int(self.prompt_lens.shape[0])

    @property
    def layers(self) -> tuple[int, ...]:
        """Blocks some row's entry touches in this phase."""
        return tuple(self.by_layer)

    def begin(self, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
              ) -> None:
        """Per forward, on the device: each slot's coefficient and window for its rows.

        Args:
            mask: prefill ``(B, T)`` attention mask (1 = real prompt token).
            positions: decode ``(B, 1)`` position id of the fed token (its generated
                index is ``position − prompt_len``).
        """
        self.stats = {}
        self._acts = {}
        B = self.batch_size
        self._valid = mask.bool() if (mask is not None and self.phase == "prompt") else None
        t: torch.Tensor | None = None
        if self.phase == "generated" and positions is not None:
            t = positions.view(B) - self.prompt_lens  # (B,) generated index of the fed token
        for s in self.slots:
            if self.phase == "prompt":
                active = s.has & s.in_prompt
                coef = s.a0
            else:
                assert t is not None, "decode forwards need the positions"
                active = s.has & (t >= s.lo) & (t < s.hi) & s.gate
                coef = schedule_value(s, t) if s.scheduled else s.a0
            zero = torch.zeros_like(coef)
            s.active = active
            s.coef = torch.where(active, coef, zero).view(B, 1, 1)
            s.cbias = torch.where(active, s.bias, zero).view(B, 1, 1)
            if self._valid is not None:
                n = torch.where(active, self._valid.sum(dim=1), 0).float()
            else:
                n = active.float()
            self.stats[s.name(self.phase[0], None, "n")] = torch.where(
                s.has, n, torch.full_like(n, math.nan)
            )

    def finish(self) -> None:
        """After the forward: per-layer sums and maxima become NaN where nothing acted."""
        for s in self.slots:
            n = self.stats[s.name(self.phase[0], None, "n")]
            ok = n > 0  # False for NaN too
            for layer in s.dirs:
                for stat in (("dsum", "dmax", "csum", "cmax") if s.kind == "abl"
                             else ("dsum", "dmax")):
                    key = s.name(self.phase[0], layer, stat)
                    val = self.stats.get(key)
                    if val is not None:
                        self.stats[key] = torch.where(ok, val, torch.full_like(val, math.nan))

    def select(self, keep: Sequence[int]) -> PhaseDeltas | None:
        """This phase for rows ``keep`` of the batch, in that order (rows left; nobody
        joined): the per-row tensors, ``after`` gates included, follow the rows on the
        device instead of :func:`build_phase` re-uploading them. Slots no kept row has
        are dropped; None when no slot is left (as :func:`build_phase` would return)."""
        idx = torch.tensor(list(keep), dtype=torch.long).to(self.prompt_lens.device)
        slots = [t for t in (s.select(keep, idx) for s in self.slots) if t is not None]
        if not slots:
            return None
        return PhaseDeltas(self.phase, slots, _by_layer(slots),
                           self.prompt_lens.index_select(0, idx))

    def trigger(self, b: int, entry: int, specs: Sequence[ControlSpec]) -> None:
        """Open row ``b``'s ``after`` window of its control entry ``entry`` (one device
        write, no sync); takes effect at the next forward."""
        kind_j = slot_of(specs, entry)
        for s in self.slots:
            if (s.kind, s.j) == kind_j:
                s.gate[b] = True


def slot_of(specs: Sequence[ControlSpec], entry: int) -> tuple[str, int]:
    """``(kind, j)``: which slot a row's control entry ``entry`` occupies."""
    spec = specs[entry]
    kind = "abl" if spec.ablative else "add"
    j = sum(1 for s in specs[:entry] if s.ablative == spec.ablative)
    return kind, j


def schedule_value(s: Slot, t: torch.Tensor) -> torch.Tensor:
    """``α(t) (B,)`` float32 for generated indices ``t (B,)`` (see :class:`Schedule`)."""
    p = (t.float() / s.over).clamp(0.0, 1.0)
    w_cos = (1.0 - torch.cos(math.pi * p)) / 2.0
    w_exp = (1.0 - torch.exp(-EXP_RATE * p)) / (1.0 - math.exp(-EXP_RATE))
    w = torch.where(s.shape == 1, w_cos, torch.where(s.shape == 2, w_exp, p))
    return s.a0 + (s.a1 - s.a0) * w


def _by_layer(slots: Sequence[Slot]) -> dict[int, list[Slot]]:
    """Layer index -> the slots that add a delta there, in layer order (the hooks' lookup)."""
    by_layer: dict[int, list[Slot]] = {}
    for s in slots:
        for layer in s.dirs:
            by_layer.setdefault(layer, []).append(s)
    return dict(sorted(by_layer.items()))


def build_phase(
    rows: Sequence[Sequence[ControlSpec]],
    phase: Phase,
    device: torch.device,
    dtype: torch.dtype | None = None,
    *,
    prompt_lens: Sequence[int] | None = None,
    triggered: Sequence[Iterable[int]] | None = None,
) -> PhaseDeltas | None:
    """The per-row tensors of every row in ``phase`` (``prompt`` = prefill, ``generated``
    = decode).

    Host side, called when the batch composition changes; Python loops over rows are fine
    here. ``triggered[b]``: entry indices of row ``b`` whose ``after`` marker has appeared.
    ``dtype`` is accepted for compatibility: directions are float32 whatever the model's
    dtype (deltas are accumulated in float32 and added once). Returns None when no row
    acts in this phase, so the hooks do nothing.
    """
    del dtype
    B = len(rows)
    fired = [set(x) for x in triggered] if triggered is not None else [set() for _ in rows]
    slots: list[Slot] = []
    for kind in ("abl", "add"):
        per_row = [
            [(i, s) for i, s in enumerate(specs) if (s.mode != "add") == (kind == "abl")]
            for specs in rows
        ]
        for j in range(max((len(x) for x in per_row), default=0)):
            cells = [(b, x[j]) for b, x in enumerate(per_row)
                     if j < len(x) and x[j][1].acts_in(phase)]
            if cells:
                slots.append(_slot(kind, j, cells, B, device, fired))
    if not slots:
        return None
    by_layer = _by_layer(slots)
    lens = list(prompt_lens) if prompt_lens is not None else [0] * B
    return PhaseDeltas(
        phase, slots, by_layer,
        torch.tensor(lens, dtype=torch.long, device=device),
    )


def _slot(
    kind: str,
    j: int,
    cells: Sequence[tuple[int, tuple[int, ControlSpec]]],
    B: int,
    device: torch.device,
    fired: Sequence[set[int]],
) -> Slot:
    """One :class:`Slot` from ``(row, (entry index, spec))`` cells (host side)."""
    D = cells[0][1][1].vector.hidden_size
    dirs: dict[int, torch.Tensor] = {}
    has = [False] * B
    a0, a1, over, shape, bias = [0.0] * B, [0.0] * B, [1.0] * B, [0] * B, [0.0] * B
    lo, hi, gate, in_prompt, keep = [0] * B, [_NO_STOP] * B, [True] * B, [False] * B, [False] * B
    scheduled = False
    for b, (entry, spec) in cells:
        has[b] = True
        vecs = spec.vector.tensors(device, torch.float32)
        for layer in spec.layers:
            if layer not in dirs:
                dirs[layer] = torch.zeros(B, 1, D, dtype=torch.float32, device=device)
            v = vecs[layer]
            dirs[layer][b, 0] = v / v.norm().clamp_min(1e-30) if kind == "abl" else v
        if isinstance(spec.alpha, Schedule):
            scheduled = True
            a0[b], a1[b] = spec.alpha.start, spec.alpha.end
            over[b], shape[b] = float(spec.alpha.over), _SHAPE_CODE[spec.alpha.shape]
        else:
            a0[b] = a1[b] = spec.alpha
        bias[b] = spec.value if spec.mode == "clamp" else 0.0
        win = spec.positions
        in_prompt[b] = win.in_prompt
        if win.kind == "prompt":
            hi[b] = 0
        elif win.kind == "range":
            lo[b], hi[b] = win.start, (win.stop if win.stop is not None else _NO_STOP)
        elif win.kind == "after":
            gate[b] = entry in fired[b]
        keep[b] = spec.preserve_norm and kind == "add"

    def f32(x: list[float]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float32, device=device)

    def i64(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    def bools(x: list[bool]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.bool, device=device)

    return Slot(
        kind=kind, j=j, dirs=dict(sorted(dirs.items())), has=bools(has), a0=f32(a0),
        a1=f32(a1), over=f32(over), shape=i64(shape), bias=f32(bias), lo=i64(lo), hi=i64(hi),
        gate=bools(gate), in_prompt=bools(in_prompt),
        preserve=bools(keep).view(B, 1, 1) if any(keep) else None, scheduled=scheduled,
        members=tuple(sorted(b for b, _ in cells)),
        layer_rows={k: tuple(sorted(b for b, (_, sp) in cells if k in sp.layers)) for k in dirs},
    )


def apply_layer(phase: PhaseDeltas, layer: int, h: torch.Tensor) -> torch.Tensor:
    """Block ``layer``'s output ``h (B, T, D)`` after every row's entries at that layer.

    Order (documented in docs/control.md): **ablations first** (``ablate``/``clamp``, in
    entry order, each on the state the previous one left), **then additions** (entry
    order), each ``preserve_norm`` rescaling only its own step back to the norm of the
    state it received. All of it is computed in float32 on ``x = h.float()``; the summed
    change ``Δ`` is added once, ``h + Δ.to(h.dtype)``. Fills ``phase.stats`` with, per
    slot, the sum and max over acted positions of ``‖Δ_entry‖ / ‖h_before_entry‖``
    (``dsum``/``dmax``) and, for ablative slots, of ``|h·û| / ‖h‖`` before the edit (the
    relative size of the component along û: ``csum``/``cmax``).
    """
    slots = phase.by_layer.get(layer)
    if not slots:
        return h
    x = h.float()  # (B, T, D); no copy in float32
    total: torch.Tensor | None = None  # (B, T or 1, D) float32 sum of this layer's changes
    valid = phase._valid  # (B, T) bool in prefill, None in decode (T = 1, all real)
    tag = phase.phase[0]
    for s in slots:
        assert s.coef is not None and s.cbias is not None and s.active is not None
        d_ = s.dirs[layer]  # (B, 1, D)
        cur = x if total is None else x + total
        norm = cur.norm(dim=-1, keepdim=True).clamp_min(1e-30)  # (B, T, 1)
        if s.kind == "abl":
            proj = (cur * d_).sum(dim=-1, keepdim=True)  # (B, T, 1) h·û
            size = s.cbias - s.coef * proj  # (B, T, 1) the change along û (‖û‖ = 1)
            step = size * d_  # (B, T, D)
            # (B, T, 2): ‖Δ‖/‖h‖ and |h·û|/‖h‖, from (B, T, 1) values (no pass over D)
            vals = torch.cat([size.abs(), proj.abs()], dim=-1) / norm
        else:
            step = s.coef * d_  # (B, 1, D)
            if s.preserve is not None:
                y = cur + step
                y = y * (norm / y.norm(dim=-1, keepdim=True).clamp_min(1e-30))
                step = torch.where(s.preserve, y - cur, step)
            vals = step.norm(dim=-1, keepdim=True) / norm  # (B, T, 1)
        acts = s.active.view(-1, 1, 1) if valid is None else (
            s.active.view(-1, 1) & valid).unsqueeze(-1)  # (B, T or 1, 1)
        sums = torch.where(acts, vals, 0.0).sum(1)  # (B, 1 or 2)
        maxs = torch.where(acts, vals, -math.inf).amax(1)
        for i, stat in enumerate(("d", "c")[: vals.shape[-1]]):
            phase.stats[s.name(tag, layer, stat + "sum")] = sums[:, i]
            phase.stats[s.name(tag, layer, stat + "max")] = maxs[:, i]
        total = step if total is None else total + step
    assert total is not None
    return h + total.to(h.dtype)


def apply_delta(
    h: torch.Tensor, delta: torch.Tensor, preserve: torch.Tensor | None = None
) -> torch.Tensor:
    """``h (B, T, D) + delta (B, 1, D)``; rows where ``preserve (B, 1, 1)`` is true are
    rescaled per position to the norm ``h`` had before the intervention (a plain helper
    for tests and tools; the engine uses :func:`apply_layer`)."""
    out = h + delta
    if preserve is not None:
        scale = h.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        out = torch.where(preserve, out * scale, out)
    return out


# ------------------------------------------------------------------ receipts
def summarize_receipt(
    steps: Sequence[Mapping[str, float]],
    specs: Sequence[ControlSpec],
    indices: Sequence[int] | None = None,
) -> dict[str, Any] | None:
    """The steering receipt of one row from its per-forward stat records.

    Args:
        steps: one ``{stat name: value}`` dict per forward the row took part in (prefill
            and decode; the names say which, see :meth:`Slot.name`); missing or NaN
            values mean "not acted".
        specs: the row's control entries in order.
        indices: their positions in the request's ``steering`` list (default 0, 1, …).

    Returns:
        None without control entries, else ``{"entries": [...]}`` with, per entry, its
        steering index, vector, mode, window, the layers touched, the number of prompt
        and generated positions it acted on and, per touched layer, the mean and max of
        ``‖Δh‖/‖h‖`` over those positions (``delta_mean``/``delta_max``; None when it
        never acted) and, for ``ablate``/``clamp``, the same of ``|h·û|/‖h‖`` before the
        edit (``component_mean``/``component_max``).
    """
    if not specs:
        return None
    idx = list(indices) if indices is not None else list(range(len(specs)))

    def total(key: str) -> float:
        return float(sum(v for r in steps if (v := r.get(key)) is not None and v == v))

    def peak(key: str) -> float | None:
        vals = [v for r in steps if (v := r.get(key)) is not None and v == v]
        return max(vals) if vals else None

    entries: list[dict[str, Any]] = []
    for k, spec in enumerate(specs):
        kind, j = slot_of(specs, k)
        stem = f"control.{kind}{j}"
        n_p, n_g = total(f"{stem}.p.n"), total(f"{stem}.g.n")
        n = n_p + n_g
        layers: dict[str, dict[str, float | None]] = {}
        for layer in spec.layers:
            row: dict[str, float | None] = {}
            for stat, label in (("d", "delta"),) + ((("c", "component"),) if spec.ablative
                                                    else ()):
                s = sum(total(f"{stem}.{ph}.{layer}.{stat}sum") for ph in "pg")
                peaks = [m for ph in "pg" if (m := peak(f"{stem}.{ph}.{layer}.{stat}max"))
                         is not None]
                row[f"{label}_mean"] = s / n if n > 0 else None
                row[f"{label}_max"] = max(peaks) if peaks and n > 0 else None
            layers[str(layer)] = row
        alpha: Any = (dataclasses.asdict(spec.alpha) if isinstance(spec.alpha, Schedule)
                      else spec.alpha)
        entries.append({
            "index": idx[k],
            "vector": spec.vector.name,
            "mode": spec.mode,
            "alpha" if spec.mode == "add" else "strength": alpha,
            **({"value": spec.value} if spec.mode == "clamp" else {}),
            "positions": spec.positions.to_wire(),
            "layers": list(spec.layers),
            "prompt_positions": int(n_p),
            "generated_positions": int(n_g),
            "per_layer": layers,
        })
    return {"entries": entries}


class AfterWatch:
    """Host-side ``after`` triggers of one row: feed it the text as it is emitted.

    Keeps only the last ``len(marker) − 1`` characters per marker, so a marker split over
    several tokens is found and each push costs O(len(text) + len(marker)).

    >>> w = AfterWatch({1: "</think>"})
    >>> w.push("ok </thi"), w.push("nk> done")
    ([], [1])
    """

    def __init__(self, markers: Mapping[int, str]) -> None:
        self.markers = dict(markers)
        self._tail: dict[int, str] = {k: "" for k in self.markers}
        self.fired: set[int] = set()

    @classmethod
    def of(cls, specs: Sequence[ControlSpec]) -> AfterWatch | None:
        """The watch for a row's entries (None when no entry waits for a marker)."""
        m = {k: s.positions.marker for k, s in enumerate(specs)
             if s.positions.kind == "after" and not s.is_noop}
        return cls(m) if m else None

    def push(self, text: str) -> list[int]:
        """Entries whose marker appeared with ``text`` (each fires once)."""
        if not text:
            return []
        new: list[int] = []
        for k, marker in self.markers.items():
            if k in self.fired:
                continue
            buf = self._tail[k] + text
            if marker in buf:
                self.fired.add(k)
                new.append(k)
            else:
                self._tail[k] = buf[-(len(marker) - 1):] if len(marker) > 1 else ""
        return new


# ------------------------------------------------------------------ validation
def _schedule(raw: Mapping[str, Any]) -> Schedule:
    """``alpha`` as ``{"start", "end", "over", "shape"}`` (errors name ``alpha.<key>``)."""
    try:
        check_keys(raw, {"start", "end", "over", "shape"})
        for key in ("start", "end", "over"):
            if key not in raw:
                raise ParamError(key, f"a schedule needs '{key}'")
        start = get_number(raw, "start", 0.0, lo=-MAX_ALPHA, hi=MAX_ALPHA)
        end = get_number(raw, "end", 0.0, lo=-MAX_ALPHA, hi=MAX_ALPHA)
        over = raw.get("over")
        if isinstance(over, bool) or not isinstance(over, int) or not 1 <= over <= MAX_OVER:
            raise ParamError("over", f"'over' must be an integer in [1, {MAX_OVER}], got {over!r}")
        shape = raw.get("shape", "linear")
        if shape not in SHAPES:
            raise ParamError(
                "shape", f"'shape' must be one of {', '.join(SHAPES)}, got {shape!r}"
            )
    except ParamError as err:
        raise err.with_prefix("alpha") from None
    return Schedule(start, end, over, shape)


def _window(raw: Any) -> Window:
    """``positions``: a string or ``{"from", "to"}`` / ``{"after"}``."""
    if isinstance(raw, str):
        if raw not in POSITIONS:
            raise ParamError(
                "positions",
                f"'positions' must be one of {', '.join(POSITIONS)}, {{\"from\": i, \"to\": j}} "
                f"or {{\"after\": TEXT}}, got {raw!r}",
            )
        return Window(raw)  # type: ignore[arg-type]  # checked against POSITIONS above
    if not isinstance(raw, Mapping):
        raise ParamError("positions", f"'positions' must be a string or an object, got {raw!r}")
    if "after" in raw:
        try:
            check_keys(raw, {"after"})
        except ParamError as err:
            raise err.with_prefix("positions") from None
        marker = raw["after"]
        if not isinstance(marker, str) or not 1 <= len(marker) <= MAX_MARKER:
            raise ParamError(
                "positions.after",
                f"'positions.after' must be a string of 1 to {MAX_MARKER} characters, "
                f"got {marker!r}",
            )
        return Window("after", marker=marker)
    try:
        check_keys(raw, {"from", "to"})
    except ParamError as err:
        raise err.with_prefix("positions") from None
    if "from" not in raw:
        raise ParamError("positions.from", "a token window needs 'from' (or use 'after')")
    lo, hi = raw["from"], raw.get("to")
    for key, v in (("from", lo), ("to", hi)):
        if key == "to" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_INDEX:
            raise ParamError(
                f"positions.{key}",
                f"'positions.{key}' must be an integer in [0, {MAX_INDEX}], got {v!r}",
            )
    if hi is not None and hi <= lo:
        raise ParamError(
            "positions.to", f"'positions.to' must be greater than 'from' ({lo}), got {hi}"
        )
    return Window("range", start=lo, stop=hi)


class ControlProcessor(Processor[ControlSpec]):
    """The ``type: "control"`` steering entry (see the module docstring).

    It acts inside the forward pass: the stack validates it but never runs it as a logits
    stage, and ``apply`` leaves logits unchanged. The engine turns the batch's control
    specs into :class:`PhaseDeltas` with :func:`build_phase`.
    """

    type_name = "control"

    @classmethod
    def validate(cls, params: Mapping[str, Any], env: ProcessorEnv) -> ControlSpec:
        check_keys(params, {"vector", "alpha", "layers", "positions", "preserve_norm", "mode",
                            "strength", "value"})
        name = params.get("vector")
        if not isinstance(name, str) or not name:
            raise ParamError("vector", f"'vector' must name a control vector, got {name!r}")
        vec = env.control_vectors.get(name)
        if not isinstance(vec, ControlVector):
            raise ParamError("vector", f"unknown control vector '{name}'", status=404)
        geometry = env.geometry
        D = geometry.hidden_size if geometry is not None else None
        L = geometry.num_layers if geometry is not None else None
        if D is not None and vec.hidden_size != D:
            raise ParamError(
                "vector",
                f"control vector '{name}' has hidden size {vec.hidden_size}; the serving "
                f"model's is {D}",
            )
        mode = get_choice(params, "mode", "add", MODES)
        only = {"add": ("alpha", "preserve_norm"), "ablate": ("strength",),
                "clamp": ("value",)}
        for key in ("alpha", "preserve_norm", "strength", "value"):
            if key in params and key not in only[mode]:
                raise ParamError(key, f"'{key}' does not apply to mode '{mode}'")
        alpha: float | Schedule
        value = 0.0
        if mode == "add":
            raw_alpha = params.get("alpha", 1.0)
            if isinstance(raw_alpha, Mapping):
                alpha = _schedule(raw_alpha)
            else:
                alpha = get_number(params, "alpha", 1.0, lo=-MAX_ALPHA, hi=MAX_ALPHA)
        elif mode == "ablate":
            alpha = get_number(params, "strength", 1.0, lo=0.0, hi=1.0)
        else:
            if "value" not in params:
                raise ParamError("value", "mode 'clamp' needs 'value' (the projection to set)")
            value = get_number(params, "value", 0.0, lo=-MAX_VALUE, hi=MAX_VALUE)
            alpha = 1.0
        if mode != "add":
            zero = [k for k, v in vec.directions.items() if not np.any(v)]
            if zero:
                raise ParamError("vector", f"control vector '{name}' has a zero direction at "
                                 f"layer {zero[0]}: it has no direction to {mode}")
        raw_layers = params.get("layers")
        if raw_layers is None:
            layers = vec.layers
        else:
            layers = check_layers(raw_layers, "layers")
            missing = [x for x in layers if x not in vec.directions]
            if missing:
                have = ", ".join(map(str, vec.layers))
                raise ParamError(
                    "layers",
                    f"control vector '{name}' has no direction for layer {missing[0]} "
                    f"(it has layers {have})",
                )
        if L is not None:
            bad = [x for x in layers if x >= L]
            if bad:
                raise ParamError(
                    "layers" if raw_layers is not None else "vector",
                    f"layer {bad[0]} does not exist: the serving model has {L} blocks (0-{L - 1})",
                )
        window = _window(params.get("positions", "all"))
        if isinstance(alpha, Schedule) and window.kind == "prompt":
            raise ParamError("alpha", "a schedule runs over generated tokens; positions "
                             "'prompt' has none (use a number)")
        preserve = get_bool(params, "preserve_norm", False)
        return ControlSpec(vec, alpha, layers, window, preserve, mode, value)

    def update_state(self, specs: Sequence[ControlSpec | None]) -> None:
        self._active = any(s is not None and not s.is_noop for s in specs)

    def apply(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        return logits  # the work happens in the forward hooks


def check_layers(value: Any, param: str) -> tuple[int, ...]:
    """A non-empty list of distinct non-negative ints, returned sorted."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ParamError(
            param, f"'{param}' must be a non-empty list of block indices, got {value!r}"
        )
    out: list[int] = []
    for i, x in enumerate(value):
        out.append(check_int(x, f"{param}.{i}", lo=0))
    if len(set(out)) != len(out):
        raise ParamError(param, f"'{param}' lists a layer twice: {value!r}")
    return tuple(sorted(out))


register(ControlProcessor, in_forward=True)

__all__ = [
    "METHODS",
    "AfterWatch",
    "ControlProcessor",
    "ControlSpec",
    "ControlVector",
    "LayerFit",
    "PhaseDeltas",
    "Schedule",
    "Slot",
    "Window",
    "apply_delta",
    "apply_layer",
    "build_phase",
    "check_layers",
    "control_indices",
    "control_specs",
    "expand_template",
    "fit_direction",
    "fit_layers",
    "phase_key",
    "summarize_receipt",
]
