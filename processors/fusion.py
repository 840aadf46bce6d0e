"""Dynamic weak-to-strong logit fusion (and its static special case, proxy-tuning).

After "On Giant's Shoulders: Effortless Weak to Strong by Dynamic Logits Fusion". The
main model is the strong base ``L``; the server also runs a small base ``S`` and small
experts ``t = 1..T`` fine-tuned from it (auxiliary models, all sharing one vocabulary).
With ``M_x = log_softmax(logits_x)`` in float32:

    fused = M_L + Σ_t α_t · (M_t − M_S)

``M_L`` is the logits this processor receives (the main model's, after any earlier
entries of the request's stack), so stacking composes.

* **static** (proxy-tuning): ``α_t`` fixed by the request, one per expert.
* **dynamic** (default): per step and row, the experts are searched one at a time with
  the others at 0. For expert ``t`` and grid point ``α ∈ {min, min + step, …, max}``
(``min`` defaults to 0; a negative α moves away from the expert) the
  candidate is ``P̃_{t,α} = softmax(M_L + α (M_t − M_S))`` and its objective is the one
  term of the paper's sum that belongs to the searched expert (the other experts' α are
  0, so their terms would only compare ``P̃`` with experts that are not in it)::

      J(t, α) = (KL(P̃_{t,α} ‖ P) − KL(Q_t ‖ Q))² + (KL(P ‖ P̃_{t,α}) − KL(Q ‖ Q_t))²

  with ``P = softmax(M_L)``, ``Q = softmax(M_S)``, ``Q_t = softmax(M_t)``. The step uses
  the single candidate ``(t*, α*) = argmin_{t,α} J`` (ties: lowest ``t``, then lowest
  ``α``). The ``T × G`` candidates of all rows are evaluated in chunks of grid points,
  each chunk one ``(B, T, g, V)`` float32 buffer of at most ``memory_budget`` bytes
  (:data:`DEFAULT_MEMORY_BUDGET`, the server's ``fusion_memory_mb`` setting; at least
  one grid point per chunk), so memory is bounded whatever the batch, vocabulary and
  grid; each candidate's numbers are computed the same way in any chunking. With one
  expert this is exactly the paper's objective.

Engine contract: ``ctx.aux_logits`` maps an auxiliary model's name to its
``(B, V)`` float32 next-token logits for the current step, for every auxiliary model
that some row of the batch uses; rows that do not use a model hold zeros there (and are
never read by this processor). Names and roles are checked in ``validate`` against
``env.aux_roles`` (name → role).

Diagnostics (``ctx.stats``, NaN on rows without fusion): ``fusion_alpha`` and
``fusion_expert`` (index into the request's ``experts``; dynamic rows only),
``fusion_kl_fused_strong`` = KL(P̃‖P), ``fusion_kl_strong_fused`` = KL(P‖P̃),
``fusion_kl_expert_small`` = KL(Q_t‖Q), ``fusion_kl_small_expert`` = KL(Q‖Q_t) (for the
chosen expert; static rows: the first expert) and ``fusion_objective`` (dynamic rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from processors.base import (
    ParamError,
    Processor,
    ProcessorEnv,
    StepContext,
    check_keys,
    check_number,
    get_choice,
    get_number,
)
from processors.metrics import kl_from_logp
from processors.stack import register

ROLE_SMALL_BASE = "small_base"
ROLE_EXPERT = "expert"
ROLES = (ROLE_SMALL_BASE, ROLE_EXPERT)

DEFAULT_GRID_MIN = 0.0
DEFAULT_GRID_MAX = 2.0
DEFAULT_GRID_STEP = 0.1
MAX_GRID_POINTS = 101
MAX_ALPHA = 100.0
# Bytes of the float32 candidate buffer of one dynamic-fusion chunk (see dynamic_fusion).
DEFAULT_MEMORY_BUDGET = 256 * 2**20

FUSION_STATS = (
    "fusion_alpha",
    "fusion_expert",
    "fusion_kl_fused_strong",
    "fusion_kl_strong_fused",
    "fusion_kl_expert_small",
    "fusion_kl_small_expert",
    "fusion_objective",
)


@dataclass(frozen=True)
class FusionSpec:
    """Validated fusion entry.

    ``alpha`` holds one weight per expert (static mode, empty in dynamic mode); the grid
    is ``{grid_min, grid_min + grid_step, …}`` up to ``grid_max`` (dynamic mode).
    ``grid_min`` defaults to 0 and may be negative (α < 0 moves away from the expert).
    """

    experts: tuple[str, ...]
    base: str
    mode: str = "dynamic"
    alpha: tuple[float, ...] = ()
    grid_max: float = DEFAULT_GRID_MAX
    grid_step: float = DEFAULT_GRID_STEP
    grid_min: float = DEFAULT_GRID_MIN

    @property
    def grid_points(self) -> int:
        """Number of α values searched (``floor((max − min)/step) + 1``, robust to
        rounding)."""
        return int(math.floor((self.grid_max - self.grid_min) / self.grid_step + 1e-9)) + 1

    def grid(self) -> list[float]:
        """The α values searched, ascending from ``grid_min``."""
        return [self.grid_min + g * self.grid_step for g in range(self.grid_points)]

    @property
    def models(self) -> tuple[str, ...]:
        """Every auxiliary model this entry needs (base first)."""
        return (self.base, *self.experts)


def fusion_models(steering: Sequence[Any]) -> set[str]:
    """Auxiliary model names used by a request's stack (``StackEntry`` sequence)."""
    names: set[str] = set()
    for entry in steering:
        if entry.type == "fusion":
            names.update(entry.spec.models)
    return names


