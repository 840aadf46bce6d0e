"""The style/fluency frontier: does the fluency guard beat plain injection? (issue 16)

For a corpus prior and a prompt set (chat prompts, greedy, fixed length, EOS ignored) each
method is run over a λ grid (``steering.0.lambda`` of its n-gram entry):

* *style gain* = log style-PPL(unsteered) − log style-PPL(stack), nats/token, averaged
  over prompts (style PPL under the corpus prior);
* *fluency budget*: base-model PPL (the frozen model's PPL of the emitted tokens, pooled
  over prompts) ≤ 1.3× unsteered **and** mean distinct-2 ≥ 0.8× unsteered;
* *frontier value* of a method = its largest style gain within the budget over the grid,
  interpolated linearly in λ between the last grid point inside and the first outside.

The report is the frontier ratio of each guard method to plain injection per corpus, a
table of every point, and ``docs/frontier.png`` (style PPL against base PPL, one curve per
method, budget lines drawn). The engine runs in-process (the app under a test client,
no sockets); each prompt is one ``/v1/sweep`` holding every method × λ point, so all of
them decode as one batch.

Tuning split (stated in docs/frontier.md): the guard settings (``HELD_OUT_GUARDS``, the best
of ``TUNING_GUARDS`` per rule) were chosen on ``kjv`` with
``TUNE_PROMPTS``; the reported rows use ``PROMPTS`` (disjoint) on ``kjv`` and on
``fortunes`` (a corpus not tuned on at all). ``--tune`` runs the tuning set instead.

``--overhead`` measures the guard's step-time ratio at batch 8 (target ≤ 1.05×): ngram vs
ngram + guard, interleaved rounds, medians.

    python benchmarks/frontier.py [--prompts 12] [--tokens 32] [--out docs/frontier.md]
    python benchmarks/frontier.py --overhead [--rounds 5]
    python benchmarks/frontier.py --micro [--rounds 5]    # Guard.apply alone, no model
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    EMBEDDED,
    ROOT,
    STYLE_PROMPTS,
    machine,
    report_ratio,
    step_times,
)

LAMBDAS = [0.0, 0.1, 0.25, 0.5, 1.0]
QUICK_LAMBDAS = [0.0, 0.2, 0.5, 1.0]
PER_SWEEP = 3  # prompts per /v1/sweep (3 × 17 points = a batch of 51)
BASE_LIMIT = 1.3  # base PPL ≤ 1.3 × unsteered
D2_LIMIT = 0.8  # distinct-2 ≥ 0.8 × unsteered

# Guard settings were tuned on kjv with these prompts only.
TUNE_PROMPTS = STYLE_PROMPTS[:6]
# Held out: never used while choosing the guard settings.
PROMPTS = STYLE_PROMPTS[6:]


# The guard settings tried on the tuning split (``--tune``), one frontier curve each.
TUNING_GUARDS: dict[str, dict[str, Any]] = {
    **{f"guard β{b}": {"plausibility": b} for b in (0.1, 0.2, 0.3, 0.5, 0.7)},
    **{f"guard ε{e}": {"kl_budget": e} for e in (0.2, 0.3, 0.4, 0.5, 0.7)},
    "guard β0.3 ε0.3": {"plausibility": 0.3, "kl_budget": 0.3},
    **{f"guard h{h}": {"entropy_scale": h} for h in (1.0, 2.0, 3.5)},
}
# The best of each rule on the tuning split, reported on the held-out sets.
HELD_OUT_GUARDS: dict[str, dict[str, Any]] = {
    "guard ε0.7": {"kl_budget": 0.7}, "guard h1": {"entropy_scale": 1.0},
}


def methods(prior: str, tune: bool = False) -> dict[str, list[dict[str, Any]]]:
    """The compared stacks; λ is set by the grid at ``steering.0.lambda``."""
    ng = {"type": "ngram", "prior": prior, "lambda": 0.0, "allow_lambda_above_one": True}
    guards = TUNING_GUARDS if tune else HELD_OUT_GUARDS
    out: dict[str, list[dict[str, Any]]] = {
        "plain": [ng], "margin τ0.5 γ1": [ng, {"type": "margin", "tau": 0.5, "gamma": 1.0}]}
    for name, fields in guards.items():
        out[name] = [ng, {"type": "guard", **fields}]
    return out


def distinct2(tokens: list[int]) -> float:
    """Distinct bigrams / bigrams of one output (1.0 = no repeated bigram)."""
    pairs = list(zip(tokens, tokens[1:], strict=False))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


@contextmanager
def in_process_client(max_batch: int) -> Iterator[Any]:
    """The app with the embedded model under Starlette's test client (engine in-process)."""
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from server.loading import load_model
    from server.settings import Settings

    settings = Settings(model=EMBEDDED, max_batch_size=max_batch, max_sweep_points=512,
                        max_queue=4096,
                        log_level="warning")
    bundle = load_model(EMBEDDED, settings.data_dir)
    with TestClient(create_app(settings, bundle=bundle)) as client:
        yield client


