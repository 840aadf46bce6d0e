"""The fluency guard: keep the steered distribution close to the frozen model's.

A stack-level entry, placed last (after ``margin`` when both are present). Whatever ran
before it (an n-gram prior, fusion, a logit bias, or a control vector in the forward
pass) produced the steered logits ``L (B, V)``; the frozen model's are
``ctx.base_logits`` ``b (B, V)`` (for control-steered rows the unsteered twin's). Three
rules, each optional (at least one), composed in this order:

* ``plausibility`` β ∈ (0, 1) — the adaptive plausibility constraint of contrastive
  decoding: tokens ``j`` with ``P(j) < β · max_k P(k)`` under the frozen model (that is
  ``b_j < max b + log β``) are removed, so steering only chooses among tokens the frozen
  model finds plausible. Removed tokens get a finite floor ``MASK_DEPTH`` nats below the
  row's best logit: probability exactly 0 in float32, while every diagnostic stays finite.
* ``entropy_scale`` h > 0 (nats) — steer more where the frozen model is uncertain: the
  steering direction ``L − b`` of each row is scaled by ``w = min(1, H(P) / h)``, ``H(P)``
  the frozen model's entropy at this step (full vocabulary), so a confident step keeps
  little of the steering and a step at entropy ``≥ h`` keeps all of it.
* ``kl_budget`` ε > 0 (nats) — per row and step the steered logits are pulled back toward
  the frozen ones, ``b + s · (L − b)`` with the largest ``s ∈ [0, 1]`` such that
  ``KL(P̃_s ‖ P_S) ≤ ε``, where ``P_S`` is the frozen distribution renormalized on the
  tokens the mask (and any earlier hard ban, a non-finite ``L``) allows. Measuring the
  budget against ``P_S`` rather than ``P`` makes the mask a constraint that does not spend
  the budget (``KL(Q ‖ P) = KL(Q ‖ P_S) − log P(S)`` for ``Q`` on ``S``) and keeps ``s = 0``
  always feasible.

Finding ``s``: with ``d = L − b`` and ``a = log P_S``, ``P̃_s ∝ exp(a + s d)`` is an
exponential family, so ``K(s) = KL(P̃_s ‖ P_S) = s·E_s[d] − log Σ exp(a + s d)`` and
``K'(s) = s · Var_s[d] ≥ 0``: ``K`` rises monotonically from ``K(0) = 0``. Near 0 it grows
like ``s²``, far out like ``s``, so ``log K`` is close to linear in ``log s``; Newton's method
on ``g(t) = log K(eᵗ) − log ε`` (slope ``s² Var_s[d] / K``) starting at ``s = 1`` converges
in a few steps, typically from the feasible side. It runs at most ``NEWTON_EVALS``
evaluations batched over all rows (no per-row loop; one host sync per evaluation to stop
once every row has settled, see :func:`budget_weights`) and keeps the largest *evaluated*
``s`` whose ``K(s) ≤ ε`` (0 when none), so the budget always holds.

The budget acts on the entropy-scaled direction ``w·d``. The total weight ``w·s``
(``guard_s``, 1 = steering untouched), the achieved ``K`` (``guard_kl``) and the frozen
mass the mask removed (``guard_masked_mass``) go to the per-step diagnostics.

Cost: with the mask on, only the tokens it keeps matter (the rest have weight exactly 0),
so the work runs on ``(B, k)`` gathered by one ``topk``, ``k`` the widest row's kept count
(typically a handful of the 49152); with ``kl_budget`` alone it runs on ``(B, V)``;
``entropy_scale`` adds one softmax over ``(B, V)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from processors.base import (
    ParamError,
    Processor,
    ProcessorEnv,
    StepContext,
    check_keys,
    get_number,
)
from processors.stack import register

#: Most evaluations of ``K(s)`` per step (the first at ``s = 1``); each is a few passes
#: over the row's support. Rows usually settle in 2–4 (``SETTLE``).
NEWTON_EVALS = 6
#: Newton aims at ``K = AIM · ε`` so that it converges to a feasible ``s``.
AIM = 0.98
#: A row is settled once its best feasible ``K ≥ SETTLE · AIM · ε`` (``s`` then within
#: about 1 % of the optimum): it stops changing and needs no more evaluations.
SETTLE = 0.99
#: The plausibility mask works on a gathered support when the largest row keeps at most
#: this fraction of the vocabulary (it usually keeps a handful of tokens).
GATHER_FRACTION = 0.25
#: How far (nats) below the row's best logit a removed token is put: exp(−1e4) is 0.
MASK_DEPTH = 1.0e4
#: Largest accepted ``kl_budget`` (nats); no real budget is near it.
MAX_KL_BUDGET = 100.0
#: Largest accepted ``entropy_scale`` (nats): ln 49152 ≈ 10.8 is the most any row can have.
MAX_ENTROPY_SCALE = 20.0


@dataclass(frozen=True)
class GuardSpec:
    """Validated guard entry; ``None`` means that rule is off."""

    plausibility: float | None
    kl_budget: float | None
    entropy_scale: float | None = None


def moments_basis(d: torch.Tensor) -> torch.Tensor:
    """``(B, V, 3)`` stack of ``[1, d, d²]``: one batched matrix product with it gives a
    row's mass, first and second moment of ``d`` in one pass over the weights."""
    return torch.stack([torch.ones_like(d), d, d * d], dim=-1)


