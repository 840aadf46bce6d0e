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
* **the per-row delta builder** :func:`build_phase` — ``(B, 1, D)`` deltas per layer that
  the engine's forward hooks (``server.engine.hooks``) add to the residual stream.

Layer indices are 0-based block indices: layer ``ℓ`` is the output of
``model.model.layers[ℓ]`` (after its residual add), i.e. ``hidden_states[ℓ + 1]`` in
transformers' ``output_hidden_states`` numbering. GGUF ``direction.N`` maps to layer ``N``.

Scale: an extracted vector is the unit direction ``u`` times the mean positive−negative
gap along it, ``mean((h⁺ − h⁻)·u)``. So ``α = 1`` shifts a state by one average gap
(for ``mean_diff`` the vector *is* the mean difference), and ``α`` means roughly the same
across layers and models. Imported GGUF vectors are used as they are.

Request parameters (``steering[]`` entry):

* ``vector`` — the artifact's name (unknown → 404);
* ``alpha`` — strength in ``[-100, 100]`` (default 1.0); ``alpha = 0`` leaves the row
  bit-identical to an unsteered run (the entry is skipped entirely);
* ``layers`` — which of the vector's layers to apply (default: all of them);
* ``positions`` — ``"all"`` (default), ``"prompt"`` (prefill positions only) or
  ``"generated"`` (decode positions only);
* ``preserve_norm`` — rescale each steered state back to its pre-intervention norm.

Several control entries in one request add up (each with its own α, layers, positions).

Example:
    >>> import numpy as np, torch
    >>> v = ControlVector("up", {1: np.ones(4, dtype=np.float32)})
    >>> env = ProcessorEnv(vocab_size=8, resources={"control_vectors": {"up": v}})
    >>> spec = ControlProcessor.validate({"vector": "up", "alpha": 2.0}, env)
    >>> phase = build_phase([(spec,), ()], "prompt", torch.device("cpu"), torch.float32)
    >>> phase.deltas[1][:, 0]
    tensor([[2., 2., 2., 2.],
            [0., 0., 0., 0.]])
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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
METHODS: tuple[str, ...] = ("pca_diff", "pca_center", "mean_diff")
POSITIONS: tuple[Positions, ...] = ("all", "prompt", "generated")
MAX_ALPHA = 100.0
ARTIFACT_FORMAT = 1
RESOURCE = "control_vectors"  # ProcessorEnv.resources key of the loaded vectors
GEOMETRY = "model_geometry"  # resources key: {"num_layers": L, "hidden_size": D}


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
class ControlSpec:
    """One request's validated control entry."""

    vector: ControlVector
    alpha: float
    layers: tuple[int, ...]
    positions: Positions = "all"
    preserve_norm: bool = False

    def acts_in(self, phase: Phase) -> bool:
        """Whether this entry changes anything in ``phase`` (α = 0 never does)."""
        return self.alpha != 0.0 and self.positions in (phase, "all")

    def key(self) -> tuple[Any, ...]:
        """Hashable identity of what the entry adds (shared-prefill grouping)."""
        return (self.vector.uid, self.alpha, self.layers, self.preserve_norm)


def control_specs(steering: Iterable[StackEntry]) -> tuple[ControlSpec, ...]:
    """The control entries of one request's validated stack, in order."""
    return tuple(e.spec for e in steering if e.type == ControlProcessor.type_name)


def phase_key(specs: Sequence[ControlSpec], phase: Phase) -> tuple[Any, ...]:
    """What ``specs`` add in ``phase`` — equal keys mean equal deltas (``()`` = none)."""
    return tuple(s.key() for s in specs if s.acts_in(phase))


@dataclass(frozen=True)
class PhaseDeltas:
    """Per-row deltas of one forward pass, for the layers some row steers.

    Attributes:
        deltas: block index → ``(B, 1, D)`` tensor added to the block's output
            ``(B, T, D)`` (zeros for rows that do not steer that layer).
        preserve: block index → ``(B, 1, 1)`` bool, rows whose steered state is rescaled to
            its pre-intervention norm; only layers where some row asks are present.
    """

    deltas: dict[int, torch.Tensor]
    preserve: dict[int, torch.Tensor]

    @property
    def batch_size(self) -> int:
        """``B``."""
        return int(next(iter(self.deltas.values())).shape[0])


