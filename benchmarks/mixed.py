"""8 concurrent requests with 8 *different* steering stacks vs 8 unsteered, in one run.

The point of per-row processors is that heterogeneous steering batches as well as plain
decoding. Both variants send 8 concurrent fixed-length greedy requests over HTTP to one
server on the embedded model; rounds interleave; medians. Target (issue 10): mixed ≥ 0.9×
the unsteered aggregate throughput.

    python benchmarks/mixed.py [--rounds 3] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    CHAT_PROMPTS,
    burst,
    machine,
    median,
    report_ratio,
    server_process,
)

# Eight different prompts in both variants, so neither gets the shared-prefill shortcut
# that identical prompts would.
PROMPTS = CHAT_PROMPTS[:8]


def stacks(prior: str, vector: str) -> list[list[dict]]:
    """Eight different stacks covering every shipped method except fusion (which needs
    auxiliary models; see benchmarks/fusion.py)."""
    ng = {"type": "ngram", "prior": prior, "lambda": 0.2}
    cv = {"type": "control", "vector": vector, "alpha": 1.0}
    return [
        [],
        [{"type": "logit_bias", "bias": {"28": 2.0}}],
        [ng],
        [{**ng, "scale": "zscore"}],
        [ng, {"type": "margin"}],
        [cv],
        [cv, ng],
        [{"type": "logit_bias", "bias": {"30": -3.0}}, {"type": "margin", "tau": 0.3}],
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    bases = [{"messages": [{"role": "user", "content": p}], "max_tokens": args.tokens,
              "temperature": 0, "ignore_eos": True} for p in PROMPTS]
    tag = os.getpid()
    prior, vector = f"bench-kjv-{tag}", f"bench-mood-{tag}"
    with server_process() as url, httpx.Client(base_url=url, timeout=900) as c:
        c.post("/v1/priors", json={"name": prior, "corpus": "kjv"}).raise_for_status()
        c.post("/v1/control-vectors", json={
            "name": vector, "template": "Act as if you are extremely {}.",
            "positive_words": ["happy", "joyful", "cheerful", "delighted"],
            "negative_words": ["sad", "miserable", "gloomy", "depressed"],
            "layers": list(range(8, 15))}).raise_for_status()
        try:
            plain = bases
            mixed = [{**b, "steering": s} for b, s in zip(bases, stacks(prior, vector),
                                                          strict=True)]
            asyncio.run(burst(url, [{**b, "max_tokens": 4} for b in bases], 900))  # warm-up
            tps: dict[str, list[float]] = {"plain": [], "mixed": []}
            for rnd in range(args.rounds):
                tps["plain"].append(asyncio.run(burst(url, plain, 900)))
                tps["mixed"].append(asyncio.run(burst(url, mixed, 900)))
                print(f"round {rnd + 1}: plain {tps['plain'][-1]:.1f} tok/s, "
                      f"mixed {tps['mixed'][-1]:.1f} tok/s", flush=True)
        finally:
            c.delete(f"/v1/priors/{prior}")
            c.delete(f"/v1/control-vectors/{vector}")
    med = {k: median(v) for k, v in tps.items()}
    print(f"\nmachine: {machine()}")
    print(f"8 concurrent × {args.tokens} tokens, medians of {args.rounds} rounds: "
          f"unsteered {med['plain']:.1f} tok/s, 8 different stacks {med['mixed']:.1f} tok/s")
    ratio = med["mixed"] / med["plain"]
    print(f"ratio mixed/unsteered: {ratio:.2f}x (target >= 0.9)")
    report_ratio("8 different stacks vs 8 unsteered (throughput)", ratio, ">=", 0.9)


if __name__ == "__main__":
    main()
