"""Worked examples of token windows, strength schedules, directional ablation and the
steering receipt on the embedded model (SmolLM2-135M-Instruct); docs/control.md quotes
its output.

(1) α schedule vs constant: a happy−sad vector on blocks 8–14, constant α = 2 vs a
    schedule from 4 to 0 over 24 tokens (cosine); per-token KL(P_unsteered ‖ P_steered)
    averaged over blocks of 8 generated tokens, and the sentiment score.
(2) a window after a marker: the same vector with ``positions: {"after": "."}`` — the
    text is the unsteered text up to the first ".", then steered; the receipt counts the
    generated positions it acted on.
(3) ablation reducing a measured projection: ``mode: "ablate"`` of the vector on blocks
    8–14 for prompts that ask for a happy answer; the component ``|h·û|/‖h‖`` before the
    edit (receipt) and after it (read back with ``output_hidden_states``), and the
    sentiment of the answers.

    python benchmarks/control_examples.py [--tokens 32] [--out docs/control-examples.md]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import EMBEDDED, machine  # noqa: E402
from benchmarks.control import (  # noqa: E402
    NEGATIVE,
    POSITIVE,
    PROMPTS,
    STEER_LAYERS,
    SUFFIXES,
    TEMPLATE,
    chat_ids,
    run_batch,
    sentiment,
)
from processors.base import ModelGeometry, ProcessorEnv  # noqa: E402
from processors.control import ControlProcessor, build_phase  # noqa: E402
from processors.stack import parse_stack  # noqa: E402
from server.api.vectors import VectorCreate, extract_vector  # noqa: E402
from server.engine import Engine, GenerationRequest, SamplingParams  # noqa: E402
from server.engine.hooks import ControlHooks  # noqa: E402
from server.loading import load_model  # noqa: E402
from server.settings import Settings  # noqa: E402

HAPPY_PROMPTS = ["Act as if you are extremely happy. Talk about your day.",
                 "Write one cheerful sentence about the weather.",
                 "Tell me something that makes you glad."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    bundle = load_model(EMBEDDED, Settings().data_dir)
    model, tok = bundle.model, bundle.tokenizer
    L, D = model.config.num_hidden_layers, model.config.hidden_size
    body = VectorCreate(name="mood", template=TEMPLATE, positive_words=POSITIVE,
                        negative_words=NEGATIVE, suffixes=SUFFIXES, chat=True)
    vec = extract_vector(body, list(range(1, L)), model, tok)
    env = ProcessorEnv(bundle.vocab_size, control_vectors={"mood": vec},
                       geometry=ModelGeometry(num_layers=L, hidden_size=D))
    engine = Engine(model, tok)
    engine.start()
    n = args.tokens
    out: list[str] = [f"Output of `python benchmarks/control_examples.py --tokens {n}` "
                      f"({machine()}). Vector: happy−sad, {vec.info['pairs']} pairs, "
                      f"pca_diff, blocks {STEER_LAYERS[0]}–{STEER_LAYERS[-1]}; greedy decoding.",
                      ""]

    def req(prompt: str, steering: list[dict[str, Any]], diag: str = "off",
            rid: str = "r") -> GenerationRequest:
        return GenerationRequest(rid, chat_ids(tok, prompt),
                                 SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                                 parse_stack(steering, env, max_len=4), diag)  # type: ignore[arg-type]

    base = {"type": "control", "vector": "mood", "layers": STEER_LAYERS}
    # (1) schedule vs constant -------------------------------------------------------
    variants = {
        "unsteered": [],
        "constant α = 2": [{**base, "alpha": 2.0}],
        "α: 4 → 0 over 24 (cosine)": [{**base, "alpha": {"start": 4.0, "end": 0.0, "over": 24,
                                                         "shape": "cosine"}}],
    }
    out += ["## (1) α schedule vs constant", "",
            f"Mean per-token KL(P_unsteered ‖ P_steered) over {len(PROMPTS)} chat prompts, by "
            "generated-token block; sentiment = (#positive − #negative words) per 10 words.",
            "", "| variant | KL t0–7 | KL t8–15 | KL t16–23 | KL t24+ | sentiment | sample "
            "(\"How was your day?\") |", "|---|---|---|---|---|---|---|"]
    receipt_example: dict[str, Any] | None = None
    for name, steer in variants.items():
        _, res = run_batch(engine, [req(p, steer, "steps", f"s{i}") for i, p in
                                    enumerate(PROMPTS)])
        kl = [fin.diagnostics["per_step"]["kl_base_steered"] for _, fin in res]
        cells = []
        for lo, hi in ((0, 8), (8, 16), (16, 24), (24, n)):
            vals = [v for row in kl for v in row[lo:hi] if v is not None]
            cells.append(f"{statistics.mean(vals):.3f}" if vals else "–")
        sent = statistics.mean(sentiment(t) for t, _ in res)
        sample = res[1][0][:60].replace("\n", " ").replace("|", "/")
        out.append(f"| {name} | {' | '.join(cells)} | {sent:+.2f} | {sample} |")
        if name.startswith("α:"):
            receipt_example = res[1][1].receipt
    # (2) after a marker -------------------------------------------------------------
    prompt = PROMPTS[1]
    (plain, _), (after, fin_a), (always, _) = run_batch(engine, [
        req(prompt, []), req(prompt, [{**base, "alpha": 3.0, "positions": {"after": "."}}]),
        req(prompt, [{**base, "alpha": 3.0, "positions": "generated"}])])[1]
    cut = plain.find(".") + 1
    entry = fin_a.receipt["entries"][0]
    out += ["", "## (2) A window after a marker", "",
            f"Prompt {prompt!r}, α = 3, `positions: {{\"after\": \".\"}}` vs `\"generated\"`.",
            "", "| variant | text |", "|---|---|",
            f"| unsteered | {plain[:110]!r} |", f"| after \".\" | {after[:110]!r} |",
            f"| generated | {always[:110]!r} |", "",
            f"Identical up to the first \".\" (character {cut}): "
            f"{after[:cut] == plain[:cut]}. Receipt: prompt positions "
            f"{entry['prompt_positions']}, generated positions {entry['generated_positions']} "
            f"of {n - 1} fed."]
    # (3) ablation ---------------------------------------------------------------------
    abl = [{**base, "mode": "ablate", "strength": 1.0}]
    plain_res = run_batch(engine, [req(p, []) for p in HAPPY_PROMPTS])[1]
    abl_res = run_batch(engine, [req(p, abl) for p in HAPPY_PROMPTS])[1]
    engine.stop()
    comp = {layer: statistics.mean(fin.receipt["entries"][0]["per_layer"][str(layer)]
                                   ["component_mean"] for _, fin in abl_res)
            for layer in STEER_LAYERS}
    # After the edit: the prompt's states read back through output_hidden_states.
    spec = ControlProcessor.validate({"vector": "mood", "mode": "ablate",
                                      "layers": STEER_LAYERS}, env)
    hooks = ControlHooks.install(model)
    after_c: dict[int, list[float]] = {layer: [] for layer in STEER_LAYERS}
    plain_c: dict[int, list[float]] = {layer: [] for layer in STEER_LAYERS}
    for p in HAPPY_PROMPTS:
        ids = torch.tensor([chat_ids(tok, p)])
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            hs0 = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            with hooks.steering(build_phase([(spec,)], "prompt", ids.device), mask):
                hs1 = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        for layer in STEER_LAYERS:
            u = torch.from_numpy(vec.directions[layer]).double()
            u = u / u.norm()
            for hs, acc in ((hs0, plain_c), (hs1, after_c)):
                h = hs.hidden_states[layer + 1][0, 1:].double()  # skip the position-0 sink
                acc[layer].append(float(((h @ u).abs() / h.norm(dim=-1)).mean()))
    out += ["", "## (3) Ablation reduces the measured projection", "",
            f"`mode: \"ablate\"`, strength 1, blocks {STEER_LAYERS[0]}–{STEER_LAYERS[-1]}, "
            f"{len(HAPPY_PROMPTS)} prompts asking for a happy answer. Component "
            "`|h·û|/‖h‖` at each block: as the receipt reports it (before the edit, mean "
            "over prompt and generated positions), and on the prompt read back with "
            "`output_hidden_states` (excluding position 0) without and with the ablation.",
            "", "| block | receipt: before | hidden states: unsteered | hidden states: ablated |",
            "|---|---|---|---|"]
    for layer in STEER_LAYERS:
        out.append(f"| {layer} | {comp[layer]:.4f} | {statistics.mean(plain_c[layer]):.4f} | "
                   f"{statistics.mean(after_c[layer]):.2e} |")
    s0 = statistics.mean(sentiment(t) for t, _ in plain_res)
    s1 = statistics.mean(sentiment(t) for t, _ in abl_res)
    out += ["", f"Sentiment of the answers: unsteered {s0:+.2f}, ablated {s1:+.2f}.", "",
            "| prompt | unsteered | ablated |", "|---|---|---|"]
    for p, (t0, _), (t1, _) in zip(HAPPY_PROMPTS, plain_res, abl_res, strict=True):
        out.append(f"| {p[:40]} | {t0[:70]!r} | {t1[:70]!r} |".replace("\n", " "))
    out += ["", "## A receipt", "",
            "The schedule row of (1), prompt \"How was your day?\" (three of its seven blocks "
            "shown):", "", "```json"]
    if receipt_example is not None:
        shown = json.loads(json.dumps(receipt_example))
        for e in shown["entries"]:
            e["per_layer"] = {k: {kk: round(vv, 5) if isinstance(vv, float) else vv
                                  for kk, vv in v.items()}
                              for k, v in list(e["per_layer"].items())[:3]}
        text = json.dumps(shown, indent=1, ensure_ascii=False)
        # one line per list of numbers and per layer's stats
        text = re.sub(r"\[\s*([-0-9.,\s]+?)\s*\]",
                      lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]",
                      text)
        text = re.sub(r"\{\s*(\"delta[^{}]*?)\s*\}",
                      lambda m: "{" + " ".join(m.group(1).split()) + "}", text)
        out.append(text)
    out += ["```", ""]
    text = "\n".join(out)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()


__all__ = ["main"]