def run_corpus(c: Any, corpus: str, prompts: list[str], lambdas: list[float],
               tokens: int, tune: bool = False) -> dict[str, list[dict[str, float]]]:
    """Per method, one dict per λ: style gain, base PPL, distinct-2 (over ``prompts``)."""
    prior = f"frontier-{corpus}-{os.getpid()}"
    c.post("/v1/priors", json={"name": prior, "corpus": corpus}).raise_for_status()
    try:
        named = methods(prior, tune)
        names = list(named)
        per: dict[tuple[str, float], list[tuple[float, float, float]]] = {}
        # λ = 0 is the unsteered run for every method: run it once (plain).
        points = [(n, lam) for n in names for lam in lambdas if lam > 0 or n == "plain"]
        grid_stacks = []
        for n, lam in points:
            stack = [dict(e) for e in named[n]]
            stack[0]["lambda"] = lam
            grid_stacks.append(stack)
        # PER_SWEEP prompts per /v1/sweep: every prompt × point of it decodes as one batch.
        for i in range(0, len(prompts), PER_SWEEP):
            chunk = prompts[i : i + PER_SWEEP]
            req = {"messages": [{"role": "user", "content": chunk[0]}], "max_tokens": tokens,
                   "temperature": 0, "ignore_eos": True, "diagnostics": True}
            grid = {"messages": [[{"role": "user", "content": p}] for p in chunk],
                    "steering": grid_stacks}
            r = c.post("/v1/sweep", json={"request": req, "grid": grid})
            r.raise_for_status()
            keys = [key for _ in chunk for key in points]  # the last axis varies fastest
            for point, key in zip(r.json()["results"], keys, strict=True):
                resp = point["response"]
                d = resp["diagnostics"]
                per.setdefault(key, []).append(
                    (d["style_nll_mean"], d["base_nll_mean"], distinct2(resp["token_ids"])))
            print(f"{corpus}: prompts {i + len(chunk)}/{len(prompts)} done", flush=True)
    finally:
        c.delete(f"/v1/priors/{prior}")
    out: dict[str, list[dict[str, float]]] = {}
    ref = per[("plain", 0.0)]
    for n in names:
        rows = []
        for lam in lambdas:
            xs = per[("plain", 0.0)] if lam == 0 else per[(n, lam)]
            gain = statistics.fmean(r[0] - x[0] for r, x in zip(ref, xs, strict=True))
            rows.append({
                "lambda": lam, "gain": gain,
                "style_ppl": math.exp(statistics.fmean(x[0] for x in xs)),
                "base_ppl": math.exp(statistics.fmean(x[1] for x in xs)),
                "d2": statistics.fmean(x[2] for x in xs),
            })
        out[n] = rows
    return out


