"""In-process A/B of one decode step: the lean forward vs the transformers forward.

Same model (the embedded SmolLM2, ``--weights``, default int4), same prompts, the same
engine runner code (``server.engine.runner.ModelRunner`` with ``lean`` on and off); at
each batch size both start from copies of one prefilled state (~40-token chat prompts)
and decode ``--steps`` greedy steps, alternating A and B for ``--rounds`` rounds. Prints
the medians of ms per step (wall and this thread's CPU time), of the prefill of the
batch's prompts (wall ms), and ``RATIO|`` lines
(transformers / lean: > 1 means the lean forward is faster).

    python benchmarks/lean_ab.py [--batches 1,8,16] [--rounds 5] [--steps 8]
    python benchmarks/lean_ab.py --dense-sweep 8,16,20,24,32   # quant.DENSE_ROWS
    python benchmarks/lean_ab.py --profile 16                  # torch profiler, lean

``--dense-sweep``: lean forward only, every int4 linear on its int4 kernel vs on its
dense bf16 copy (``Int4Linear.keep_dense``) at each batch size, alternating (the
crossover is where ``quant.DENSE_ROWS`` belongs). ``--profile B``: the top ops of 5
lean decode steps at batch ``B``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import CHAT_PROMPTS, EMBEDDED, machine, median  # noqa: E402
from server import quant  # noqa: E402
from server.engine.batch import BatchState  # noqa: E402
from server.engine.runner import ModelRunner  # noqa: E402
from server.loading import load_model  # noqa: E402
from server.settings import Settings  # noqa: E402


def steps(runner: ModelRunner, start: BatchState, n: int) -> tuple[float, float]:
    """Decode ``n`` greedy steps from a copy of ``start``; (wall, cpu) ms per step."""
    state = start.gather(list(range(start.size)))
    w0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(n):
        tok = state.next_logits.argmax(-1)
        state.append_tokens(tok)
        state.next_logits = runner.decode(state, tok)
    return ((time.perf_counter() - w0) * 1e3 / n, (time.thread_time() - c0) * 1e3 / n)


def chat_prompts(tok: object, n: int) -> list[list[int]]:
    """``n`` chat-templated prompts (``CHAT_PROMPTS`` in turn), as token ids."""
    return [
        list(tok.apply_chat_template(  # type: ignore[attr-defined]  # a HF tokenizer
            [{"role": "user", "content": CHAT_PROMPTS[i % len(CHAT_PROMPTS)]}],
            add_generation_prompt=True, tokenize=True, return_dict=False,
        ))
        for i in range(n)
    ]


def dense_sweep(model: torch.nn.Module, tok: object, batches: list[int], rounds: int,
                n_steps: int) -> None:
    """Lean decode steps with every int4 linear on its int4 kernel vs its dense copy."""
    lean = ModelRunner(model, lean=True)
    lins = [m for m in model.modules() if isinstance(m, quant.Int4Linear)]
    if not lins or any(m.dense is None for m in lins):
        raise SystemExit("--dense-sweep needs int4 weights with their dense copies")
    saved = [m.dense_rows for m in lins]
    try:
        for B in batches:
            start = lean.prefill(chat_prompts(tok, B))
            times: dict[str, list[float]] = {"int4": [], "dense": []}
            for r in range(rounds):
                for name in ("int4", "dense") if r % 2 == 0 else ("dense", "int4"):
                    for m in lins:
                        m.dense_rows = 1 if name == "dense" else 1 << 30
                    steps(lean, start, 1)
                    times[name].append(steps(lean, start, n_steps)[0])
            print(f"batch {B:3d}  int4 {median(times['int4']):7.2f} ms/step  "
                  f"dense {median(times['dense']):7.2f} ms/step")
    finally:
        for m, n in zip(lins, saved, strict=True):
            m.dense_rows = n


def profile(model: torch.nn.Module, tok: object, B: int) -> None:
    """The torch profiler's top ops over 5 lean decode steps at batch ``B``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profile

    lean = ModelRunner(model, lean=True)
    start = lean.prefill(chat_prompts(tok, B))
    steps(lean, start, 3)
    with run_profile(activities=[ProfilerActivity.CPU]) as prof:
        steps(lean, start, 5)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dense-sweep", default="", help="batch sizes, e.g. 8,16,24,32")
    ap.add_argument("--profile", type=int, default=0, help="batch size to profile")
    args = ap.parse_args()
    torch.manual_seed(0)
    bundle = load_model(EMBEDDED, Settings().data_dir, weights=args.weights)
    tok = bundle.tokenizer
    print(f"# {machine()}  weights={args.weights}  steps={args.steps} rounds={args.rounds}")
    if args.dense_sweep:
        dense_sweep(bundle.model, tok, [int(b) for b in args.dense_sweep.split(",")],
                    args.rounds, args.steps)
        return
    if args.profile:
        profile(bundle.model, tok, args.profile)
        return
    lean, plain = ModelRunner(bundle.model, lean=True), ModelRunner(bundle.model, lean=False)
    assert lean.lean is not None and plain.lean is None
    for B in (int(b) for b in args.batches.split(",")):
        prompts = chat_prompts(tok, B)
        pre: dict[str, list[float]] = {"lean": [], "transformers": []}
        lean.prefill(prompts)  # warm both paths at this shape (oneDNN picks kernels)
        plain.prefill(prompts)
        for r in range(args.rounds):
            pair = [("lean", lean), ("transformers", plain)]
            for name, runner in pair if r % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter()
                runner.prefill(prompts)
                pre[name].append((time.perf_counter() - t0) * 1e3)
        start = plain.prefill(prompts)
        steps(lean, start, 2)  # warm both paths at this shape
        steps(plain, start, 2)
        times: dict[str, list[tuple[float, float]]] = {"lean": [], "transformers": []}
        for r in range(args.rounds):
            order = [("lean", lean), ("transformers", plain)]
            for name, runner in order if r % 2 == 0 else order[::-1]:
                times[name].append(steps(runner, start, args.steps))
        med = {k: (median([w for w, _ in v]), median([c for _, c in v])) for k, v in times.items()}
        for k, (w, c) in med.items():
            print(f"batch {B:3d}  {k:12s}  wall {w:7.2f} ms/step  cpu {c:7.2f} ms/step")
        pm = {k: median(v) for k, v in pre.items()}
        print(f"batch {B:3d}  prefill of {sum(map(len, prompts))} tokens: lean "
              f"{pm['lean']:.1f} ms, transformers {pm['transformers']:.1f} ms")
        print(f"RATIO|lean_step_speedup_b{B}|{med['transformers'][0] / med['lean'][0]:.3f}"
              f"|transformers/lean wall ms per decode step, {args.weights}")


if __name__ == "__main__":
    main()
