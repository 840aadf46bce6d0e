"""Engine benchmark on the embedded model, measured side by side in one run.

(a) single-request decode tokens/s of the server (over HTTP, fixed length, greedy)
    vs plain ``transformers`` ``model.generate`` on the same prompt and settings;
(b) aggregate tokens/s at concurrency 1, 4 and 8 against the server, as ratios to 1;
(c) in process, a batch of 8 rows: the share of the decode the device sits idle
    (host time between forwards / wall time from the first decode to the last), with
    the next decode launched after emit (``overlap`` off, the CPU default) and before
    it (``overlap`` on: on the CPU the forward runs on a helper thread), and the
    aggregate tokens/s of both;
(d) in process, the number of fresh ``(B, V)`` tensors allocated per decode step in
    the sampling phase (processor stack, sampler, host packing) for a batch of 8 rows
    with logit_bias/margin stacks, a repetition penalty and sampled rows.

Rounds interleave every variant; the printed ratios are of the medians.
Targets (issue 2): (a) ≥ 1.0×, (b) ≥ 3.8× at concurrency 8.

    python benchmarks/engine.py [--rounds 3] [--tokens 64] [--idle-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    EMBEDDED,
    engine_burst,
    machine,
    median,
    report_ratio,
    server_process,
)
from server.engine import (  # noqa: E402
    Engine,
    EngineConfig,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
)
from server.loading import load_model  # noqa: E402
from server.settings import Settings  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


async def concurrent_run(url: str, n: int, tokens: int) -> float:
    """Send ``n`` identical fixed-length requests at once; return aggregate tokens/s."""
    # Each request gets its own prompt (numbered), so concurrent requests do not share a
    # prefill the way identical ones would.
    def body(i: int) -> dict:
        msgs = [{"role": "user", "content": f"{PROMPT[0]['content']} (Version {i + 1}.)"}]
        return {"messages": msgs, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*[client.post(url + "/v1/generate", json=body(i))
                                    for i in range(n)])
        wall = time.perf_counter() - t0
    done = sum(r.json()["usage"]["completion_tokens"] for r in rs)
    assert done == n * tokens, [r.text[:200] for r in rs]
    return done / wall


def hf_generate(bundle, ids: torch.Tensor, tokens: int) -> float:
    """tokens/s of ``model.generate`` (greedy, fixed length, KV cache)."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = bundle.model.generate(ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=tokens, min_new_tokens=tokens,
                                    do_sample=False)
        wall = time.perf_counter() - t0
    assert out.shape[1] - ids.shape[1] == tokens
    return tokens / wall


def idle_share(bundle, prompts: list[list[int]], tokens: int, overlap: bool) -> tuple[float, float]:
    """``(device-idle share, aggregate tokens/s)`` of one in-process batch.

    The forwards' wall intervals are recorded by wrapping the runner's ``decode`` (on
    whichever thread runs it); forwards never overlap each other, so the busy time is
    their sum and the idle share is ``1 − busy / (last end − first start)``.
    """
    engine = Engine(bundle.model, bundle.tokenizer, EngineConfig(max_batch_size=8,
                                                                 overlap=overlap))
    spans: list[tuple[float, float]] = []
    real = engine.runner.decode
    lock = threading.Lock()

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = real(*a, **k)
        with lock:
            spans.append((t0, time.perf_counter()))
        return out

    engine.runner.decode = timed  # type: ignore[method-assign]
    engine.start()
    try:
        tps = engine_burst(engine, [tuple(p) for p in prompts], tokens, prefix="i")
    finally:
        engine.stop()
    busy = sum(b - a for a, b in spans)
    window = spans[-1][1] - spans[0][0]
    return 1.0 - busy / window, tps


