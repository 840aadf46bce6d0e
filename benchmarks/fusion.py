"""Cost of logit fusion: dynamic vs static (target ≤ 1.1×) and fusion vs the strong model
alone, against the ideal ``1 + cost(small models)/cost(strong)``.

Models: the embedded SmolLM2-135M as the strong model (random tiny-config models of the
same shape when ``--random``), and two random small models built from its config with
``--small-layers`` decoder layers (of 30) and the same vocabulary: a small base and one
expert. Weights do not matter for timing; shapes do. Everything runs in-process on one
engine: each round times, interleaved, a batch of ``--batch`` greedy requests of
``--tokens`` tokens for (1) the strong model alone, (2) static fusion, (3) dynamic fusion
(21-point grid), and the small model alone as its own engine (for the ideal). Medians.

    python benchmarks/fusion.py [--batch 4] [--tokens 16] [--rounds 3] [--small-layers 8]
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import processors  # noqa: E402, F401
from benchmarks.common import EMBEDDED, machine, median, report_ratio  # noqa: E402
from processors.base import ProcessorEnv  # noqa: E402
from processors.stack import parse_stack  # noqa: E402
from server.engine import (  # noqa: E402
    Engine,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
)
from server.settings import Settings  # noqa: E402

PROMPTS = ["Tell me about the sea.", "What should a good king do?",
           "Describe a morning in the city.", "Explain how rain forms."]


def build(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, str]:
    from transformers import LlamaForCausalLM

    from server.loading import load_model

    if args.random:
        cfg_src = load_model(EMBEDDED, Settings().data_dir)
        cfg = cfg_src.model.config
        strong = LlamaForCausalLM(cfg).eval()
        tok, what = cfg_src.tokenizer, "random SmolLM2-shaped strong model"
    else:
        bundle = load_model(EMBEDDED, Settings().data_dir)
        strong, tok, what = bundle.model, bundle.tokenizer, "embedded SmolLM2-135M (fp32)"
    cfg = strong.config.to_dict()
    cfg["num_hidden_layers"] = args.small_layers
    small_cfg = type(strong.config).from_dict(cfg)
    small_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    small = LlamaForCausalLM(small_cfg).eval()
    expert = LlamaForCausalLM(small_cfg).eval()
    return strong, tok, small, expert, what


def run_batch(engine: Engine, reqs: list[GenerationRequest]) -> float:
    queues: list[queue.Queue[Any]] = [queue.Queue() for _ in reqs]
    t0 = time.perf_counter()
    engine.submit_many([(r, q.put) for r, q in zip(reqs, queues, strict=True)])
    for q in queues:
        while True:
            ev = q.get(timeout=600)
            if isinstance(ev, FinishEvent):
                break
            if not hasattr(ev, "token_ids"):
                raise RuntimeError(str(ev))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--small-layers", type=int, default=8)
    p.add_argument("--random", action="store_true", help="random strong model (same shape)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    strong, tok, small, expert, what = build(args)
    engine = Engine(strong, tok, aux_models={"small": small, "expert": expert})
    small_engine = Engine(small, tok)
    engine.start()
    small_engine.start()
    env = ProcessorEnv(strong.config.vocab_size,
                       aux_roles={"small": "small_base", "expert": "expert"})
    stacks = {
        "strong": [],
        "static": [{"type": "fusion", "experts": ["expert"], "base": "small",
                    "mode": "static", "alpha": [1.0]}],
        "dynamic": [{"type": "fusion", "experts": ["expert"], "base": "small"}],
    }

    def reqs(steering: list[dict[str, Any]]) -> list[GenerationRequest]:
        sp = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
        st = parse_stack(steering, env, max_len=4)
        return [GenerationRequest(f"b{i}", tuple(tok(PROMPTS[i % len(PROMPTS)])["input_ids"]),
                                  sp, st) for i in range(args.batch)]

    times: dict[str, list[float]] = {k: [] for k in [*stacks, "small"]}
    run_batch(engine, reqs(stacks["dynamic"]))  # warm-up
    run_batch(small_engine, reqs([]))
    for r in range(args.rounds):
        for name, steering in stacks.items():
            times[name].append(run_batch(engine, reqs(steering)))
        times["small"].append(run_batch(small_engine, reqs([])))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    engine.stop()
    small_engine.stop()
    med = {k: median(v) for k, v in times.items()}
    ideal = 1 + 2 * med["small"] / med["strong"]
    print(f"\n{machine()}")
    print(f"strong: {what}; small base + expert: random, {args.small_layers} of "
          f"{strong.config.num_hidden_layers} layers, same width and vocabulary "
          f"({strong.config.vocab_size})")
    print(f"batch {args.batch} x {args.tokens} tokens, {args.rounds} interleaved rounds, medians")
    print("| measure | ratio |\n|---|---|")
    print(f"| dynamic / static fusion (target <= 1.1) | {med['dynamic'] / med['static']:.3f} |")
    report_ratio("fusion dynamic vs static", med["dynamic"] / med["static"], "<=", 1.1)
    print(f"| static fusion / strong alone | {med['static'] / med['strong']:.3f} |")
    print(f"| dynamic fusion / strong alone | {med['dynamic'] / med['strong']:.3f} |")
    print(f"| ideal 1 + 2 cost(small)/cost(strong) | {ideal:.3f} |")
    print(f"| static fusion / ideal | {med['static'] / med['strong'] / ideal:.3f} |")


if __name__ == "__main__":
    main()