def kl_curve(a: torch.Tensor, d: torch.Tensor, basis: torch.Tensor,
             s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``K(s)`` and ``s² Var_s[d]`` for each row.

    Args:
        a: ``(B, V)`` float32 log-probabilities of ``P_S`` (``-inf`` outside ``S``).
        d: ``(B, V)`` float32 steering direction ``L − b`` (0 outside ``S``).
        basis: ``(B, V, 3)`` :func:`moments_basis` of ``d``.
        s: ``(B, 1)`` float32 interpolation weights.

    Returns:
        ``(K, s²·Var)``, each ``(B, 1)``; ``K ≥ 0`` up to rounding (clamped at 0).
    """
    z = torch.addcmul(a, d, s)  # (B, V) a + s·d
    zmax = z.amax(dim=-1, keepdim=True)
    e = z.sub_(zmax).exp_()  # (B, V) unnormalized P̃_s, 0 outside S (in place: no copy)
    mom = torch.bmm(e.unsqueeze(1), basis).squeeze(1)  # (B, 3): Σe, Σe·d, Σe·d²
    total = mom[:, 0:1]
    m1 = mom[:, 1:2] / total  # E_s[d]
    m2 = mom[:, 2:3] / total  # E_s[d²]
    lse = zmax + torch.log(total)
    kl = (s * m1 - lse).clamp(min=0.0)
    slope = s * s * (m2 - m1 * m1).clamp(min=0.0)
    return kl, slope


def budget_weights(
    a: torch.Tensor, d: torch.Tensor, eps: torch.Tensor, evals: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest evaluated ``s ∈ [0, 1]`` with ``K(s) ≤ eps`` per row, and its ``K``.

    ``a``, ``d`` as in :func:`kl_curve`; ``eps (B, 1)`` (``+inf`` = no budget: ``s = 1``).
    Newton on ``log K`` against ``log s`` from ``s = 1`` (module docstring); every
    evaluated point that meets the budget is a candidate, so the result is feasible.
    A row is *settled* once ``s = 1`` fits or its best ``K`` is within ``SETTLE`` of the
    aim; settled rows stop changing (so a row's answer never depends on the other rows of
    the batch) and the loop ends early when every row is settled (one host sync per
    evaluation). Returns ``(s, K(s))``, each ``(B, 1)`` float32.
    """
    basis = moments_basis(d)
    # Aim a little inside the budget: Newton may converge from either side, and an aim of
    # ε·AIM puts its limit strictly inside, so late iterates are feasible (s ≈ 1% short).
    log_eps = torch.log(eps * AIM)
    s = torch.ones_like(eps)
    best_s = torch.zeros_like(eps)  # lo: the largest s known to meet the budget
    best_kl = torch.zeros_like(eps)
    hi = torch.full_like(eps, 2.0)  # the smallest s known to break it (2 = none yet)
    hi_kl = torch.full_like(eps, math.inf)
    settled = torch.zeros_like(eps, dtype=torch.bool)
    for _ in range(NEWTON_EVALS if evals is None else evals):
        kl, slope = kl_curve(a, d, basis, s)
        ok = kl <= eps
        better = ok & (s > best_s) & ~settled
        best_s = torch.where(better, s, best_s)
        best_kl = torch.where(better, kl, best_kl)
        new_hi = ~ok & (s < hi)
        hi = torch.where(new_hi, s, hi)
        hi_kl = torch.where(new_hi, kl, hi_kl)
        settled = settled | (best_s >= 1.0) | (best_kl >= SETTLE * AIM * eps)
        if bool(settled.all()):
            break
        # Newton in (log s, log K). Where K rounds to 0 the curve is in its s² regime.
        tiny = kl < 1e-12
        log_kl = torch.log(kl.clamp(min=1e-30))
        g_slope = torch.where(tiny, 2.0, slope / kl.clamp(min=1e-30)).clamp(min=0.5, max=8.0)
        cand = torch.exp((torch.log(s) - (log_kl - log_eps) / g_slope).clamp(max=0.0))
        # Safeguard: a step that leaves the bracket (best_s, hi) bisects it instead,
        # so a curve that bends sharply cannot make Newton cycle.
        inside = (cand > best_s) & (cand < hi)
        # Fallback: the straight line between the bracket's ends in (log s, log K), which
        # is exact for a power law; plain bisection while the lower end is still s = 0.
        frac = (log_eps - torch.log(best_kl.clamp(min=1e-30))) / (
            torch.log(hi_kl.clamp(min=1e-30)) - torch.log(best_kl.clamp(min=1e-30))
        )
        hi1 = hi.clamp(max=1.0)
        secant = torch.exp(torch.lerp(torch.log(best_s.clamp(min=1e-30)), torch.log(hi1),
                                      frac.clamp(0.05, 0.95)))
        fallback = torch.where(best_kl > 1e-12, secant, 0.5 * (best_s + hi1))
        s = torch.where(inside, cand, fallback)
    return best_s, best_kl


class Guard(Processor[GuardSpec]):
    """Plausibility mask and KL budget relative to the frozen model (module docstring).

    Example:
        >>> import torch
        >>> from processors.base import ProcessorEnv, StepContext
        >>> spec = Guard.validate({"plausibility": 0.1}, ProcessorEnv(4))
        >>> g = Guard(torch.device("cpu"), 4)
        >>> g.update_state([spec])
        >>> base = torch.tensor([[2.0, 1.0, -3.0, 0.0]])     # token 2: p/p_max = e^-5
        >>> steered = torch.tensor([[2.0, 1.0, 5.0, 0.0]])   # steering promoted token 2
        >>> out = g.apply(StepContext(base_logits=base, last_tokens=torch.full((1, 2), -1)),
        ...               steered)
        >>> out.argmax(-1).item(), out.softmax(-1)[0, 2].item()
        (0, 0.0)
    """

    type_name = "guard"

    @classmethod
    def validate(cls, params: Mapping[str, Any], env: ProcessorEnv) -> GuardSpec:
        check_keys(params, {"plausibility", "kl_budget", "entropy_scale"})
        beta = eps = h = None
        if params.get("plausibility") is not None:
            beta = get_number(params, "plausibility", 0.0, lo=0.0, hi=1.0, lo_open=True)
            if beta >= 1.0:
                raise ParamError(
                    "plausibility", f"'plausibility' must be in (0, 1), got {beta}"
                )
        if params.get("kl_budget") is not None:
            eps = get_number(
                params, "kl_budget", 0.0, lo=0.0, hi=MAX_KL_BUDGET, lo_open=True
            )
        if params.get("entropy_scale") is not None:
            h = get_number(params, "entropy_scale", 0.0, lo=0.0, hi=MAX_ENTROPY_SCALE,
                           lo_open=True)
        if beta is None and eps is None and h is None:
            raise ParamError(
                "plausibility",
                "a 'guard' entry needs 'plausibility' (in (0, 1)), 'kl_budget' (nats, > 0) "
                "or 'entropy_scale' (nats, > 0)",
            )
        return GuardSpec(beta, eps, h)

    def update_state(self, specs: Sequence[GuardSpec | None]) -> None:
        self._specs = list(specs)
        used = [s is not None for s in specs]
        self._active = any(used)
        self.all_rows = all(used)
        dev = self.device
        self.rows = torch.tensor(used, dtype=torch.bool, device=dev).view(-1, 1)  # (B, 1)
        # log β per row; -inf = no mask (rows without the guard, or without the rule).
        self.log_beta = torch.tensor(
            [math.log(s.plausibility) if s and s.plausibility else float("-inf")
             for s in specs],
            dtype=torch.float32, device=dev,
        ).view(-1, 1)
        # The mask's cut below each row's best frozen logit: log β, -inf (keep all) for a
        # guarded row without the rule, +inf (keep none) for a row without the guard, so
        # that rows the guard leaves alone do not widen the gathered support.
        self.cut_offset = torch.where(self.rows.view(-1), self.log_beta.view(-1),
                                      torch.tensor(math.inf, device=dev)).view(-1, 1)
        self.eps = torch.tensor(
            [s.kl_budget if s and s.kl_budget else float("inf") for s in specs],
            dtype=torch.float32, device=dev,
        ).view(-1, 1)
        # Entropy at which a row gets its full steering; +inf = rule off (weight 1).
        self.h_full = torch.tensor(
            [s.entropy_scale if s and s.entropy_scale else float("inf") for s in specs],
            dtype=torch.float32, device=dev,
        ).view(-1, 1)
        self._flags()

    def _flags(self) -> None:
        """Host flags from the rows' specs."""
        specs = self._specs
        self._active = any(s is not None for s in specs)
        self.all_rows = all(s is not None for s in specs)
        self.any_mask = any(s is not None and s.plausibility for s in specs)
        self.any_budget = any(s is not None and s.kl_budget for s in specs)
        self.any_entropy = any(s is not None and s.entropy_scale for s in specs)

    def select(self, keep: Sequence[int], index: torch.Tensor) -> bool:
        """Rows left: the ``(B, 1)`` per-row tables follow the kept rows (no upload)."""
        self._specs = [self._specs[b] for b in keep]
        for name in ("rows", "log_beta", "cut_offset", "eps", "h_full"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self._flags()
        return True

    def entropy_weight(self, base: torch.Tensor) -> torch.Tensor:
        """``min(1, H(P) / entropy_scale)`` per row ``(B, 1)`` (1 without the rule), from the
        frozen model's full distribution ``P = softmax(base)``, ``base (B, V)``."""
        if not self.any_entropy:
            return torch.ones_like(self.eps)
        lp = torch.log_softmax(base, dim=-1)  # (B, V)
        h = -(lp.exp() * lp).sum(dim=-1, keepdim=True)  # (B, 1) nats
        return torch.where(self.h_full < math.inf, (h / self.h_full).clamp(max=1.0), 1.0)

    def apply(self, ctx: StepContext, logits: torch.Tensor) -> torch.Tensor:
        base = ctx.base_logits.float()  # (B, V)
        steered = logits.float()
        if self.any_mask:
            cut = base.amax(dim=-1, keepdim=True) + self.cut_offset  # (B, 1)
            keep = base >= cut  # (B, V)
            # One host sync: the widest row's support decides the gathered width.
            k = max(int(keep.sum(dim=-1).max()), 1)
            if k <= GATHER_FRACTION * base.shape[-1]:
                return self._apply_gathered(ctx, base, steered, cut, k).to(logits.dtype)
            allowed = keep & torch.isfinite(steered)
        else:
            allowed = torch.isfinite(steered)  # (B, V) an earlier hard ban stays banned
        return self._apply_full(ctx, base, steered, allowed).to(logits.dtype)

    def _apply_gathered(self, ctx: StepContext, base: torch.Tensor, steered: torch.Tensor,
                        cut: torch.Tensor, k: int) -> torch.Tensor:
        """The guard on the ``k`` best frozen-model tokens of each row ``(B, k)``: every
        token the mask keeps is among them, and the rest of the row is the floor. Same
        result as :meth:`_apply_full` (the dropped tokens have weight exactly 0 there)."""
        bg, idx = base.topk(k, dim=-1)  # (B, k)
        sg = steered.gather(-1, idx)  # (B, k)
        plausible = bg >= cut
        allowed = plausible & torch.isfinite(sg)
        # A row whose steering banned every plausible token keeps its steered logits.
        empty = ~allowed.any(dim=-1, keepdim=True)  # (B, 1)
        use = self.rows & ~empty
        w = self.entropy_weight(base)  # (B, 1)
        d = torch.where(allowed, sg - bg, torch.zeros_like(bg)) * w  # (B, k)
        if self.any_budget:
            # Empty rows compute on the plausible set (finite, then discarded).
            support = allowed | (empty & plausible)
            a = torch.log_softmax(bg.masked_fill(~support, float("-inf")), dim=-1)
            s, kl = budget_weights(a, d, self.eps)
            og = torch.addcmul(bg, d, s)
        else:
            s = kl = torch.ones_like(self.eps)
            og = torch.addcmul(bg, d, s) if self.any_entropy else sg
        s = s * w
        floor = og.masked_fill(~allowed, float("-inf")).amax(dim=-1, keepdim=True) - MASK_DEPTH
        og = torch.where(use, torch.where(allowed, og, floor), sg)
        out = torch.where(use, floor, steered)  # (B, V): guarded rows start at the floor
        out.scatter_(-1, idx, og)
        if ctx.want_stats:
            self._stats(ctx, use, s, kl, lambda: 1.0 - (
                torch.exp(bg - torch.logsumexp(base, dim=-1, keepdim=True)) * allowed
            ).sum(dim=-1, keepdim=True).clamp(max=1.0))
        return out

    def _apply_full(self, ctx: StepContext, base: torch.Tensor, steered: torch.Tensor,
                    allowed: torch.Tensor) -> torch.Tensor:
        """The guard over the whole vocabulary; ``allowed (B, V)`` is the support ``S``."""
        # A row whose steering banned every plausible token keeps its steered logits.
        empty = ~allowed.any(dim=-1, keepdim=True)  # (B, 1)
        allowed = allowed | (empty & torch.isfinite(steered))
        # One host sync: without any ban or mask the support is the whole row, and the
        # masking passes can be skipped.
        full = bool(allowed.all())
        if full:
            d = steered - base
        else:
            d = torch.where(allowed, steered - base, torch.zeros_like(base))  # (B, V)
        w = self.entropy_weight(base)  # (B, 1)
        if self.any_entropy:
            d = d * w
        if self.any_budget:
            masked = base if full else base.masked_fill(~allowed, float("-inf"))
            a = torch.log_softmax(masked, dim=-1)
            s, kl = budget_weights(a, d, self.eps)
            out = torch.addcmul(base, d, s)
        else:
            s = kl = torch.ones_like(self.eps)
            out = torch.addcmul(base, d, s) if self.any_entropy else steered
        s = s * w
        if not full:
            floor = (out.masked_fill(~allowed, float("-inf")).amax(dim=-1, keepdim=True)
                     - MASK_DEPTH)
            out = torch.where(allowed, out, floor)
        use = self.rows & ~empty
        if not (self.all_rows and full):
            out = torch.where(use, out, steered)
        if ctx.want_stats:
            self._stats(ctx, use, s, kl, lambda: (
                torch.softmax(base, dim=-1) * (~allowed).float()).sum(dim=-1, keepdim=True))
        return out

    def _stats(self, ctx: StepContext, use: torch.Tensor, s: torch.Tensor, kl: torch.Tensor,
               masked_mass: Callable[[], torch.Tensor]) -> None:
        """Per-step diagnostics for the rows ``use (B, 1)`` the guard acted on."""
        self._stat(ctx, "guard_s", use, s)
        if self.any_budget:
            self._stat(ctx, "guard_kl", use & (self.eps < math.inf), kl)
        if self.any_mask:
            self._stat(ctx, "guard_masked_mass", use & (self.log_beta > -math.inf),
                       masked_mass())

    @staticmethod
    def _stat(ctx: StepContext, name: str, rows: torch.Tensor, value: torch.Tensor) -> None:
        """Set ``ctx.stats[name]`` for ``rows (B, 1)`` to ``value (B, 1)``. Rows of other
        guard instances (the entry sits at a different stack depth in another request of
        the batch) keep what those wrote; everything else is NaN."""
        prev = ctx.stats.get(name)
        if prev is None:
            prev = torch.full((value.shape[0],), float("nan"), device=value.device)
        ctx.stats[name] = torch.where(rows.view(-1), value.view(-1).float(), prev)


register(Guard)