def bv_allocations(bundle, prompts: list[list[int]], steps: int = 6) -> float:
    """Median count of fresh ``(B, V)``-sized tensors made per step by ``Engine._sample``
    (everything between one forward's logits and the next forward), counted by a
    ``TorchDispatchMode`` on the engine thread: an op output counts when it has ``B·V``
    elements and a storage no earlier tensor of the step had (views don't count)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from processors.base import ProcessorEnv
    from processors.stack import parse_stack

    V = int(bundle.model.config.vocab_size)
    counts: list[int] = []

    class Count(TorchDispatchMode):
        def __init__(self, B: int) -> None:
            super().__init__()
            self.B, self.n, self.seen = B, 0, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for a in args:
                if isinstance(a, torch.Tensor):
                    self.seen.add(a.untyped_storage().data_ptr())
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            for t in outs:
                if isinstance(t, torch.Tensor) and t.numel() == self.B * V:
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in self.seen:
                        self.n += 1
                        self.seen.add(ptr)
            return out

    engine = Engine(bundle.model, bundle.tokenizer, EngineConfig(max_batch_size=8))
    real = engine._sample

    def counted():
        with Count(len(engine.rows)) as mode:
            out = real()
        counts.append(mode.n)
        return out

    engine._sample = counted  # type: ignore[method-assign]
    env = ProcessorEnv(vocab_size=V)
    stacks = [
        [{"type": "logit_bias", "bias": {"7": 2.0}}, {"type": "logit_bias", "bias": {"9": 1.0}},
         {"type": "margin", "tau": 0.5}],
        [{"type": "logit_bias", "bias": {"11": -1.0}}],
    ]
    reqs = [GenerationRequest(f"a{i}", tuple(p), SamplingParams(
        max_tokens=steps, ignore_eos=True, temperature=0.8 if i % 2 else 0.0, seed=i,
        repetition_penalty=1.2 if i % 4 == 1 else 1.0),
        steering=parse_stack(stacks[i % 2], env, max_len=4))
        for i, p in enumerate(prompts)]
    engine.start()
    try:
        qs: list[queue.Queue] = [queue.Queue() for _ in reqs]
        engine.submit_many([(r, q.put) for r, q in zip(reqs, qs, strict=True)])
        for q in qs:
            while not isinstance(q.get(timeout=600), FinishEvent):
                pass
    finally:
        engine.stop()
    return median([float(c) for c in counts])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--idle-only", action="store_true", help="only part (c)")
    args = ap.parse_args()

    bundle = load_model(EMBEDDED, Settings().data_dir)
    ids = bundle.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    prompts = [list(bundle.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{PROMPT[0]['content']} (Version {i + 1}.)"}],
        add_generation_prompt=True, tokenize=True, return_dict=False)) for i in range(8)]
    idle: dict[str, list[float]] = {"idle_off": [], "idle_on": [], "tps_off": [], "tps_on": []}
    idle_share(bundle, prompts[:2], 4, True)  # warm-up
    for r in range(args.rounds):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            share, tps = idle_share(bundle, prompts, args.tokens, mode == "on")
            idle[f"idle_{mode}"].append(share)
            idle[f"tps_{mode}"].append(tps)
        print(f"idle round {r + 1}: " + ", ".join(f"{k}={v[-1]:.3f}" for k, v in idle.items()),
              flush=True)
    med_idle = {k: median(v) for k, v in idle.items()}
    print(f"\nmachine: {machine()}")
    print(f"(c) batch 8 × {args.tokens} tokens, in process, medians of {args.rounds} rounds:")
    print(f"  device idle share, overlap off : {med_idle['idle_off']:.3f}"
          f"  ({med_idle['tps_off']:.1f} tok/s)")
    print(f"  device idle share, overlap on  : {med_idle['idle_on']:.3f}"
          f"  ({med_idle['tps_on']:.1f} tok/s)")
    allocs = bv_allocations(bundle, prompts)
    print(f"(d) fresh (B, V) tensors per step, sampling phase, batch 8: {allocs:.0f}")
    med_idle["bv_allocations_per_step"] = allocs
    if args.idle_only:
        if args.json:
            Path(args.json).write_text(json.dumps({"idle": med_idle}, indent=2))
        return
    ids = torch.tensor([list(ids)])
    results: dict[str, list[float]] = {"hf": [], "c1": [], "c4": [], "c8": []}
    with server_process() as url:
        asyncio.run(concurrent_run(url, 2, 4))  # warm-up
        hf_generate(bundle, ids, 4)
        for r in range(args.rounds):
            results["hf"].append(hf_generate(bundle, ids, args.tokens))
            for c in (1, 4, 8):
                results[f"c{c}"].append(asyncio.run(concurrent_run(url, c, args.tokens)))
            print(f"round {r + 1}: " + ", ".join(f"{k}={v[-1]:.1f} tok/s"
                                                  for k, v in results.items()), flush=True)
    med = {k: median(v) for k, v in results.items()}
    ratios = {
        "single_vs_generate": med["c1"] / med["hf"],
        "c4_vs_c1": med["c4"] / med["c1"],
        "c8_vs_c1": med["c8"] / med["c1"],
    }
    print(f"\nmachine: {machine()}")
    print(f"{args.rounds} rounds × {args.tokens} tokens, medians (tokens/s):")
    print(f"  transformers generate, batch 1 : {med['hf']:7.1f}")
    for c in (1, 4, 8):
        print(f"  server, concurrency {c}        : {med[f'c{c}']:7.1f}")
    print("ratios:")
    single = ratios["single_vs_generate"]
    print(f"  (a) server single / generate   : {single:.2f}x  (target >= 1.0)")
    print(f"  (b) concurrency 4 / 1          : {ratios['c4_vs_c1']:.2f}x")
    print(f"  (b) concurrency 8 / 1          : {ratios['c8_vs_c1']:.2f}x  (target >= 3.8)")
    report_ratio("single request vs transformers generate", single, ">=", 1.0)
    report_ratio("concurrency 8 vs 1 (aggregate tokens/s)", ratios["c8_vs_c1"], ">=", 3.8)
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": med, "ratios": ratios,
                                               "idle": med_idle}, indent=2))


if __name__ == "__main__":
    main()
