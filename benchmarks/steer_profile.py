"""Where a steered decode step spends its time beyond the unsteered step, in process.

Runs the engine (no HTTP) on the embedded model with ``--weights`` (default int4, the
served fast path) for the four steering-overhead cases of the dashboard and their
unsteered baselines, and times each part of the step by wrapping the engine's methods:

* ``forward``: ``ModelRunner.decode`` (control-vector deltas are applied inside it);
* ``stack``: ``ProcessorStack.apply``, and inside it each processor type's ``apply``;
* ``sampler``: ``Sampler.sample``;
* ``sample_rest``: the rest of ``Engine._sample`` (twins' base logits, the non-finite
  check, diagnostics and the packed copy's columns);
* ``rebuild``: ``Engine._rebuild`` (``update_state`` of the stack, sampler, decode phase);
* ``step``: the whole ``Engine._step`` (forward included).

Cases (8 different prompts for the batch-8 ones, greedy, ``--tokens`` each, EOS ignored):
``ngram b1`` (one row, ngram λ 0.1) vs ``plain b1``; ``ngram b8`` vs ``plain b8``;
``ngram+margin b8`` vs ``ngram b8``; ``mixed b8`` (mixed.py's eight stacks, control
vector random with the model's hidden size) vs ``plain b8``. Rounds interleave the cases;
each part's figure is the median over rounds of its mean ms per decode step.

    python benchmarks/steer_profile.py [--rounds 3] [--tokens 24] [--weights int4]
    python benchmarks/steer_profile.py --ops   # + torch.profiler op table of the stacks
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import CHAT_PROMPTS, EMBEDDED, machine, median  # noqa: E402


class Timers:
    """Accumulated wall ms per part name (the engine runs on one thread per step)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.ms[name] += (time.perf_counter() - t0) * 1000

        setattr(obj, attr, timed)


def build(weights: str) -> tuple[Any, Any, Any]:
    """The model bundle, a kjv prior env and a random control vector."""
    from processors.base import ModelGeometry, ProcessorEnv
    from processors.control import ControlVector
    from processors.ngram import NgramPrior
    from server.corpora import load_corpus
    from server.loading import load_model

    bundle = load_model(EMBEDDED, Path.home() / ".cache" / "steerserve", weights=weights)
    cfg = bundle.model.config
    V, D, L = int(cfg.vocab_size), int(cfg.hidden_size), int(cfg.num_hidden_layers)
    texts = load_corpus("kjv", max_bytes=1 << 30, max_documents=3000)
    prior = NgramPrior.build("kjv", [bundle.tokenizer(t)["input_ids"] for t in texts], V)
    rng = np.random.default_rng(0)
    dirs = {ell: rng.standard_normal(D).astype(np.float32) * 0.5 for ell in range(8, 15)}
    vec = ControlVector("mood", dirs)
    env = ProcessorEnv(vocab_size=V, priors={"kjv": prior}, control_vectors={"mood": vec},
                       geometry=ModelGeometry(L, D))
    return bundle, env, vec


def cases() -> dict[str, list[list[dict[str, Any]]]]:
    ng = {"type": "ngram", "prior": "kjv", "lambda": 0.1}
    cv = {"type": "control", "vector": "mood", "alpha": 1.0}
    return {
        "plain b1": [[]],
        "ngram b1": [[ng]],
        "plain b8": [[] for _ in range(8)],
        "ngram b8": [[ng] for _ in range(8)],
        "ngram+margin b8": [[ng, {"type": "margin"}] for _ in range(8)],
        "mixed b8": [
            [], [{"type": "logit_bias", "bias": {"28": 2.0}}], [{**ng, "lambda": 0.2}],
            [{**ng, "lambda": 0.2, "scale": "zscore"}], [{**ng, "lambda": 0.2},
                                                           {"type": "margin"}],
            [cv], [cv, {**ng, "lambda": 0.2}],
            [{"type": "logit_bias", "bias": {"30": -3.0}}, {"type": "margin", "tau": 0.3}],
        ],
    }


