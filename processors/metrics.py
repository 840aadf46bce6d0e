"""Per-step research metrics between the frozen model's and the steered distribution.

All functions are vectorized over the batch and return ``(B,)`` float32 tensors; they
never leave the device and never return full-vocabulary arrays.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Names of the columns ``step_stats`` returns, in order.
STEP_STAT_NAMES: tuple[str, ...] = (
    "base_nll",  # −log P_base(emitted token)
    "steered_nll",  # −log P_steered(emitted token)
    "kl_base_steered",  # KL(P_base ‖ P_steered)
    "kl_steered_base",  # KL(P_steered ‖ P_base)
    "js",  # Jensen–Shannon divergence (nats)
    "entropy_base",
    "entropy_steered",
    "argmax_flip",  # 1.0 when the steered argmax differs from the base argmax
)


def kl_from_logp(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) from log-probabilities ``(..., V)``; returns ``(...)``.

    Terms with ``p = 0`` contribute 0 even where ``q = 0`` (``-inf`` log-prob).
    """
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(-1)


def entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) from log-probabilities ``(..., V)``; returns ``(...)``."""
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def js_from_logp(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence (nats, in ``[0, ln 2]``) from log-probabilities."""
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * (kl_from_logp(logp, logm) + kl_from_logp(logq, logm))


def step_stats(
    base_logits: torch.Tensor, steered_logits: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """The per-step metrics of ``STEP_STAT_NAMES`` for every row.

    Args:
        base_logits: ``(B, V)`` the frozen model's logits.
        steered_logits: ``(B, V)`` logits after the processor stack (before sampling
            transforms such as temperature or top-k, which are decoding choices, not
            steering).
        tokens: ``(B,)`` int64, the emitted tokens.

    Returns:
        ``(B, len(STEP_STAT_NAMES))`` float32.
    """
    logp = torch.log_softmax(base_logits.float(), dim=-1)
    logq = torch.log_softmax(steered_logits.float(), dim=-1)
    idx = tokens.view(-1, 1)
    cols = [
        -logp.gather(1, idx).squeeze(1),
        -logq.gather(1, idx).squeeze(1),
        kl_from_logp(logp, logq),
        kl_from_logp(logq, logp),
        js_from_logp(logp, logq),
        entropy_from_logp(logp),
        entropy_from_logp(logq),
        (base_logits.argmax(-1) != steered_logits.argmax(-1)).float(),
    ]
    return torch.stack(cols, dim=1)


# Per-step columns whose values are discrete choices: the summary also counts each value.
HISTOGRAM_COLUMNS: tuple[str, ...] = ("fusion_alpha", "fusion_expert")


def summarize(per_step: list[dict[str, float]]) -> dict[str, Any]:
    """Aggregate one request's per-step scalars into the response's diagnostics.

    ``per_step[s]`` maps metric name → value at step ``s``; NaN means "not defined for
    this row" (e.g. a style NLL without a prior) and is left out. NLL columns become
    perplexities (exp of the mean NLL); divergences get mean and max; entropies a mean;
    ``argmax_flip`` a rate; KL and steered entropy of the first step are kept too. The
    columns of ``HISTOGRAM_COLUMNS`` also get ``<name>_histogram``: value → step count.
    """
    out: dict[str, Any] = {"steps": float(len(per_step))}
    if not per_step:
        return out
    names: list[str] = []
    for step in per_step:
        names.extend(k for k in step if k not in names)
    for name in names:
        xs = [v for step in per_step if (v := step.get(name, math.nan)) == v]
        if not xs:
            continue
        mean = sum(xs) / len(xs)
        if name.endswith("_nll"):
            stem = name[: -len("_nll")]
            out[f"{stem}_ppl"] = math.exp(min(mean, 700.0))
            out[f"{stem}_nll_mean"] = mean
        elif name == "argmax_flip":
            out["argmax_flip_rate"] = mean
        elif name.startswith("entropy"):
            out[f"{name}_mean"] = mean
        else:
            out[f"{name}_mean"] = mean
            out[f"{name}_max"] = max(xs)
        if name in HISTOGRAM_COLUMNS:
            hist: dict[str, int] = {}
            for x in sorted(xs):
                key = f"{round(x, 6):g}"
                hist[key] = hist.get(key, 0) + 1
            out[f"{name}_histogram"] = hist
    first = per_step[0]
    for name in ("kl_base_steered", "entropy_steered"):
        if name in first:
            out[f"{name}_first"] = first[name]
    return out