def _model(name: Any, param: str, role: str, roles: Mapping[str, str]) -> str:
    if not isinstance(name, str) or not name:
        raise ParamError(param, f"'{param}' must be an auxiliary model name, got {name!r}")
    if name not in roles:
        known = ", ".join(f"{n} ({r})" for n, r in sorted(roles.items())) or "none configured"
        raise ParamError(
            param, f"no auxiliary model named '{name}' (available: {known})", status=404
        )
    if roles[name] != role:
        raise ParamError(
            param, f"auxiliary model '{name}' has role '{roles[name]}', '{param}' needs a "
            f"model with role '{role}'",
        )
    return name


class LogitFusion(Processor[FusionSpec]):
    """Weak-to-strong logit fusion over auxiliary models' logits from ``ctx.aux_logits``.

    Example (static, α = 1: the expert's shift on top of the strong model):
        >>> import torch
        >>> from processors.base import ProcessorEnv, StepContext
        >>> env = ProcessorEnv(3, aux_roles={"s": "small_base", "e": "expert"})
        >>> spec = LogitFusion.validate(
        ...     {"experts": ["e"], "base": "s", "mode": "static", "alpha": [1.0]}, env)
        >>> p = LogitFusion(torch.device("cpu"), 3)
        >>> p.update_state([spec])
        >>> strong = torch.zeros(1, 3)
        >>> aux = {"s": torch.zeros(1, 3), "e": torch.tensor([[0.0, 0.0, 5.0]])}
        >>> ctx = StepContext(base_logits=strong, last_tokens=torch.full((1, 2), -1),
        ...                   aux_logits=aux)
        >>> int(p.apply(ctx, strong).argmax())
        2
    """

    type_name = "fusion"
    memory_budget: int = DEFAULT_MEMORY_BUDGET

    def configure(self, options: Mapping[str, Any]) -> None:
        """Take ``fusion_memory_budget`` (bytes per candidate chunk) from the server."""
        self.memory_budget = int(options.get("fusion_memory_budget", DEFAULT_MEMORY_BUDGET))

    @classmethod
    def validate(cls, params: Mapping[str, Any], env: ProcessorEnv) -> FusionSpec:
        """Check names and roles against ``env.aux_roles`` and the grid."""
        check_keys(params, {"experts", "base", "mode", "alpha", "grid"})
        roles = env.aux_roles
        experts = params.get("experts")
        if isinstance(experts, str):
            experts = [experts]
        if not isinstance(experts, (list, tuple)) or not experts:
            raise ParamError("experts", "'experts' must be a non-empty list of model names")
        names = tuple(_model(e, f"experts.{i}", ROLE_EXPERT, roles) for i, e in enumerate(experts))
        if len(set(names)) != len(names):
            raise ParamError("experts", "'experts' lists a model twice")
        base = params.get("base")
        if base is None:
            bases = sorted(n for n, r in roles.items() if r == ROLE_SMALL_BASE)
            if len(bases) != 1:
                raise ParamError(
                    "base", "'base' is required (the small base model the experts were "
                    f"tuned from); configured small bases: {', '.join(bases) or 'none'}",
                    status=404 if not bases else 400,
                )
            base = bases[0]
        base = _model(base, "base", ROLE_SMALL_BASE, roles)
        mode = get_choice(params, "mode", "dynamic", ("dynamic", "static"))
        if mode == "static":
            if "grid" in params:
                raise ParamError("grid", "'grid' is only used with mode 'dynamic'")
            alpha = params.get("alpha")
            if not isinstance(alpha, (list, tuple)) or len(alpha) != len(names):
                raise ParamError(
                    "alpha", f"mode 'static' needs 'alpha': a list of {len(names)} number(s), "
                    f"one per expert, got {alpha!r}",
                )
            alphas = tuple(
                check_number(a, f"alpha.{i}", lo=-MAX_ALPHA, hi=MAX_ALPHA)
                for i, a in enumerate(alpha)
            )
            return FusionSpec(names, base, "static", alphas)
        if "alpha" in params:
            raise ParamError("alpha", "'alpha' is only used with mode 'static'")
        grid = params.get("grid", {})
        if not isinstance(grid, Mapping):
            raise ParamError("grid", f"'grid' must be an object {{max, step}}, got {grid!r}")
        for key in grid:
            if key not in ("min", "max", "step"):
                raise ParamError(
                    f"grid.{key}", f"unknown field 'grid.{key}' (known: min, max, step)"
                )
        gmin = get_number(
            grid, "min", DEFAULT_GRID_MIN, lo=-MAX_ALPHA, hi=MAX_ALPHA, param="grid.min"
        )
        gmax = get_number(grid, "max", DEFAULT_GRID_MAX, lo=gmin, hi=MAX_ALPHA, param="grid.max")
        gstep = get_number(
            grid, "step", DEFAULT_GRID_STEP, lo=0.0, lo_open=True, hi=2 * MAX_ALPHA,
            param="grid.step",
        )
        spec = FusionSpec(names, base, "dynamic", (), gmax, gstep, gmin)
        if spec.grid_points > MAX_GRID_POINTS:
            raise ParamError(
                "grid", f"the grid has {spec.grid_points} points (max/step + 1); at most "
                f"{MAX_GRID_POINTS} are allowed",
            )
        return spec

    def update_state(self, specs: Sequence[FusionSpec | None]) -> None:
        """Per-row model indices, weights, grids and masks as device tensors.

        Only the ``n`` rows that use fusion are computed on (``_sel (n,)`` their batch
        indices). Built tensors (``T`` = most experts of a row, ``G`` = largest grid):
        ``_names`` the auxiliary models used, ``_base_idx (n,)`` and ``_exp_idx (n,T)``
        indices into ``_names`` (padded expert slots point at the row's base, so their
        shift is exactly 0), ``_alpha (n,T)`` static weights, ``_grid (n,1,G)`` α values,
        ``_valid (n,T,G)`` real candidates, ``_dyn (n,1)`` dynamic rows.
        """
        used = [(b, s) for b, s in enumerate(specs) if s is not None]
        self._active = bool(used)
        if not used:
            return
        names = sorted({m for _, s in used for m in s.models})
        index = {m: i for i, m in enumerate(names)}
        n = len(used)
        T = max(len(s.experts) for _, s in used)
        G = max((s.grid_points for _, s in used if s.mode == "dynamic"), default=1)
        base_idx = torch.zeros(n, dtype=torch.long)
        exp_idx = torch.zeros(n, T, dtype=torch.long)
        alpha = torch.zeros(n, T)
        grid = torch.zeros(n, 1, G)
        valid = torch.zeros(n, T, G, dtype=torch.bool)
        dyn = torch.zeros(n, 1, dtype=torch.bool)
        for i, (_, s) in enumerate(used):
            base_idx[i] = index[s.base]
            exp_idx[i] = index[s.base]
            for t, name in enumerate(s.experts):
                exp_idx[i, t] = index[name]
            if s.mode == "static":
                alpha[i, : len(s.alpha)] = torch.tensor(s.alpha)
            else:
                dyn[i] = True
                g = s.grid_points
                grid[i, 0, :g] = torch.tensor(s.grid(), dtype=torch.float32)
                valid[i, : len(s.experts), :g] = True
        dev = self.device
        self._names = names
        self._n = n
        self._all_rows = n == len(specs)
        self._sel = torch.tensor([b for b, _ in used], dtype=torch.long, device=dev)
        self._rows = torch.arange(n, device=dev).view(n, 1)
        self._base_idx = base_idx.to(dev)
        self._exp_idx = exp_idx.to(dev)
        self._alpha = alpha.to(dev)
        self._grid = grid.to(dev)
        self._valid = valid.to(dev)
        self._dyn = dyn.to(dev)
        self._any_dyn = bool(dyn.any())
        self._any_static = not bool(dyn.all())

    def _inputs(
        self, ctx: StepContext, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``M_L (n,V)``, ``M_S (n,V)`` and ``M_t (n,T,V)``: float32 log-probs of the
        fusion rows."""
        aux = ctx.aux_logits
        stacked = torch.stack([aux[m] for m in self._names])  # (N, B, V)
        if not self._all_rows:
            stacked, logits = stacked.index_select(1, self._sel), logits.index_select(0, self._sel)
        m_all = torch.log_softmax(stacked.float(), dim=-1)  # (N, n, V)
        m_small = m_all[self._base_idx, self._rows.view(-1)]  # (n, V)
        m_exp = m_all[self._exp_idx, self._rows]  # (n, T, V)
        m_strong = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
        return m_strong, m_small, m_exp

    def apply(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        """Fused logits ``(B, V)`` for fusion rows; other rows are returned unchanged."""
        B, V = logits.shape
        n = self._n
        m_strong, m_small, m_exp = self._inputs(ctx, logits)
        stats: dict[str, torch.Tensor] = {}
        nan = torch.full((n,), math.nan, device=logits.device)
        if self._any_static:
            delta = m_exp - m_small.unsqueeze(1)  # (n, T, V); 0 on padded slots
            out = m_strong + (self._alpha.unsqueeze(-1) * delta).sum(1)  # (n, V)
            if ctx.want_stats:
                stats.update(_kl_stats(m_strong, out, m_small, m_exp[:, 0]))
        if self._any_dyn:
            fused, (t_idx, a_val, obj) = dynamic_fusion(
                m_strong, m_small, m_exp, self._grid, self._valid, self.memory_budget
            )
            out = torch.where(self._dyn, fused, out) if self._any_static else fused
            if ctx.want_stats:
                m_chosen = m_exp.gather(1, t_idx.view(n, 1, 1).expand(n, 1, V)).squeeze(1)
                dyn_stats = _kl_stats(m_strong, fused, m_small, m_chosen)
                dyn_stats["fusion_alpha"] = a_val
                dyn_stats["fusion_expert"] = t_idx.float()
                dyn_stats["fusion_objective"] = obj
                d = self._dyn.view(-1)
                for name, value in dyn_stats.items():
                    stats[name] = torch.where(d, value, stats.get(name, nan))
        if ctx.want_stats:
            for name in FUSION_STATS:
                value = stats.get(name, nan)
                if not self._all_rows:
                    # Another stage's fusion instance may own other rows of this batch.
                    prev = ctx.stats.get(name)
                    if prev is None:
                        prev = torch.full((B,), math.nan, device=logits.device)
                    value = prev.index_copy(0, self._sel, value)
                ctx.stats[name] = value
        out = out.to(logits.dtype)
        if self._all_rows:
            return out
        return logits.index_copy(0, self._sel, out)


def _kl_stats(
    m_strong: torch.Tensor, fused: torch.Tensor, m_small: torch.Tensor, m_expert: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The four KLs of the objective for one fused distribution; each ``(B,)``."""
    lp_fused = torch.log_softmax(fused, dim=-1)
    return {
        "fusion_kl_fused_strong": kl_from_logp(lp_fused, m_strong),
        "fusion_kl_strong_fused": kl_from_logp(m_strong, lp_fused),
        "fusion_kl_expert_small": kl_from_logp(m_expert, m_small),
        "fusion_kl_small_expert": kl_from_logp(m_small, m_expert),
    }


def dynamic_fusion(
    m_strong: torch.Tensor,
    m_small: torch.Tensor,
    m_exp: torch.Tensor,
    grid: torch.Tensor,
    valid: torch.Tensor,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The grid search of the dynamic mode for all rows at once, in bounded memory.

    Args:
        m_strong: ``(B, V)`` log-probs of the strong model (``log P``).
        m_small: ``(B, V)`` log-probs of the small base (``log Q``).
        m_exp: ``(B, T, V)`` log-probs of the experts (``log Q_t``).
        grid: ``(B, 1, G)`` α values per row.
        valid: ``(B, T, G)`` bool, the candidates that exist for each row.
        memory_budget: bytes allowed for one chunk's ``(B, T, g, V)`` float32 buffer;
            ``g = max(1, budget // (4·B·T·V))`` grid points per chunk.

    Returns:
        ``fused (B, V)`` = ``M_L + α* (M_{t*} − M_S)`` and ``(t* (B,) int64, α* (B,),
        J(t*, α*) (B,))``.
    """
    B, T, V = m_exp.shape
    G = grid.shape[-1]
    delta = m_exp - m_small.unsqueeze(1)  # d_t = M_t − M_S  (B, T, V)
    # Candidate (t, g): c = M_L + α_g d_t, log P̃ = c − lse(c). Because M_L = log P is
    # normalized, both KLs need only lse(c) and E_P̃[d_t] (no (B,T·G,V) log-softmax):
    #   KL(P‖P̃) = lse − α E_P[d_t],   KL(P̃‖P) = α E_P̃[d_t] − lse.
    # The (B, T, g, V) buffer of exp(c − max c) is built for ``g`` grid points at a time
    # so that it never exceeds ``memory_budget`` bytes.
    g_chunk = max(1, min(G, int(memory_budget) // max(1, B * T * V * 4)))
    lse_parts, wd_parts, z_parts = [], [], []
    for g0 in range(0, G, g_chunk):
        g1 = min(G, g0 + g_chunk)
        alpha = grid[..., g0:g1].reshape(B, 1, g1 - g0, 1)
        w = m_strong.view(B, 1, 1, V) + alpha * delta.view(B, T, 1, V)  # (B, T, g, V)
        shift = w.amax(dim=-1, keepdim=True)  # (B, T, g, 1)
        w.sub_(shift).exp_()  # exp(c − max c), in place: one buffer per chunk
        z = w.sum(dim=-1)  # (B, T, g)
        wd_parts.append(torch.matmul(w, delta.unsqueeze(-1)).squeeze(-1))  # Σ_v w·d_t
        lse_parts.append(shift.squeeze(-1) + z.log())
        z_parts.append(z)
        del w
    z = torch.cat(z_parts, dim=-1)  # (B, T, G)
    wd = torch.cat(wd_parts, dim=-1)
    lse = torch.cat(lse_parts, dim=-1)
    a = grid.view(B, 1, G)
    e_fused = wd / z  # E_P̃[d_t]
    e_strong = (m_strong.exp().unsqueeze(1) * delta).sum(-1, keepdim=True)  # E_P[d_t] (B,T,1)
    kl_fused_strong = a * e_fused - lse  # KL(P̃‖P)
    kl_strong_fused = lse - a * e_strong  # KL(P‖P̃)
    small = m_small.unsqueeze(1)
    kl_exp_small = kl_from_logp(m_exp, small)  # KL(Q_t‖Q)  (B, T)
    kl_small_exp = kl_from_logp(small.expand_as(m_exp), m_exp)  # KL(Q‖Q_t)
    obj = (kl_fused_strong - kl_exp_small.unsqueeze(-1)) ** 2 + (
        kl_strong_fused - kl_small_exp.unsqueeze(-1)
    ) ** 2
    obj = torch.where(valid, obj, torch.full_like(obj, math.inf)).view(B, T * G)
    best_obj, k = obj.min(dim=1)  # first minimum: lowest t, then lowest α
    t_idx = torch.div(k, G, rounding_mode="floor")
    alpha_best = grid.view(B, G).gather(1, (k % G).view(B, 1)).squeeze(1)  # (B,)
    d_best = delta.gather(1, t_idx.view(B, 1, 1).expand(B, 1, V)).squeeze(1)  # (B, V)
    fused = m_strong + alpha_best.unsqueeze(1) * d_best
    return fused, (t_idx, alpha_best, best_obj)


register(LogitFusion)
