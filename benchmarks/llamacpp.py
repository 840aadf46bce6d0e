"""Peer benchmark: the embedded GGUF through llama-cpp-python vs steerserve, one stream.

Both sides decode the same prompt token ids (the chat template rendered by steerserve's
tokenizer) greedily for a fixed number of tokens (EOS ignored), one stream, 2 threads for
llama.cpp; prefill is inside both timings. Rounds interleave llama.cpp / steerserve
(``STEER_WEIGHTS=auto``, over HTTP); medians. Prints a ``RATIO|`` line.

llama-cpp-python is opt-in and never a dependency (it compiles llama.cpp: 15-25 minutes
on 2 cores). Install it into its own virtual environment and point the script at it:

    python3 -m venv ~/llamavenv && ~/llamavenv/bin/pip install llama-cpp-python
    STEER_LLAMACPP_PYTHON=~/llamavenv/bin/python python benchmarks/llamacpp.py

(or install it into the current interpreter). Without it the script says so and exits 0.

    python benchmarks/llamacpp.py [--rounds 3] [--tokens 64] [--weights auto]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, median, report_ratio, server_process  # noqa: E402
from benchmarks.fastpath import PROMPTS, burst  # noqa: E402

# Runs inside the llama-cpp-python interpreter: load once, then one timed greedy run per
# stdin line ``TOKENS``, answering tokens/s on stdout.
WORKER = r"""
import json, sys, time
from llama_cpp import Llama
path, ids, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads,
            n_batch=512, verbose=False)
print("READY", flush=True)
for line in sys.stdin:
    n = int(line)
    llm.reset()
    t0 = time.perf_counter()
    got = 0
    for _ in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        got += 1
        if got == n:
            break
    print(json.dumps({"tps": got / (time.perf_counter() - t0)}), flush=True)
"""


def find_llama_python() -> str | None:
    """The interpreter that has ``llama_cpp``: $STEER_LLAMACPP_PYTHON, else this one."""
    candidates = [os.environ.get("STEER_LLAMACPP_PYTHON"), sys.executable]
    for py in candidates:
        if not py:
            continue
        py = os.path.expanduser(py)
        ok = subprocess.run([py, "-c", "import llama_cpp"], capture_output=True, check=False)
        if ok.returncode == 0:
            return py
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="auto", help="steerserve's STEER_WEIGHTS")
    ap.add_argument("--quick", action="store_true", help="1 round × 16 tokens")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.tokens = 1, 16
    py = find_llama_python()
    if py is None:
        print("llama-cpp-python is not installed (opt-in peer benchmark, skipped). Install:\n"
              "  python3 -m venv ~/llamavenv && ~/llamavenv/bin/pip install llama-cpp-python\n"
              "  STEER_LLAMACPP_PYTHON=~/llamavenv/bin/python python benchmarks/llamacpp.py")
        return
    from server.loading import embedded_gguf_path
    from server.settings import Settings

    gguf = embedded_gguf_path("smollm2-135m-instruct")
    messages = [{"role": "user", "content": PROMPTS[0]}]
    from transformers import AutoTokenizer

    from server.loading import resolve_source

    model_dir = resolve_source("embedded:smollm2-135m-instruct", Settings().data_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True, return_dict=False))
    body = {"prompt": ids, "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}
    worker = subprocess.Popen([py, "-c", WORKER, str(gguf), json.dumps(ids),
                               str(args.threads)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert worker.stdin is not None and worker.stdout is not None
    try:
        if worker.stdout.readline().strip() != "READY":
            raise RuntimeError("llama-cpp-python worker failed to start")

        def llama(n: int) -> float:
            assert worker.stdin is not None and worker.stdout is not None
            worker.stdin.write(f"{n}\n")
            worker.stdin.flush()
            return float(json.loads(worker.stdout.readline())["tps"])

        tps: dict[str, list[float]] = {"llama": [], "steer": []}
        with server_process(STEER_WEIGHTS=args.weights) as url:
            info = httpx.get(url + "/v1/models").json()["data"][0]
            llama(4)
            asyncio.run(burst(url, [{**body, "max_tokens": 4}]))  # warm-up both
            for r in range(args.rounds):
                t0 = time.perf_counter()
                tps["llama"].append(llama(args.tokens))
                tps["steer"].append(asyncio.run(burst(url, [body])))
                print(f"round {r + 1}: llama.cpp {tps['llama'][-1]:.1f} tok/s, steerserve "
                      f"{tps['steer'][-1]:.1f} tok/s ({time.perf_counter() - t0:.1f} s)",
                      flush=True)
    finally:
        worker.terminate()
        worker.wait(30)
    med = {k: median(v) for k, v in tps.items()}
    ratio = med["steer"] / med["llama"]
    print(f"\nmachine: {machine()}")
    print(f"one stream, {args.tokens} greedy tokens, {args.rounds} interleaved rounds, "
          f"medians: llama-cpp-python ({args.threads} threads) {med['llama']:.1f} tok/s, "
          f"steerserve (weights {info['weights']}) {med['steer']:.1f} tok/s")
    print(f"ratio steerserve / llama.cpp: {ratio:.2f}x (target >= 0.5)")
    report_ratio("single stream vs llama-cpp-python (same GGUF)", ratio, ">=", 0.5)


if __name__ == "__main__":
    main()