def frontier_value(rows: list[dict[str, float]]) -> tuple[float, float]:
    """(largest in-budget style gain, the λ where it is reached), interpolating in λ.

    Every in-budget grid point counts; between an in-budget point and the next grid
    point outside, the budget boundary is located by linear interpolation of base PPL
    and distinct-2 in λ, and the gain is interpolated there.
    """
    base0, d20 = rows[0]["base_ppl"], rows[0]["d2"]

    def slack(r: dict[str, float]) -> tuple[float, float]:
        return BASE_LIMIT * base0 - r["base_ppl"], r["d2"] - D2_LIMIT * d20

    best, at = 0.0, 0.0
    for r0, r1 in zip(rows, rows[1:], strict=False):
        s0 = slack(r0)
        if min(s0) < 0:
            continue
        if r0["gain"] > best:
            best, at = r0["gain"], r0["lambda"]
        s1 = slack(r1)
        if min(s1) >= 0:
            continue
        # Fraction of the step at which the first constraint reaches its limit.
        t = min(a / (a - b) for a, b in zip(s0, s1, strict=True) if b < 0)
        gain = r0["gain"] + t * (r1["gain"] - r0["gain"])
        if gain > best:
            best, at = gain, r0["lambda"] + t * (r1["lambda"] - r0["lambda"])
    last = rows[-1]
    if min(slack(last)) >= 0 and last["gain"] > best:
        best, at = last["gain"], last["lambda"]
    return best, at


