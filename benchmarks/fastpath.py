"""The fast path (weights bf16 / int4 / auto) against the exact fp32 path, in one run.

Quality (in-process, the embedded model): over N prompts × T greedy tokens, fp32 decides
the reference continuation; for bf16 and int4 it reports

* free-running token agreement (share of positions where the fast model's own greedy
  tokens equal fp32's; collapses after the first differing token, so it is a weak measure),
* teacher-forced top-1 agreement (the fast model reads fp32's tokens; share of steps whose
  argmax equals fp32's) and mean per-token KL(fp32 ‖ fast) in nats.

Speed (HTTP, two servers side by side: ``STEER_WEIGHTS=fp32`` and ``auto``): one stream of
T greedy tokens, and 16 concurrent requests with 16 different n-gram stacks; rounds
interleave fp32 / auto; medians.

    python benchmarks/fastpath.py [--prompts 20] [--tokens 64] [--rounds 3] [--quick]
    python benchmarks/fastpath.py --batch-sweep 16,32,64 [--tokens 32]   # issue 13 item 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    CHAT_PROMPTS,
    EMBEDDED,
    burst,
    machine,
    median,
    report_ratio,
    server_process,
)
from server.loading import ModelBundle, load_model  # noqa: E402
from server.settings import Settings  # noqa: E402

PROMPTS = CHAT_PROMPTS


def prompt_ids(bundle: ModelBundle, text: str) -> list[int]:
    ids = bundle.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
        return_dict=False,
    )
    return list(ids)


@torch.inference_mode()
def greedy(bundle: ModelBundle, ids: list[int], tokens: int) -> list[int]:
    """``tokens`` greedy tokens (EOS ignored) with the model's KV cache."""
    x = torch.tensor([ids])
    out = bundle.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                                min_new_tokens=tokens, do_sample=False)
    return out[0, len(ids):].tolist()


@torch.inference_mode()
def forced_logits(bundle: ModelBundle, ids: list[int], cont: list[int]) -> torch.Tensor:
    """Next-token logits ``(T, V)`` float32 at each continuation step, the model reading
    ``ids + cont`` (teacher forcing)."""
    x = torch.tensor([ids + cont])
    logits = bundle.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]
    return logits[len(ids) - 1 : len(ids) + len(cont) - 1].float()


