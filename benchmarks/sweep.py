"""Wall time of an 11-point λ sweep on one prompt, three ways, in one run:

* one ``POST /v1/sweep`` (all points in one batch, one shared prefill);
* 11 sequential ``/v1/generate`` requests;
* 11 concurrent ``/v1/generate`` requests.

Target (issue 7): sweep ≤ 0.3× sequential. Rounds interleave the three; medians.

    python benchmarks/sweep.py [--rounds 3] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, median, report_ratio, server_process  # noqa: E402

LAMBDAS = [round(0.1 * i, 1) for i in range(11)]


def request(prior: str, lam: float, tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "steering": [{"type": "ngram", "prior": prior, "lambda": lam}]}


async def concurrent(url: str, prior: str, tokens: int) -> list[list[int]]:
    async with httpx.AsyncClient(base_url=url, timeout=900) as c:
        rs = await asyncio.gather(*[c.post("/v1/generate", json=request(prior, lam, tokens))
                                    for lam in LAMBDAS])
    return [r.json()["token_ids"] for r in rs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"sweep": [], "sequential": [], "concurrent": []}
    # fp32: the three ways are checked token for token, and only the fp32 reference path
    # is batch-invariant (the int4/bf16 kernels round differently at different batch sizes).
    with server_process(STEER_WEIGHTS="fp32") as url, \
            httpx.Client(base_url=url, timeout=900) as c:
        prior = f"bench-kjv-{os.getpid()}"
        c.post("/v1/priors", json={"name": prior, "corpus": "kjv"}).raise_for_status()
        try:
            c.post("/v1/generate", json=request(prior, 0.1, 4)).raise_for_status()  # warm-up
            for rnd in range(args.rounds):
                t0 = time.perf_counter()
                r = c.post("/v1/sweep", json={"request": request(prior, 0.0, args.tokens),
                                              "grid": {"steering.0.lambda": LAMBDAS}})
                r.raise_for_status()
                times["sweep"].append(time.perf_counter() - t0)
                swept = [p["response"]["token_ids"] for p in r.json()["results"]]

                t0 = time.perf_counter()
                seq = [c.post("/v1/generate", json=request(prior, lam, args.tokens)).json()[
                    "token_ids"] for lam in LAMBDAS]
                times["sequential"].append(time.perf_counter() - t0)

                t0 = time.perf_counter()
                conc = asyncio.run(concurrent(url, prior, args.tokens))
                times["concurrent"].append(time.perf_counter() - t0)
                assert swept == seq == conc, "the three ways must give the same tokens"
                print(f"round {rnd + 1}: " + ", ".join(f"{k}={v[-1]:.1f}s"
                                                       for k, v in times.items()), flush=True)
        finally:
            c.delete(f"/v1/priors/{prior}")
    med = {k: median(v) for k, v in times.items()}
    print(f"\nmachine: {machine()}")
    print(f"11-point λ sweep, {args.tokens} tokens per point, medians of {args.rounds} rounds:")
    for k, v in med.items():
        print(f"  {k:10s} {v:6.1f} s")
    print(f"ratios: sweep/sequential {med['sweep'] / med['sequential']:.2f}x (target <= 0.3), "
          f"sweep/concurrent {med['sweep'] / med['concurrent']:.2f}x")
    report_ratio("11-point sweep vs sequential", med["sweep"] / med["sequential"], "<=", 0.3)


if __name__ == "__main__":
    main()