def plot(results: dict[str, dict[str, list[dict[str, float]]]], path: Path) -> None:
    """Style PPL against base PPL, one panel per corpus, one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (label, by_method) in zip(axes[0], results.items(), strict=True):
        for name, rows in by_method.items():
            ax.plot([r["base_ppl"] for r in rows], [r["style_ppl"] for r in rows], marker="o",
                    label=name, linestyle="--" if name.startswith(("plain", "margin")) else "-")
        base0 = next(iter(by_method.values()))[0]["base_ppl"]
        ax.axvline(BASE_LIMIT * base0, color="grey", linewidth=1)
        ax.text(BASE_LIMIT * base0, ax.get_ylim()[1], " base PPL 1.3×", va="top",
                fontsize=8, color="grey")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("base-model PPL (lower = more fluent)")
        ax.set_ylabel("style PPL under the prior (lower = more style)")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
    fig.text(0.01, 0.01, "Points outside the distinct-2 ≥ 0.8× budget are marked in the "
             "table (docs/frontier.md).", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quality(c: Any, args: argparse.Namespace) -> str:
    lambdas = QUICK_LAMBDAS if args.quick else LAMBDAS
    if args.tune:
        sets = [("kjv", "kjv, tuning prompts", TUNE_PROMPTS[: args.prompts])]
    else:
        sets = [("kjv", "kjv, held-out prompts", PROMPTS[: args.prompts]),
                ("fortunes", "fortunes (held-out corpus and prompts)",
                 PROMPTS[: args.prompts])]
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for corpus, label, prompts in sets:
        results[label] = run_corpus(c, corpus, prompts, lambdas, args.tokens, args.tune)
    lines = [f"{args.tokens} tokens per prompt, greedy, EOS ignored; λ grid {lambdas}; "
             f"{args.prompts} prompts per set.", ""]
    lines += ["| set | method | frontier value (nats/token) | at λ | ratio to plain |",
              "|---|---|---|---|---|"]
    for label, by_method in results.items():
        plain_v, _ = frontier_value(by_method["plain"])
        for name, rows in by_method.items():
            v, at = frontier_value(rows)
            ratio = v / plain_v if plain_v > 0 else math.inf
            lines.append(f"| {label} | {name} | {v:.3f} | {at:.2f} | {ratio:.2f}× |")
            if name != "plain" and name.startswith("guard") and not args.tune:
                short = label.split(" ")[0].rstrip(",")
                report_ratio(f"frontier {name} / plain, {short}", ratio, ">=", 1.5)
    lines += ["", "| set | method | λ | style gain | style PPL | base PPL (× unsteered) "
              "| distinct-2 (× unsteered) | in budget |", "|---|---|---|---|---|---|---|---|"]
    for label, by_method in results.items():
        for name, rows in by_method.items():
            b0, d0 = rows[0]["base_ppl"], rows[0]["d2"]
            for r in rows:
                ok = r["base_ppl"] <= BASE_LIMIT * b0 and r["d2"] >= D2_LIMIT * d0
                lines.append(
                    f"| {label} | {name} | {r['lambda']} | {r['gain']:.3f} | "
                    f"{r['style_ppl']:.0f} | {r['base_ppl']:.2f} ({r['base_ppl'] / b0:.2f}×) | "
                    f"{r['d2']:.3f} ({r['d2'] / d0:.2f}×) | {'yes' if ok else 'no'} |")
    if args.plot:
        plot(results, Path(args.plot))
    return "\n".join(lines)


def overhead(c: Any, args: argparse.Namespace) -> str:
    """Decode-step time at batch 8: ngram vs ngram + guard (both rules, and the budget
    alone, which has no gathered support to work on), interleaved rounds, medians."""
    prior = f"frontier-ovh-{os.getpid()}"
    c.post("/v1/priors", json={"name": prior, "corpus": "kjv"}).raise_for_status()
    ng = {"type": "ngram", "prior": prior, "lambda": 0.3}
    req = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": args.tokens,
           "temperature": 0, "ignore_eos": True}
    variants = {
        "ngram": [ng],
        "ngram+guard": [ng, {"type": "guard", "plausibility": 0.1, "kl_budget": 1.0}],
        "ngram+guard ε only": [ng, {"type": "guard", "kl_budget": 1.0}],
    }
    try:
        med = step_times(c, req, variants, args.rounds)
    finally:
        c.delete(f"/v1/priors/{prior}")
    ratio = med["ngram+guard"] / med["ngram"]
    ratio_eps = med["ngram+guard ε only"] / med["ngram"]
    report_ratio("guard step time, batch 8", ratio, "<=", 1.05)
    report_ratio("guard (kl_budget only) step time, batch 8", ratio_eps, "<=", 1.05)
    return (f"batch 8, {args.rounds} rounds × {args.tokens} tokens, median decode ms/step "
            f"(prefill excluded): ngram {med['ngram']:.1f}, ngram+guard (β0.1 ε1) "
            f"{med['ngram+guard']:.1f}, ngram+guard (ε1 only) {med['ngram+guard ε only']:.1f}; "
            f"guard overhead ratio {ratio:.3f}×, ε only {ratio_eps:.3f}× (target ≤ 1.05)")


def micro(args: argparse.Namespace) -> str:
    """The guard's own cost per call: ``Guard.apply`` on random ``(8, 49152)`` logits
    (no model), medians of interleaved calls per rule, diagnostics off."""
    import torch

    from processors.base import StepContext
    from processors.guard import Guard, GuardSpec

    g = torch.Generator().manual_seed(0)
    B, V = 8, 49152
    base = torch.randn(B, V, generator=g) * 2.5
    steered = base + torch.randn(B, V, generator=g) * 1.5
    ctx = StepContext(base_logits=base, last_tokens=torch.full((B, 2), -1))
    specs = {"β0.1 ε1": GuardSpec(0.1, 1.0), "β0.1": GuardSpec(0.1, None),
             "ε1": GuardSpec(None, 1.0), "h2": GuardSpec(None, None, 2.0)}
    guards = {}
    for name, spec in specs.items():
        guards[name] = Guard(torch.device("cpu"), V)
        guards[name].update_state([spec] * B)
        guards[name].apply(ctx, steered)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in specs}
    for _ in range(args.rounds * 10):
        for name, guard in guards.items():
            t0 = time.perf_counter()
            guard.apply(ctx, steered)
            times[name].append((time.perf_counter() - t0) * 1000)
    return "Guard.apply at (8, 49152), median ms per call: " + ", ".join(
        f"{k} {statistics.median(v):.2f}" for k, v in times.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--micro", action="store_true", help="Guard.apply alone, no model")
    ap.add_argument("--tune", action="store_true", help="run the kjv tuning prompts")
    ap.add_argument("--quick", action="store_true", help="a 4-point λ grid (smoke run)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--out", help="write the report (markdown) here")
    ap.add_argument("--plot", help="write the frontier plot (PNG) here")
    args = ap.parse_args()
    t0 = time.monotonic()
    if args.micro:
        text = micro(args)
    else:
        with in_process_client(args.max_batch) as c:
            text = overhead(c, args) if args.overhead else quality(c, args)
    text += f"\n\nWall time {time.monotonic() - t0:.0f} s on: {machine()}"
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