def quality(n_prompts: int, tokens: int) -> dict[str, dict[str, float]]:
    data = Settings().data_dir
    ref = load_model(EMBEDDED, data, weights="fp32")
    fast = {w: load_model(EMBEDDED, data, weights=w) for w in ("bf16", "int4")}
    stats: dict[str, dict[str, list[float]]] = {w: {"agree": [], "top1": [], "kl": []}
                                                 for w in fast}
    for i, text in enumerate(PROMPTS[:n_prompts]):
        ids = prompt_ids(ref, text)
        cont = greedy(ref, ids, tokens)
        lp_ref = torch.log_softmax(forced_logits(ref, ids, cont), -1)
        for w, b in fast.items():
            own = greedy(b, ids, tokens)
            lp = torch.log_softmax(forced_logits(b, ids, cont), -1)
            st = stats[w]
            st["agree"].append(sum(a == c for a, c in zip(own, cont, strict=True)) / tokens)
            st["top1"].append((lp.argmax(-1) == lp_ref.argmax(-1)).float().mean().item())
            st["kl"].append((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean().item())
        print(f"prompt {i + 1}/{n_prompts}: " + ", ".join(
            f"{w} top1 {s['top1'][-1]:.3f} KL {s['kl'][-1]:.4f}" for w, s in stats.items()),
            flush=True)
    return {w: {k: sum(v) / len(v) for k, v in st.items()} for w, st in stats.items()}


def sixteen_stacks(prior: str) -> list[list[dict[str, Any]]]:
    """16 different n-gram stacks (λ, scale, weights and a margin guard vary)."""
    out: list[list[dict[str, Any]]] = []
    for k in range(16):
        ng: dict[str, Any] = {"type": "ngram", "prior": prior, "lambda": 0.02 * (k + 1)}
        if k % 2:
            ng["scale"] = "zscore"
        if k % 4 == 3:
            ng["weights"] = [0.2, 0.3, 0.5]
        out.append([ng, {"type": "margin"}] if k % 3 == 2 else [ng])
    return out


def speed(tokens: int, rounds: int) -> dict[str, float]:
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True}
    tps: dict[str, list[float]] = {k: [] for k in ("fp32_1", "auto_1", "fp32_16", "auto_16")}
    tag = os.getpid()
    with server_process(STEER_WEIGHTS="fp32") as u32, server_process(STEER_WEIGHTS="auto") as ua:
        for w, u in (("fp32", u32), ("auto", ua)):
            info = httpx.get(u + "/v1/models").json()["data"][0]
            print(f"{w} server: weights {info['weights']}, activations {info['dtype']}")
            httpx.post(u + "/v1/priors", json={"name": f"fp-{w}-{tag}", "corpus": "kjv",
                                                 "max_documents": 2000},
                       timeout=900).raise_for_status()
        many = {w: [{**body, "messages": [{"role": "user", "content": p}],
                     "steering": s}
                    for p, s in zip(PROMPTS[:16], sixteen_stacks(f"fp-{w}-{tag}"),
                                    strict=True)]
                for w in ("fp32", "auto")}
        try:
            for u in (u32, ua):
                asyncio.run(burst(u, [{**body, "max_tokens": 4}]))  # warm-up
            for r in range(rounds):
                for w, u in (("fp32", u32), ("auto", ua)):
                    tps[f"{w}_1"].append(asyncio.run(burst(u, [body])))
                for w, u in (("fp32", u32), ("auto", ua)):
                    tps[f"{w}_16"].append(asyncio.run(burst(u, many[w])))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in tps.items())
                      + " tok/s", flush=True)
        finally:
            for w, u in (("fp32", u32), ("auto", ua)):
                httpx.delete(u + f"/v1/priors/fp-{w}-{tag}")
    return {k: median(v) for k, v in tps.items()}


