"""Control-vector benchmark on the embedded model (SmolLM2-135M-Instruct), in one run.

(1) decode step-time ratio, a vector on **all** 30 blocks vs unsteered, at batch 1 and
    batch 8 (target ≤ 1.05×); at batch 8 also the same entry with an α schedule vs the
    plain entry, and a directional ablation vs unsteered (targets ≤ 1.05×). Receipts are
    always on. Rounds interleave the variants; ratios are of medians of the per-token
    time of a fixed-length greedy decode (``ignore_eos``).
(2) an α sweep of a happy-vs-sad vector (20 template pairs, ``pca_diff``) over a handful
    of chat prompts: KL(P_unsteered ‖ P_steered) on the first token and averaged,
    entropy of the steered distribution, and a word-list sentiment score — printed as a
    Markdown table (``--out FILE`` also writes it).

    python benchmarks/control.py [--rounds 5] [--tokens 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import EMBEDDED, machine, report_ratio  # noqa: E402
from processors.base import ModelGeometry, ProcessorEnv  # noqa: E402
from processors.control import build_phase, control_specs  # noqa: E402
from processors.stack import parse_stack  # noqa: E402
from server.api.vectors import VectorCreate, extract_vector  # noqa: E402
from server.engine import (  # noqa: E402
    Engine,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from server.engine.runner import forward_last_logits  # noqa: E402
from server.loading import load_model  # noqa: E402
from server.settings import Settings  # noqa: E402

POSITIVE = ["happy", "joyful", "cheerful", "delighted", "ecstatic", "content", "elated", "glad",
            "thrilled", "optimistic"]
NEGATIVE = ["sad", "miserable", "gloomy", "depressed", "heartbroken", "unhappy", "devastated",
            "sorrowful", "hopeless", "pessimistic"]
TEMPLATE = "Act as if you are extremely {}. Talk about your day."
SUFFIXES = [" I feel", " Today was"]
PROMPTS = ["Tell me about your weekend.", "How was your day?", "Describe the city you live in.",
           "Write a short note to a friend.", "What do you think about Mondays?"]
GOOD = set("good great happy love wonderful amazing joy joyful excited beautiful fun glad smile "
           "enjoy enjoyed fantastic delighted best awesome cheerful exciting perfect".split())
BAD = set("bad sad terrible awful hate miserable sorry depressed lonely tired cry pain angry "
          "worst unfortunately gloomy hopeless dark heartbroken boring".split())
STEER_LAYERS = list(range(8, 15))
ALPHAS = [-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0]


def sentiment(text: str) -> float:
    """(#positive − #negative words) per 10 words."""
    words = [w.strip(".,!?;:'\"()").lower() for w in text.split()]
    if not words:
        return 0.0
    return 10.0 * (sum(w in GOOD for w in words) - sum(w in BAD for w in words)) / len(words)


def chat_ids(tok: Any, prompt: str) -> tuple[int, ...]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return tuple(int(i) for i in ids)


def run_batch(engine: Engine, reqs: list[GenerationRequest]) -> tuple[float, list[Any]]:
    """Submit together; return (wall seconds, [(text, FinishEvent)])."""
    queues: list[queue.Queue[Any]] = [queue.Queue() for _ in reqs]
    t0 = time.perf_counter()
    engine.submit_many([(r, q.put) for r, q in zip(reqs, queues, strict=True)])
    out = []
    for q in queues:
        text = []
        while True:
            ev = q.get(timeout=600)
            if isinstance(ev, TokenEvent):
                text.append(ev.text)
            elif isinstance(ev, FinishEvent):
                text.append(ev.text)
                out.append(("".join(text), ev))
                break
            else:
                raise RuntimeError(ev.message)
    return time.perf_counter() - t0, out


def forward_overhead(engine: Engine, reqs: list[GenerationRequest],
                     variants: dict[str, list[dict[str, Any]]], env: ProcessorEnv,
                     reps: int) -> list[str]:
    """Time one batch-8 decode forward per variant, alternating variant by variant so
    that the shared machine's load drifts equally over all of them (the cache is cropped
    back after each forward). Returns Markdown rows and reports the ratios."""
    runner = engine.runner
    dev = runner.device
    prompts = [r.prompt_ids for r in reqs]
    phases: dict[str, Any] = {}
    for name, steer in variants.items():
        specs = control_specs(parse_stack(steer, env, max_len=4)) if steer else ()
        phases[name] = build_phase([specs] * len(prompts), "generated", dev,
                                   prompt_lens=[len(p) for p in prompts])
    group = runner.prefill(prompts)
    cache, mask, logits = group.cache, group.mask, group.next_logits
    lengths = [n + 1 for n in group.lengths]  # each row's real tokens after the fed one
    tokens = logits.argmax(dim=-1)  # (B,)
    mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
    positions = (mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for rep in range(reps + 2):  # two warm-up rounds
            for name in variants:
                phase = phases[name]
                t0 = time.perf_counter()
                with runner.hooks.steering(phase, mask, positions):
                    forward_last_logits(runner.model, tokens.view(-1, 1), mask, positions,
                                        cache, lengths)
                if phase is not None and phase.stats:
                    names = sorted(phase.stats)
                    torch.stack([phase.stats[k] for k in names], dim=1).double().tolist()
                dt = time.perf_counter() - t0
                cache.crop(-1)
                if rep >= 2:
                    times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    report_ratio("forward: plain control + receipts vs unsteered, batch 8",
                 med["on"] / med["off"], "<=", 1.05)
    report_ratio("forward: control schedule + receipts vs plain control, batch 8",
                 med["schedule"] / med["on"], "<=", 1.05)
    report_ratio("forward: ablation vs unsteered, batch 8", med["ablate"] / med["off"],
                 "<=", 1.05)
    return [
        f"| unsteered | {1000 * med['off']:.1f} | 1.000× |",
        f"| plain control (α = 0.5) | {1000 * med['on']:.1f} | "
        f"{med['on'] / med['off']:.3f}× unsteered |",
        f"| schedule (cosine 0.5 → 0.1 over 16) | {1000 * med['schedule']:.1f} | "
        f"{med['schedule'] / med['on']:.3f}× plain control |",
        f"| ablate (strength 1) | {1000 * med['ablate']:.1f} | "
        f"{med['ablate'] / med['off']:.3f}× unsteered |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--sweep-tokens", type=int, default=40)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--overhead-only", action="store_true", help="skip the α sweep")
    ap.add_argument("--forward-reps", type=int, default=40,
                    help="timed single decode forwards per variant")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bundle = load_model(EMBEDDED, Settings().data_dir)
    model, tok = bundle.model, bundle.tokenizer
    L, D = model.config.num_hidden_layers, model.config.hidden_size
    print(f"# control-vector benchmark — {machine()}")

    t0 = time.perf_counter()
    body = VectorCreate(name="mood", template=TEMPLATE, positive_words=POSITIVE,
                        negative_words=NEGATIVE, suffixes=SUFFIXES, chat=True)
    vec = extract_vector(body, list(range(L)), model, tok)
    extract_s = time.perf_counter() - t0
    print(f"extraction: {vec.info['pairs']} pairs, {L} layers, {extract_s:.1f} s")
    env = ProcessorEnv(bundle.vocab_size, control_vectors={"mood": vec},
                       geometry=ModelGeometry(num_layers=L, hidden_size=D))
    engine = Engine(model, tok)
    engine.start()

    def req(prompt: str, steering: list[dict[str, Any]], n: int, diag: str = "off",
            rid: str = "r") -> GenerationRequest:
        return GenerationRequest(rid, chat_ids(tok, prompt),
                                 SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                                 parse_stack(steering, env, max_len=4), diag)  # type: ignore[arg-type]

    # (1) overhead: all layers, small α (timing only). Receipts are always on, so "plain"
    # includes them; at batch 8 also the same entry with a schedule, and an ablation.
    variants: dict[str, list[dict[str, Any]]] = {
        "off": [],
        "on": [{"type": "control", "vector": "mood", "alpha": 0.5}],
        "schedule": [{"type": "control", "vector": "mood",
                      "alpha": {"start": 0.5, "end": 0.1, "over": 16, "shape": "cosine"}}],
        "ablate": [{"type": "control", "vector": "mood", "mode": "ablate", "strength": 1.0}],
    }
    lines = []
    extra: list[str] = []
    for B in (1, 8):
        names = ["off", "on"] if B == 1 else list(variants)
        times: dict[str, list[float]] = {k: [] for k in names}
        run_batch(engine, [req(PROMPTS[0], [], 4)] * B)  # warm-up
        for _ in range(args.rounds):
            for name in names:  # interleaved: one run of every variant per round
                reqs = [req(PROMPTS[i % len(PROMPTS)], variants[name], args.tokens,
                            rid=f"{name}{i}") for i in range(B)]
                wall, _ = run_batch(engine, reqs)
                times[name].append(wall / args.tokens)
        med = {k: statistics.median(v) for k, v in times.items()}
        off, on = med["off"], med["on"]
        lines.append(f"| {B} | {1000 * off:.1f} | {1000 * on:.1f} | {on / off:.3f}× |")
        report_ratio(f"control vector on all blocks, batch {B}", on / off, "<=", 1.05)
        if B == 8:
            sched, abl = med["schedule"], med["ablate"]
            report_ratio("control schedule + receipts vs plain control, batch 8", sched / on,
                         "<=", 1.05)
            report_ratio("ablation on all blocks vs unsteered, batch 8", abl / off, "<=", 1.05)
            extra = [f"| schedule (cosine 0.5 → 0.1 over 16) | {1000 * sched:.1f} | "
                     f"{sched / on:.3f}× plain control |",
                     f"| ablate (strength 1) | {1000 * abl:.1f} | {abl / off:.3f}× unsteered |"]
    print("\n## Step-time overhead (vector on all 30 blocks vs unsteered; medians)\n")
    print("| batch | unsteered ms/token | steered ms/token | ratio |\n|---|---|---|---|")
    print("\n".join(lines))
    print("\nBatch 8, same rounds (receipts are always on, in the plain control row too):\n")
    print("| entry on all 30 blocks | ms/token | ratio |\n|---|---|---|")
    print("\n".join(extra))
    lines += ["", "| entry on all 30 blocks, batch 8 | ms/token | ratio |", "|---|---|---|",
              *extra]
    # The single forwards run on this thread: stop the engine first, so that its
    # thread's OpenMP pool is gone and this thread's is the only one (two pools throttle
    # each other on a small CPU, server.threads); a fresh engine serves the sweep.
    engine.stop()
    fwd = forward_overhead(engine, [req(PROMPTS[i % len(PROMPTS)], v, 1) for i in range(8)
                                    for v in [[]]], variants, env, args.forward_reps)
    engine = Engine(model, tok)
    engine.start()
    print(f"\nSingle decode forwards at batch 8, variants alternating forward by forward "
          f"({args.forward_reps} each; the receipt variants include packing and reading "
          "their stats to the host):\n")
    print("| entry on all 30 blocks | ms/forward | ratio |\n|---|---|---|")
    print("\n".join(fwd))
    lines += ["", "| single decode forward, batch 8 | ms/forward | ratio |", "|---|---|---|",
              *fwd]
    if args.overhead_only:
        engine.stop()
        return

    # (2) α sweep on STEER_LAYERS
    rows = []
    for alpha in ALPHAS:
        steer = [{"type": "control", "vector": "mood", "alpha": alpha, "layers": STEER_LAYERS}]
        reqs = [req(p, steer, args.sweep_tokens, "summary", f"a{i}") for i, p in enumerate(PROMPTS)]
        _, outs = run_batch(engine, reqs)
        d = [fin.diagnostics for _, fin in outs]
        rows.append((
            alpha,
            statistics.mean(x["kl_base_steered_first"] for x in d),
            statistics.mean(x["kl_base_steered_mean"] for x in d),
            statistics.mean(x["entropy_steered_mean"] for x in d),
            statistics.mean(x["base_ppl"] for x in d),
            statistics.mean(sentiment(t) for t, _ in outs),
            outs[1][0][:70].replace("\n", " ").replace("|", "/"),
        ))
    engine.stop()
    table = [
        f"α sweep: happy−sad vector ({vec.info['pairs']} pairs, pca_diff) on blocks "
        f"{STEER_LAYERS[0]}–{STEER_LAYERS[-1]}, {len(PROMPTS)} chat prompts, greedy, "
        f"{args.sweep_tokens} tokens; sentiment = (#positive − #negative words) per 10 words.",
        "",
        "| α | KL first | KL mean | H(steered) mean | base ppl | sentiment | sample (\"How was "
        "your day?\") |",
        "|---|---|---|---|---|---|---|",
    ]
    table += [f"| {a:+.1f} | {k1:.3f} | {km:.3f} | {h:.2f} | {ppl:.1f} | {s:+.2f} | {t} |"
              for a, k1, km, h, ppl, s, t in rows]
    print("\n## α sweep\n")
    print("\n".join(table))
    if args.out:
        args.out.write_text("\n".join(["\n".join(lines), "", *table, ""]))


if __name__ == "__main__":
    main()


__all__ = ["main", "sentiment"]
