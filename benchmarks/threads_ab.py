"""One OpenMP pool or two: the engine with and without ``server.threads.release_thread_pool``.

libgomp throttles its workers (they sleep between parallel regions instead of spinning)
once the process holds more OpenMP threads than CPUs, which on a 2-core machine happens
as soon as a second thread has a pool. The thread that loads the model kept its pool, the
engine thread made its own: every small parallel op of the engine paid a wake-up.
``load_model`` and ``Engine.start`` now release the calling thread's pool.

Each measurement runs in a fresh process (pools are process state), variants alternating
round by round, medians:

* ``released``: the code as it is;
* ``kept``: ``release_thread_pool`` replaced by a no-op (the code before the change).

Per process: (a) µs per ``(8, 49152)`` float32 ``mul`` + ``amax`` on a second thread
after the main thread ran the same op (and, ``released``, gave its pool back); (b) the
in-process engine (embedded model, ``--weights``, default int4; model loaded on the main
thread, as tests and benchmarks do) at batch 1 and 8: aggregate tokens/s of
``--tokens`` greedy tokens per row.

    python benchmarks/threads_ab.py [--rounds 3] [--tokens 32] [--weights int4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    CHAT_PROMPTS,
    EMBEDDED,
    engine_burst,
    machine,
    median,
    report_ratio,
)

BATCHES = (1, 8)


def op_us_on_a_second_thread(release: bool) -> float:
    """µs per ``mul`` + ``amax`` of an ``(8, 49152)`` tensor on a new thread, after the
    main thread ran the same op (so the main thread has made its pool) and, if
    ``release``, gave its pool back."""
    import torch

    from server.threads import release_thread_pool

    a = torch.randn(8, 49152)
    (a * 2).amax(-1)  # the main thread's pool
    if release:
        release_thread_pool()

    def bench(out: dict[str, float]) -> None:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(200):
                (a * 2).amax(-1)
            times.append((time.perf_counter() - t0) / 200 * 1e6)
        out["us"] = median(times)

    out: dict[str, float] = {}
    t = threading.Thread(target=bench, args=(out,))
    t.start()
    t.join()
    return out["us"]


def engine_tps(weights: str, tokens: int) -> dict[int, float]:
    """Aggregate tokens/s of the in-process engine at each of :data:`BATCHES`."""
    from server.engine import Engine, EngineConfig
    from server.loading import load_model
    from server.settings import Settings

    bundle = load_model(EMBEDDED, Settings().data_dir, weights=weights)
    tok = bundle.tokenizer
    prompts = [
        tuple(tok.apply_chat_template([{"role": "user", "content": p}],
                                      add_generation_prompt=True, tokenize=True,
                                      return_dict=False))
        for p in CHAT_PROMPTS[: max(BATCHES)]
    ]
    engine = Engine(bundle.model, tok, EngineConfig(max_batch_size=max(BATCHES)))
    engine.start()
    try:
        engine_burst(engine, prompts[:1], 4)  # warm-up
        return {b: engine_burst(engine, prompts[:b], tokens) for b in BATCHES}
    finally:
        engine.stop()


def child(mode: str, weights: str, tokens: int) -> None:
    """One measurement in this process; prints a JSON line."""
    if mode == "kept":
        import server.engine.scheduler as scheduler
        import server.loading as loading

        def keep() -> bool:
            return False

        loading.release_thread_pool = keep  # type: ignore[assignment]
        scheduler.release_thread_pool = keep  # type: ignore[assignment]
    us = op_us_on_a_second_thread(mode == "released")
    tps = engine_tps(weights, tokens)
    print("RESULT " + json.dumps({"op_us": us, **{f"tps_b{b}": v for b, v in tps.items()}}),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--child", choices=["released", "kept"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.weights, args.tokens)
        return
    results: dict[str, list[dict[str, float]]] = {"released": [], "kept": []}
    for r in range(args.rounds):
        for mode in ("kept", "released") if r % 2 == 0 else ("released", "kept"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--weights", args.weights,
                 "--tokens", str(args.tokens)],
                capture_output=True, text=True, check=True, timeout=1200,
            ).stdout
            line = next(x for x in out.splitlines() if x.startswith("RESULT "))
            results[mode].append(json.loads(line.removeprefix("RESULT ")))
            print(f"round {r + 1} {mode}: {results[mode][-1]}", flush=True)
    med = {m: {k: median([x[k] for x in rs]) for k in rs[0]} for m, rs in results.items()}
    print(f"machine: {machine()}; weights {args.weights}; {args.tokens} tokens per row; "
          f"medians of {args.rounds} rounds")
    print(f"  (8, 49152) mul+amax on a second thread: kept {med['kept']['op_us']:.1f} us, "
          f"released {med['released']['op_us']:.1f} us")
    for b in BATCHES:
        k, rel = med["kept"][f"tps_b{b}"], med["released"][f"tps_b{b}"]
        print(f"  engine batch {b}: kept {k:.1f} tok/s, released {rel:.1f} tok/s "
              f"({rel / k:.2f}x)")
        report_ratio(f"engine batch {b}, one OpenMP pool vs two (tokens/s)", rel / k, ">=", 1.0)


if __name__ == "__main__":
    main()
