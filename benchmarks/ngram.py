"""n-gram prior benchmark on the embedded model with the `kjv` prior, in one run.

(1) decode step-time ratio steered / unsteered at batch 1 and batch 8 (target ≤ 1.05×);
    rounds interleave the variants, ratios are of medians. Batch 8 is one /v1/sweep of 8
    greedy points (8 rows, one shared prefill); batch 1 is one /v1/generate.
(2) a λ sweep (λ ∈ {0, 0.05, 0.1, 0.2, 0.5, 1.0}) over a handful of prompts: style
    perplexity under the prior, base-model perplexity, mean JS divergence — written as a
    Markdown table (``--out docs/ngram-sweep.md``).

    python benchmarks/ngram.py [--rounds 3] [--tokens 48] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, median, report_ratio, server_process  # noqa: E402

PROMPTS = [
    "Tell me about the sea.",
    "What should a good king do?",
    "Describe a morning in the city.",
    "Give advice to a young traveller.",
    "What is love?",
]
LAMBDAS = [0.0, 0.05, 0.1, 0.2, 0.5, 1.0]


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def timed(client: httpx.Client, path: str, body: dict) -> float:
    t0 = time.perf_counter()
    r = client.post(path, json=body)
    wall = time.perf_counter() - t0
    r.raise_for_status()
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--out", help="write the λ sweep table (Markdown) to this file")
    args = ap.parse_args()
    with server_process() as url, httpx.Client(base_url=url, timeout=900) as c:
        # A throwaway name, so the user's own priors and the model cache are reused as is.
        name = f"bench-kjv-{os.getpid()}"
        t0 = time.perf_counter()
        r = c.post("/v1/priors", json={"name": name, "corpus": "kjv"})
        r.raise_for_status()
        print(f"built the kjv prior in {time.perf_counter() - t0:.1f} s "
              f"({r.json()['counts']})", flush=True)
        try:
            med, rows = measure(c, name, args)
        finally:
            c.delete(f"/v1/priors/{name}")
    report(med, rows, args)


def measure(c: httpx.Client, prior: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """Run the step-time rounds and the λ sweep against the server behind ``c``."""
    steer = [{"type": "ngram", "prior": prior, "lambda": 0.1}]
    base = {"messages": chat(PROMPTS[0]), "max_tokens": args.tokens, "temperature": 0,
            "ignore_eos": True}
    grid = {"seed": list(range(8))}
    variants = {
        "b1_plain": ("/v1/generate", base),
        "b1_ngram": ("/v1/generate", {**base, "steering": steer}),
        "b8_plain": ("/v1/sweep", {"request": base, "grid": grid}),
        "b8_ngram": ("/v1/sweep", {"request": {**base, "steering": steer}, "grid": grid}),
    }
    for path, body in variants.values():  # warm-up
        timed(c, path, {**body} if path == "/v1/sweep" else {**body, "max_tokens": 4})
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rnd in range(args.rounds):
        for variant, (path, body) in variants.items():
            times[variant].append(timed(c, path, body) / args.tokens * 1000)
        print(f"round {rnd + 1}: " + ", ".join(f"{k}={v[-1]:.1f} ms/step"
                                               for k, v in times.items()), flush=True)
    med = {k: median(v) for k, v in times.items()}

    # λ sweep: one /v1/sweep per prompt, greedy, diagnostics on.
    rows: dict[float, list[dict]] = {lam: [] for lam in LAMBDAS}
    for prompt in PROMPTS:
        req = {"messages": chat(prompt), "max_tokens": args.tokens, "temperature": 0,
               "steering": [{"type": "ngram", "prior": prior, "lambda": 0.0}],
               "diagnostics": True}
        res = c.post("/v1/sweep", json={"request": req,
                                        "grid": {"steering.0.lambda": LAMBDAS}})
        res.raise_for_status()
        plain = c.post("/v1/generate", json={k: v for k, v in req.items()
                                             if k != "steering"}).json()
        for point in res.json()["results"]:
            lam = point["params"]["steering.0.lambda"]
            resp = point["response"]
            if lam == 0.0:
                assert resp["token_ids"] == plain["token_ids"], "λ=0 must equal unsteered"
            rows[lam].append({**resp["diagnostics"], "text": resp["text"]})
    return med, rows


def report(med: dict, rows: dict, args: argparse.Namespace) -> None:
    """Print the ratios and the λ table (and write the table with --out)."""
    print(f"\nmachine: {machine()}")
    print(f"decode step time, medians of {args.rounds} rounds × {args.tokens} tokens (ms/step):")
    for k, v in med.items():
        print(f"  {k:9s} {v:7.1f}")
    print("ratios (target <= 1.05):")
    print(f"  batch 1 steered/unsteered : {med['b1_ngram'] / med['b1_plain']:.3f}x")
    print(f"  batch 8 steered/unsteered : {med['b8_ngram'] / med['b8_plain']:.3f}x")
    report_ratio("ngram step time, batch 1", med["b1_ngram"] / med["b1_plain"], "<=", 1.05)
    report_ratio("ngram step time, batch 8", med["b8_ngram"] / med["b8_plain"], "<=", 1.05)

    def mean(xs: list[float]) -> float:
        return statistics.fmean(xs)

    lines = [
        "| λ | style PPL (kjv) | base-model PPL | mean JS (nats) | argmax flips "
        "| sample (prompt 1) |",
        "|---|---|---|---|---|---|",
    ]
    for lam in LAMBDAS:
        rs = rows[lam]
        sample = rs[0]["text"].replace("\n", " ").replace("|", "/")[:70]
        lines.append(
            f"| {lam} | {mean([r['style_ppl'] for r in rs]):.1f} | "
            f"{mean([r['base_ppl'] for r in rs]):.2f} | {mean([r['js_mean'] for r in rs]):.3f} | "
            f"{mean([r['argmax_flip_rate'] for r in rs]):.2f} | {sample} |"
        )
    table = "\n".join(lines)
    print(f"\nλ sweep over {len(PROMPTS)} prompts, greedy, {args.tokens} tokens:\n{table}")
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
