"""What the logits processors cost by themselves: ``ProcessorStack.apply`` in isolation.

The step-time benchmarks (ngram.py, calibration.py, mixed.py) report steering overhead as a
*ratio* to an unsteered step, so a faster base step (the int4 fast path) makes the same
processor milliseconds a larger share. This script times the processors alone, in
milliseconds per call, on float32 logits of the embedded model's vocabulary, with a prior
built from the first ``--docs`` documents of the ``kjv`` corpus (tokenized with the
embedded model's tokenizer) and contexts taken from that corpus (a different set per
call):

* ``ngram b1``: one row, ``ngram`` λ 0.2; ``ngram b8``: eight such rows;
* ``ngram+margin b8``: eight rows of ``ngram`` then ``margin`` (calibration.py's overhead
  case);
* ``mixed b8``: mixed.py's eight stacks without the control-vector rows (those act in the
  forward, not here): unsteered, logit_bias, ngram, ngram zscore, ngram + margin,
  unsteered, ngram, logit_bias + margin.

    python benchmarks/stack_apply.py [--calls 60] [--docs 3000] [--cpu]

Prints the median of ``--calls`` timed calls per case (after warm-up); no ratio, no target.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import EMBEDDED, machine, median  # noqa: E402


def build_env(docs: int) -> tuple[Any, int, list[int]]:
    """A ProcessorEnv holding a kjv prior 'kjv' over the embedded model's vocabulary,
    and the corpus' token stream (where the timed contexts come from)."""
    from processors.base import ProcessorEnv
    from processors.ngram import NgramPrior
    from server.corpora import load_corpus
    from server.loading import load_model

    bundle = load_model(EMBEDDED, Path.home() / ".cache" / "steerserve", weights="fp32")
    V = int(bundle.model.config.vocab_size)
    texts = load_corpus("kjv", max_bytes=1 << 30, max_documents=docs)
    ids = [bundle.tokenizer(t)["input_ids"] for t in texts]
    prior = NgramPrior.build("kjv", ids, V)
    return ProcessorEnv(vocab_size=V, priors={"kjv": prior}), V, [t for d in ids for t in d]


def time_stack(env: Any, V: int, rows: list[list[dict[str, Any]]], calls: int,
               stream: list[int], clock: Any = time.perf_counter) -> float:
    """Median ms of one ``apply`` over ``(len(rows), V)`` random float32 logits, by
    ``clock`` (wall time, or the thread's CPU time: see ``--cpu``)."""
    from processors.base import StepContext
    from processors.stack import ProcessorStack, parse_stack

    stack = ProcessorStack(torch.device("cpu"), V)
    stack.update_state([parse_stack(r, env, max_len=16) for r in rows])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(rows), V, generator=gen) * 3  # (B, V)
    # Real contexts (two consecutive corpus tokens per row), a different set every call,
    # so the lookups touch the tables as decoding in that style would.
    starts = torch.randint(0, len(stream) - 2, (16, len(rows)), generator=gen).tolist()
    lasts = [torch.tensor([[stream[i], stream[i + 1]] for i in st]) for st in starts]
    n = [0]

    def once() -> None:
        last = lasts[n[0] % len(lasts)]  # (B, 2)
        n[0] += 1
        stack.apply(StepContext(base_logits=logits, last_tokens=last, want_stats=False), logits)

    for _ in range(10):
        once()
    ts = []
    for _ in range(calls):
        t0 = clock()
        once()
        ts.append((clock() - t0) * 1000)
    return median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--cpu", action="store_true",
                    help="one torch thread, timed by the thread's CPU time: the work itself, "
                         "steady on a machine other jobs share (wall time swings there)")
    args = ap.parse_args()
    torch.set_num_threads(1 if args.cpu else 2)
    clock = time.thread_time if args.cpu else time.perf_counter
    env, V, stream = build_env(args.docs)
    ng = {"type": "ngram", "prior": "kjv", "lambda": 0.2}
    cases = {
        "ngram b1": [[ng]],
        "ngram b8": [[ng]] * 8,
        "ngram+margin b8": [[ng, {"type": "margin"}]] * 8,
        "mixed b8": [[], [{"type": "logit_bias", "bias": {"28": 2.0}}], [ng],
                     [{**ng, "scale": "zscore"}], [ng, {"type": "margin"}], [], [ng],
                     [{"type": "logit_bias", "bias": {"30": -3.0}},
                      {"type": "margin", "tau": 0.3}]],
    }
    print(f"machine: {machine()}")
    for rows in cases.values():  # the process's first calls pay one-time costs (~30 ms)
        time_stack(env, V, rows, 3, stream)
    what = "CPU ms, 1 thread" if args.cpu else "ms"
    for name, rows in cases.items():
        ms = time_stack(env, V, rows, args.calls, stream, clock)
        print(f"{name}: ProcessorStack.apply {ms:.2f} {what} (median of {args.calls}, "
              f"vocabulary {V})")


if __name__ == "__main__":
    main()
