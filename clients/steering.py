"""Typed builders for the entries of a request's ``steering`` list.

Each builder serializes to the wire format of DESIGN.md with ``to_wire()``, leaving out
fields that are None so the server's defaults apply. Plain dicts are accepted wherever a
builder is, for methods this SDK does not know yet.

>>> Ngram(prior="kjv", lam=0.1).to_wire()
{'type': 'ngram', 'prior': 'kjv', 'lambda': 0.1, 'scale': 'raw'}
>>> LogitBias({50256: -100}).to_wire()
{'type': 'logit_bias', 'bias': {'50256': -100}}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal


@dataclass(frozen=True)
class _Entry:
    """Base of the builders: dataclass fields → wire dict (None omitted)."""

    type_name: ClassVar[str] = ""
    #: Python field name → wire name, where they differ.
    wire_names: ClassVar[dict[str, str]] = {}

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of this steering entry."""
        out: dict[str, Any] = {"type": self.type_name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = list(value)
            out[self.wire_names.get(f.name, f.name)] = value
        return out


@dataclass(frozen=True)
class Ngram(_Entry):
    """n-gram style prior: ``logits += lam · s(log p_style(· | context))``.

    ``lam`` is sent as ``lambda`` (a Python keyword). ``scale="zscore"`` standardizes
    the prior over the vocabulary so that λ means the same across corpora.
    """

    type_name: ClassVar[str] = "ngram"
    wire_names: ClassVar[dict[str, str]] = {"lam": "lambda"}
    prior: str
    lam: float
    weights: Sequence[float] | None = None
    scale: Literal["raw", "zscore"] = "raw"


@dataclass(frozen=True)
class Schedule:
    """A strength over generated tokens: from ``start`` to ``end`` in ``over`` tokens,
    then constant (``shape``: ``linear``, ``cosine`` or ``exp``).

    >>> Schedule(2.0, 0.0, 16, "cosine").to_wire()
    {'start': 2.0, 'end': 0.0, 'over': 16, 'shape': 'cosine'}
    """

    start: float
    end: float
    over: int
    shape: Literal["linear", "cosine", "exp"] = "linear"

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of ``alpha``."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Tokens:
    """A window of generated-token indices ``[start, stop)`` (0 = the first generated
    token; ``stop`` None = open-ended).

    >>> Tokens(4).to_wire(), Tokens(0, 8).to_wire()
    ({'from': 4}, {'from': 0, 'to': 8})
    """

    start: int
    stop: int | None = None

    def to_wire(self) -> dict[str, int]:
        """The JSON object of ``positions``."""
        return {"from": self.start, **({"to": self.stop} if self.stop is not None else {})}


@dataclass(frozen=True)
class After:
    """Generated positions from the token that completes ``text`` in the output on.

    >>> After("</think>").to_wire()
    {'after': '</think>'}
    """

    text: str

    def to_wire(self) -> dict[str, str]:
        """The JSON object of ``positions``."""
        return {"after": self.text}


PositionsLike = Literal["all", "prompt", "generated"] | Tokens | After


def _wire_value(value: Any) -> Any:
    """Nested builders (Schedule, Tokens, After) as their JSON."""
    return value.to_wire() if hasattr(value, "to_wire") else value


@dataclass(frozen=True)
class Control(_Entry):
    """Control vector: ``h_ℓ += alpha · v_ℓ`` at the chosen layers and positions.

    ``alpha`` is a number or a :class:`Schedule`; ``positions`` a string, :class:`Tokens`
    or :class:`After`.

    >>> Control("mood", Schedule(2.0, 0.0, 8), positions=Tokens(2)).to_wire()["alpha"]
    {'start': 2.0, 'end': 0.0, 'over': 8, 'shape': 'linear'}
    """

    type_name: ClassVar[str] = "control"
    vector: str
    alpha: float | Schedule
    layers: Sequence[int] | None = None
    positions: PositionsLike = "all"
    preserve_norm: bool = False

    def to_wire(self) -> dict[str, Any]:
        """The JSON object, with nested builders serialized."""
        return {k: _wire_value(v) for k, v in super().to_wire().items()}


@dataclass(frozen=True)
class Ablate(_Entry):
    """Directional ablation: ``h ← h − strength · (h·û) û`` with ``û = v_ℓ / ‖v_ℓ‖``
    (``strength`` in [0, 1]; 1 removes the component along the vector).

    >>> Ablate("refusal", layers=[10, 11]).to_wire()
    {'type': 'control', 'vector': 'refusal', 'strength': 1.0, 'layers': [10, 11], \
'positions': 'all', 'mode': 'ablate'}
    """

    type_name: ClassVar[str] = "control"
    vector: str
    strength: float = 1.0
    layers: Sequence[int] | None = None
    positions: PositionsLike = "all"

    def to_wire(self) -> dict[str, Any]:
        """The JSON object (``mode: "ablate"``)."""
        out = {k: _wire_value(v) for k, v in super().to_wire().items()}
        out["mode"] = "ablate"
        return out


@dataclass(frozen=True)
class Clamp(_Entry):
    """Set the component along ``û = v_ℓ / ‖v_ℓ‖`` to ``value``:
    ``h ← h + (value − h·û) û``."""

    type_name: ClassVar[str] = "control"
    vector: str
    value: float
    layers: Sequence[int] | None = None
    positions: PositionsLike = "all"

    def to_wire(self) -> dict[str, Any]:
        """The JSON object (``mode: "clamp"``)."""
        out = {k: _wire_value(v) for k, v in super().to_wire().items()}
        out["mode"] = "clamp"
        return out


@dataclass(frozen=True)
class Fusion(_Entry):
    """Weak-to-strong logit fusion: ``M_L + Σ_t α_t (M_t − M_S)``.

    ``mode="dynamic"`` searches α per step over ``grid`` (``{"max": 2.0, "step": 0.1}``);
    ``mode="static"`` uses the fixed ``alpha`` per expert.
    """

    type_name: ClassVar[str] = "fusion"
    experts: Sequence[str]
    base: str
    mode: Literal["dynamic", "static"] = "dynamic"
    alpha: Sequence[float] | None = None
    grid: Mapping[str, float] | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object; ``grid`` as a plain dict."""
        out = super().to_wire()
        if "grid" in out:
            out["grid"] = dict(out["grid"])
        return out


@dataclass(frozen=True)
class Margin(_Entry):
    """Margin calibration: where the base model is confident (``p0(t) ≥ tau``), keep a
    steered margin of at least ``gamma · m0`` for its top token."""

    type_name: ClassVar[str] = "margin"
    tau: float
    gamma: float


@dataclass(frozen=True)
class Guard(_Entry):
    """Fluency guard, placed last (after ``Margin``): drop tokens the frozen model finds
    implausible (``P < plausibility · max P``), scale the steering by
    ``min(1, H(frozen) / entropy_scale)`` (steer more where the frozen model is unsure)
    and/or pull the steered logits back toward the frozen ones until
    ``KL(steered ‖ frozen) ≤ kl_budget`` nats per step.

    >>> Guard(plausibility=0.1, kl_budget=0.2).to_wire()
    {'type': 'guard', 'plausibility': 0.1, 'kl_budget': 0.2}
    """

    type_name: ClassVar[str] = "guard"
    plausibility: float | None = None
    kl_budget: float | None = None
    entropy_scale: float | None = None

    def __post_init__(self) -> None:
        if self.plausibility is None and self.kl_budget is None and self.entropy_scale is None:
            raise ValueError("Guard needs plausibility, kl_budget, entropy_scale or several")


@dataclass(frozen=True)
class LogitBias(_Entry):
    """Additive bias per token id (OpenAI semantics, values in [-100, 100])."""

    type_name: ClassVar[str] = "logit_bias"
    bias: Mapping[int, float]

    def to_wire(self) -> dict[str, Any]:
        """JSON object keys must be strings: ``{"<id>": value}``."""
        return {"type": self.type_name, "bias": {str(k): v for k, v in self.bias.items()}}


SteeringLike = (
    Ngram | Control | Ablate | Clamp | Fusion | Margin | Guard | LogitBias | Mapping[str, Any]
)


def steering_to_wire(entry: SteeringLike) -> dict[str, Any]:
    """A builder or a plain mapping as the wire dict (mappings are copied as given)."""
    if isinstance(entry, _Entry):
        return entry.to_wire()
    if isinstance(entry, Mapping):
        if "type" not in entry:
            raise ValueError(f"a steering entry needs a 'type', got {dict(entry)!r}")
        return dict(entry)
    raise TypeError(f"not a steering entry: {entry!r}")


def contrast_pairs(
    template: str, positive_words: Sequence[str], negative_words: Sequence[str]
) -> list[dict[str, str]]:
    """Contrastive prompt pairs for ``vectors.extract`` from a template and two word lists.

    ``template`` has one ``{}``; words are zipped, so both lists need the same length:

        >>> contrast_pairs("I feel {}.", ["happy"], ["sad"])
        [{'positive': 'I feel happy.', 'negative': 'I feel sad.'}]
    """
    if template.count("{}") != 1:
        raise ValueError("template must contain exactly one '{}'")
    if len(positive_words) != len(negative_words) or not positive_words:
        raise ValueError("positive_words and negative_words need the same, non-zero length")
    return [
        {"positive": template.format(p), "negative": template.format(n)}
        for p, n in zip(positive_words, negative_words, strict=True)
    ]
