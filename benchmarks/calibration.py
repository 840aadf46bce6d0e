"""Does margin calibration widen the fluent λ range? Embedded model, `kjv` prior.

For ≥ 20 prompts, sweeps λ ∈ {0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0} for several stacks —
plain injection, injection + margin at a few (τ, γ), z-scored injection with and without
margin — in one /v1/sweep per prompt (greedy, fixed length), and reports per λ and stack:
style PPL under the prior, base-model PPL, mean JS, distinct-2, flips prevented per token.
Then it finds the λ at which plain injection at least doubles base-model PPL and checks,
for each calibrated stack, whether base PPL stays ≤ 1.3× unsteered there while keeping at
least half of plain injection's style-PPL gain (gain = log(style PPL at λ=0 / at λ)).

``--overhead`` instead measures the margin processor's step-time ratio (target ≤ 1.02×):
batch 8 with ngram vs ngram + margin, interleaved rounds, medians.

    python benchmarks/calibration.py [--tokens 32] [--prompts 20] [--out docs/calibration-sweep.md]
    python benchmarks/calibration.py --overhead [--rounds 5]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    STYLE_PROMPTS,
    machine,
    report_ratio,
    server_process,
    step_times,
)

LAMBDAS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
PROMPTS = STYLE_PROMPTS


def stacks(prior: str) -> dict[str, list[dict]]:
    """The compared steering stacks; λ is set by the grid at steering.0.lambda."""
    ng = {"type": "ngram", "prior": prior, "lambda": 0.0}
    zs = {**ng, "scale": "zscore"}
    return {
        "plain": [ng],
        "margin τ0.5 γ1": [ng, {"type": "margin", "tau": 0.5, "gamma": 1.0}],
        "margin τ0.3 γ0.5": [ng, {"type": "margin", "tau": 0.3, "gamma": 0.5}],
        "margin τ0.7 γ1": [ng, {"type": "margin", "tau": 0.7, "gamma": 1.0}],
        "zscore": [zs],
        "zscore+margin τ0.5 γ1": [zs, {"type": "margin", "tau": 0.5, "gamma": 1.0}],
    }


def distinct2(tokens: list[int]) -> float:
    """Distinct bigrams / bigrams of one output (1.0 = no repeated bigram)."""
    pairs = list(zip(tokens, tokens[1:], strict=False))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def build_prior(c: httpx.Client) -> str:
    name = f"bench-kjv-{os.getpid()}"
    c.post("/v1/priors", json={"name": name, "corpus": "kjv"}).raise_for_status()
    return name


def quality(c: httpx.Client, prior: str, args: argparse.Namespace) -> str:
    named = stacks(prior)
    names = list(named)
    agg: dict[tuple[str, float], list[dict[str, float]]] = {}
    for i, prompt in enumerate(PROMPTS[: args.prompts]):
        req = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.tokens,
               "temperature": 0, "ignore_eos": True, "diagnostics": True}
        grid = {"steering": [named[n] for n in names], "steering.0.lambda": LAMBDAS}
        r = c.post("/v1/sweep", json={"request": req, "grid": grid})
        r.raise_for_status()
        for point, (name, lam) in zip(r.json()["results"],
                                      [(n, lam) for n in names for lam in LAMBDAS], strict=True):
            resp = point["response"]
            d = resp["diagnostics"]
            agg.setdefault((name, lam), []).append({
                "style": d["style_nll_mean"], "base": d["base_nll_mean"], "js": d["js_mean"],
                "d2": distinct2(resp["token_ids"]),
                "acted": d.get("margin_flip_prevented_mean", 0.0),
            })
        print(f"prompt {i + 1}/{args.prompts} done", flush=True)

    def m(name: str, lam: float, key: str) -> float:
        return statistics.fmean(x[key] for x in agg[(name, lam)])

    # Perplexities from the mean NLL over all prompts' tokens (equal lengths).
    def ppl(name: str, lam: float, key: str) -> float:
        return math.exp(m(name, lam, key))

    out = ["| stack | λ | style PPL | base PPL | JS | distinct-2 | flips prevented/token |",
           "|---|---|---|---|---|---|---|"]
    for name in names:
        for lam in LAMBDAS:
            out.append(f"| {name} | {lam} | {ppl(name, lam, 'style'):.1f} | "
                       f"{ppl(name, lam, 'base'):.2f} | {m(name, lam, 'js'):.3f} | "
                       f"{m(name, lam, 'd2'):.3f} | {m(name, lam, 'acted'):.3f} |")
    base0 = ppl("plain", 0.0, "base")
    style0 = ppl("plain", 0.0, "style")
    collapse = next((lam for lam in LAMBDAS if ppl("plain", lam, "base") >= 2 * base0), None)
    out.append("")
    out.append(f"Unsteered: base PPL {base0:.2f}, style PPL {style0:.1f}.")
    if collapse is None:
        out.append("Plain injection never doubles base-model PPL on this grid.")
    else:
        gain = math.log(style0 / ppl("plain", collapse, "style"))
        out.append(f"Plain injection first doubles base-model PPL at λ = {collapse} "
                   f"(base PPL {ppl('plain', collapse, 'base'):.2f}, style gain "
                   f"{gain:.2f} nats/token).")
        out.append("")
        out.append("| stack at that λ | base PPL / unsteered | ≤ 1.3×? | style gain kept "
                   "| ≥ 50%? |")
        out.append("|---|---|---|---|---|")
        for name in names[1:]:
            ratio = ppl(name, collapse, "base") / base0
            kept = math.log(style0 / ppl(name, collapse, "style")) / gain if gain else 0.0
            out.append(f"| {name} | {ratio:.2f}× | {'yes' if ratio <= 1.3 else 'no'} | "
                       f"{kept:.0%} | {'yes' if kept >= 0.5 else 'no'} |")
    return "\n".join(out)


def overhead(c: httpx.Client, prior: str, args: argparse.Namespace) -> str:
    ng = {"type": "ngram", "prior": prior, "lambda": 0.3}
    req = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": args.tokens,
           "temperature": 0, "ignore_eos": True}
    med = step_times(c, req, {"ngram": [ng], "ngram+margin": [ng, {"type": "margin"}]},
                     args.rounds)
    report_ratio("margin step time, batch 8", med["ngram+margin"] / med["ngram"], "<=", 1.02)
    return (f"batch 8, {args.rounds} rounds × {args.tokens} tokens, median decode ms/step "
            f"(prefill excluded): ngram {med['ngram']:.1f}, ngram+margin "
            f"{med['ngram+margin']:.1f}; margin overhead ratio "
            f"{med['ngram+margin'] / med['ngram']:.3f}× (target ≤ 1.02)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    with server_process() as url, httpx.Client(base_url=url, timeout=1800) as c:
        prior = build_prior(c)
        try:
            text = overhead(c, prior, args) if args.overhead else quality(c, prior, args)
        finally:
            c.delete(f"/v1/priors/{prior}")
    print(f"machine: {machine()}\n\n{text}")
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