def build_phase(
    rows: Sequence[Sequence[ControlSpec]],
    phase: Phase,
    device: torch.device,
    dtype: torch.dtype,
) -> PhaseDeltas | None:
    """The deltas of every row in ``phase`` (``prompt`` = prefill, ``generated`` = decode).

    Host side, called when the batch composition changes; Python loops over rows are fine
    here. Returns None when no row steers in this phase, so the hooks do nothing.
    """
    B = len(rows)
    acc: dict[int, torch.Tensor] = {}
    keep: dict[int, list[bool]] = {}
    for b, specs in enumerate(rows):
        for spec in specs:
            if not spec.acts_in(phase):
                continue
            dirs = spec.vector.tensors(device, dtype)
            for layer in spec.layers:
                if layer not in acc:
                    acc[layer] = torch.zeros(B, dirs[layer].shape[0], device=device, dtype=dtype)
                    keep[layer] = [False] * B
                acc[layer][b] += spec.alpha * dirs[layer]
                keep[layer][b] = keep[layer][b] or spec.preserve_norm
    if not acc:
        return None
    deltas = {k: v.view(B, 1, -1) for k, v in sorted(acc.items())}
    preserve = {
        k: torch.tensor(flags, dtype=torch.bool, device=device).view(B, 1, 1)
        for k, flags in keep.items()
        if any(flags)
    }
    return PhaseDeltas(deltas, preserve)


def apply_delta(
    h: torch.Tensor, delta: torch.Tensor, preserve: torch.Tensor | None = None
) -> torch.Tensor:
    """``h (B, T, D) + delta (B, 1, D)``; rows where ``preserve (B, 1, 1)`` is true are
    rescaled per position to the norm ``h`` had before the intervention."""
    out = h + delta
    if preserve is not None:
        scale = h.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        out = torch.where(preserve, out * scale, out)
    return out


class ControlProcessor(Processor[ControlSpec]):
    """The ``type: "control"`` steering entry (see the module docstring).

    It acts inside the forward pass: the stack validates it but never runs it as a logits
    stage, and ``apply`` leaves logits unchanged. The engine turns the batch's control
    specs into :class:`PhaseDeltas` with :func:`build_phase`.
    """

    type_name = "control"

    @classmethod
    def validate(cls, params: Mapping[str, Any], env: ProcessorEnv) -> ControlSpec:
        check_keys(params, {"vector", "alpha", "layers", "positions", "preserve_norm"})
        name = params.get("vector")
        if not isinstance(name, str) or not name:
            raise ParamError("vector", f"'vector' must name a control vector, got {name!r}")
        vectors = env.resources.get(RESOURCE) or {}
        vec = vectors.get(name)
        if not isinstance(vec, ControlVector):
            raise ParamError("vector", f"unknown control vector '{name}'", status=404)
        geometry = env.resources.get(GEOMETRY) or {}
        D, L = geometry.get("hidden_size"), geometry.get("num_layers")
        if D is not None and vec.hidden_size != D:
            raise ParamError(
                "vector",
                f"control vector '{name}' has hidden size {vec.hidden_size}; the serving "
                f"model's is {D}",
            )
        alpha = get_number(params, "alpha", 1.0, lo=-MAX_ALPHA, hi=MAX_ALPHA)
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
        positions = get_choice(params, "positions", "all", POSITIONS)
        preserve = get_bool(params, "preserve_norm", False)
        return ControlSpec(vec, float(alpha), layers, positions, preserve)

    def update_state(self, specs: Sequence[ControlSpec | None]) -> None:
        self._active = any(s is not None and s.alpha != 0.0 for s in specs)

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
    "ControlProcessor",
    "ControlSpec",
    "ControlVector",
    "LayerFit",
    "PhaseDeltas",
    "apply_delta",
    "build_phase",
    "check_layers",
    "control_specs",
    "expand_template",
    "fit_direction",
    "fit_layers",
    "phase_key",
]