def _rss_mb() -> tuple[float, float]:
    """This process's resident set and its peak (MiB), from /proc."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def _sweep_one(bundle: ModelBundle, b: int, tokens: int) -> dict[str, float]:
    """One ``max_batch_size = b`` point of :func:`batch_sweep`."""
    import threading
    import time

    from server.engine.scheduler import Engine, EngineConfig
    from server.engine.types import FinishEvent, GenerationRequest, SamplingParams

    engine = Engine(bundle.model, bundle.tokenizer,
                    EngineConfig(max_batch_size=b, max_queue=max(64, b)))
    steps: list[float] = []
    hosts: list[float] = []
    step, emit = engine._step, engine._emit_all

    def timed_step() -> None:
        t = time.perf_counter()
        step()
        steps.append(time.perf_counter() - t)

    def timed_emit(*a: Any) -> list[int]:
        t = time.perf_counter()
        r = emit(*a)
        hosts.append(time.perf_counter() - t)
        return r

    engine._step, engine._emit_all = timed_step, timed_emit  # type: ignore[method-assign]
    done = threading.Semaphore(0)
    lengths: list[int] = []

    def sink(ev: Any) -> None:
        if isinstance(ev, FinishEvent):
            lengths.append(ev.prompt_tokens + ev.completion_tokens)
            done.release()

    reqs = [GenerationRequest(request_id=f"sweep-{b}-{i}",
                              prompt_ids=tuple(prompt_ids(bundle, PROMPTS[i % 20])),
                              sampling=SamplingParams(max_tokens=tokens, temperature=0,
                                                      ignore_eos=True))
            for i in range(b)]
    engine.start()
    t0 = time.perf_counter()
    engine.submit_many([(r, sink) for r in reqs])
    for _ in reqs:
        done.acquire()
    wall = time.perf_counter() - t0
    engine.stop()
    cfg = bundle.model.config
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    act_bytes = bundle.model.get_input_embeddings().weight.element_size()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * act_bytes
    rss, peak = _rss_mb()
    # Steady decode steps: skip the first two (prefill, first batch rebuild).
    return {"batch": b, "tok_s": b * tokens / wall,
            "step_ms": median(steps[2:] or steps) * 1e3,
            "host_ms": median(hosts[2:] or hosts) * 1e3, "rss_mb": rss, "peak_mb": peak,
            "kv_mb": sum(lengths) * kv_per_token / 2**20,
            "kv_mb_per_row_ctx": kv_per_token * bundle.context_length / 2**20}


def batch_sweep(sizes: list[int], tokens: int) -> list[dict[str, float]]:
    """``max_batch_size`` = B with B concurrent greedy requests on the ``auto`` weights,
    in-process on the engine: aggregate tok/s, median decode-step time, the host part of
    a step (``Engine._emit_all``: detokenization, events, stop checks; timed by wrapping
    the method, the engine itself is unchanged), process RSS, and the KV cache's size
    (``2 · layers · kv_heads · head_dim · bytes`` per token, at the rows' final length)."""
    bundle = load_model(EMBEDDED, Settings().data_dir, weights="auto")
    out: list[dict[str, float]] = []
    for b in sizes:
        row = _sweep_one(bundle, b, tokens)
        row["host_us_per_row"] = row["host_ms"] * 1e3 / b
        print(f"max_batch_size {b}: {row['tok_s']:.1f} tok/s, step {row['step_ms']:.1f} ms, "
              f"host {row['host_ms']:.2f} ms ({row['host_us_per_row']:.0f} us/row), RSS "
              f"{row['rss_mb']:.0f} MiB (peak {row['peak_mb']:.0f}), KV {row['kv_mb']:.1f} "
              f"MiB ({row['kv_mb_per_row_ctx']:.0f} MiB per row at the full "
              f"{bundle.context_length}-token context)", flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 prompts × 16 tokens, 1 round")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--batch-sweep", default="",
                    help="comma-separated max_batch_size values (e.g. 16,32,64): engine "
                         "throughput, step and host time, memory; runs only this")
    args = ap.parse_args()
    if args.batch_sweep:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        print(f"machine: {machine()}")
        batch_sweep([int(x) for x in args.batch_sweep.split(",")], args.tokens)
        return
    if args.quick:
        args.prompts, args.tokens, args.rounds = 4, 16, 1
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    q = {} if args.skip_quality else quality(args.prompts, args.tokens)
    s = {} if args.skip_speed else speed(args.tokens, args.rounds)
    print(f"\nmachine: {machine()}")
    if q:
        print(f"quality over {args.prompts} prompts × {args.tokens} greedy tokens (vs fp32):")
        for w, st in q.items():
            print(f"  {w:5s}: free-running token agreement {st['agree']:.3f}, teacher-forced "
                  f"top-1 agreement {st['top1']:.3f}, mean KL(fp32||{w}) {st['kl']:.4f} nats")
    if s:
        print(f"speed, {args.rounds} interleaved rounds, medians (tokens/s):")
        print(f"  one stream      : fp32 {s['fp32_1']:.1f}, auto {s['auto_1']:.1f}")
        print(f"  16 conc./stacks : fp32 {s['fp32_16']:.1f}, auto {s['auto_16']:.1f}")
        report_ratio("fast path: single stream, auto vs fp32", s["auto_1"] / s["fp32_1"],
                     ">=", 3.5)
        report_ratio("fast path: 16 concurrent / 16 stacks, auto vs fp32",
                     s["auto_16"] / s["fp32_16"], ">=", 2.5)
    if q:
        report_ratio("int4 vs fp32: teacher-forced top-1 agreement", q["int4"]["top1"], ">=",
                     0.95)
        report_ratio("int4 vs fp32: mean KL (nats)", q["int4"]["kl"], "<=", 0.02)
        report_ratio("bf16 vs fp32: teacher-forced top-1 agreement", q["bf16"]["top1"], ">=",
                     0.95)


if __name__ == "__main__":
    main()