def run_case(engine: Any, bundle: Any, env: Any, rows: list[list[dict[str, Any]]],
             tokens: int) -> dict[str, float]:
    """One batch of ``len(rows)`` requests; mean ms per decode step of each part."""
    from processors.stack import parse_stack
    from server.engine.types import FinishEvent, GenerationRequest, SamplingParams

    tok = bundle.tokenizer
    timers = Timers()
    originals: list[tuple[Any, str, Any]] = []

    def wrap(obj: Any, attr: str, name: str) -> None:
        originals.append((obj, attr, getattr(obj, attr)))
        timers.wrap(obj, attr, name)

    wrap(engine.runner, "decode", "forward")
    wrap(engine.stack, "apply", "stack")
    wrap(engine.sampler, "sample", "sampler")
    wrap(engine, "_sample", "sample_all")
    wrap(engine, "_rebuild", "rebuild")
    wrap(engine, "_step", "step")
    import processors.ngram as ngram_mod

    wrap(ngram_mod, "style_logprobs", "   ngram: logp")
    real_update = engine.stack.update_state

    def update_state(specs: Any) -> None:  # time every processor's apply by type
        real_update(specs)
        for proc in engine.stack.processors():
            timers.wrap(proc, "apply", f"  {proc.type_name}")
            if hasattr(proc, "apply_"):
                timers.wrap(proc, "apply_", f"  {proc.type_name}")

    originals.append((engine.stack, "update_state", real_update))
    engine.stack.update_state = update_state
    steps = {"n": 0}
    real_step = engine._step

    def count_step() -> None:
        steps["n"] += 1
        real_step()

    reqs = []
    for i, stack in enumerate(rows):
        chat = [{"role": "user", "content": CHAT_PROMPTS[i]}]
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        reqs.append(GenerationRequest(
            f"r{i}", tuple(int(t) for t in ids),
            SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
            parse_stack(stack, env, max_len=8), "off"))
    qs: list[queue.Queue[Any]] = [queue.Queue() for _ in reqs]
    engine._step = count_step
    try:
        engine.submit_many(list(zip(reqs, [q.put for q in qs], strict=True)))
        for q in qs:
            while not isinstance(q.get(timeout=600), FinishEvent):
                pass
    finally:
        engine._step = real_step
        for obj, attr, fn in reversed(originals):
            setattr(obj, attr, fn)
    # Steps after the first sample decode: the first step's forward is the prefill's.
    n = max(steps["n"], 1)
    out = {k: v / n for k, v in timers.ms.items()}
    out["sample_rest"] = out.get("sample_all", 0.0) - out.get("stack", 0.0) \
        - out.get("sampler", 0.0)
    out.pop("sample_all", None)
    return out


def op_table(env: Any, V: int, rows: list[list[dict[str, Any]]]) -> str:
    """torch.profiler's op table (self CPU) of 30 ``ProcessorStack.apply`` calls."""
    from torch.profiler import ProfilerActivity, profile

    from processors.base import StepContext
    from processors.stack import ProcessorStack, parse_stack

    stack = ProcessorStack(torch.device("cpu"), V)
    stack.update_state([parse_stack(r, env, max_len=8) for r in rows])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(rows), V, generator=gen) * 3
    last = torch.randint(0, 1000, (len(rows), 2), generator=gen)

    def once() -> None:
        stack.apply(StepContext(base_logits=logits, last_tokens=last), logits)

    for _ in range(5):
        once()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(30):
            once()
    return str(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--ops", action="store_true", help="also print the stacks' op tables")
    ap.add_argument("--only", nargs="*", help="case names to run (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from server.engine.scheduler import Engine, EngineConfig

    bundle, env, _ = build(args.weights)
    engine = Engine(bundle.model, bundle.tokenizer, EngineConfig(max_batch_size=8))
    engine.start()
    all_cases = cases()
    chosen = {k: v for k, v in all_cases.items() if not args.only or k in args.only}
    results: dict[str, list[dict[str, float]]] = {k: [] for k in chosen}
    try:
        for rows in chosen.values():  # warm-up
            run_case(engine, bundle, env, rows, 4)
        for rnd in range(args.rounds):
            for name, rows in chosen.items():
                results[name].append(run_case(engine, bundle, env, rows, args.tokens))
            print(f"round {rnd + 1} done", flush=True)
    finally:
        engine.stop()
    print(f"machine: {machine()}; weights {args.weights}; {args.tokens} tokens; medians of "
          f"{args.rounds} rounds; mean ms per engine step")
    parts = sorted({p for rs in results.values() for r in rs for p in r},
                   key=lambda p: (p.startswith("  "), p))
    print(f"{'part':18s}" + "".join(f"{k:>17s}" for k in results))
    for p in parts:
        cells = [median([r.get(p, 0.0) for r in rs]) for rs in results.values()]
        print(f"{p:18s}" + "".join(f"{c:17.2f}" for c in cells))
    if args.ops:
        V = env.vocab_size
        for name in ("ngram b1", "ngram+margin b8", "mixed b8"):
            rows = [[e for e in r if e["type"] != "control"] for r in all_cases[name]]
            print(f"\n== {name}: ProcessorStack.apply op table (30 calls)\n"
                  f"{op_table(env, V, rows)}")


if __name__ == "__main__":
    main()
