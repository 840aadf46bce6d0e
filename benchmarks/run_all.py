"""The performance dashboard: run every benchmark side by side, write docs/benchmarks.md.

Each benchmark script prints ``RATIO|name|value|op|target`` lines (see
``benchmarks.common.report_ratio``); this collects them into one table — ratio, target,
met or not — with the machine description and each script's full output.

    python benchmarks/run_all.py [--quick] [--out docs/benchmarks.md] [--only engine,ngram]

``--quick`` passes smaller round/token counts (for a smoke run, not for quoting).

Generated and hand-written parts are kept apart: everything this script writes is
regenerated on every run, except the text between :data:`HAND_BEGIN` and
:data:`HAND_END` in the existing file (the analysis a person wrote about earlier runs),
which is carried over verbatim into the new file (:func:`compose`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402

# name -> (script, full args, quick args)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "engine": ("engine.py", ["--rounds", "3", "--tokens", "64"],
               ["--rounds", "1", "--tokens", "16"]),
    "mixed": ("mixed.py", ["--rounds", "5", "--tokens", "32"], ["--rounds", "1", "--tokens", "8"]),
    "ngram": ("ngram.py", ["--rounds", "3", "--tokens", "48", "--out", "docs/ngram-sweep.md"],
              ["--rounds", "1", "--tokens", "8"]),
    "calibration": ("calibration.py", ["--overhead", "--rounds", "5", "--tokens", "32"],
                    ["--overhead", "--rounds", "1", "--tokens", "8"]),
    "control": ("control.py", ["--rounds", "5", "--tokens", "32"],
                ["--rounds", "1", "--tokens", "8", "--sweep-tokens", "8"]),
    "fusion": ("fusion.py", ["--rounds", "3"], ["--rounds", "1", "--tokens", "4"]),
    "frontier": ("frontier.py", ["--prompts", "12", "--tokens", "24", "--out",
                                 "docs/frontier-sweep.md", "--plot", "docs/frontier.png"],
                 ["--quick", "--prompts", "2", "--tokens", "8"]),
    "frontier_overhead": ("frontier.py", ["--overhead", "--rounds", "5", "--tokens", "32"],
                          ["--overhead", "--rounds", "1", "--tokens", "8"]),
    "sweep": ("sweep.py", ["--rounds", "3", "--tokens", "32"], ["--rounds", "1", "--tokens", "8"]),
    # The fast path (weights auto/bf16/int4) against fp32, and the llama.cpp peer (opt-in:
    # it prints a note and no ratio when llama-cpp-python is not installed).
    "fastpath": ("fastpath.py", ["--prompts", "20", "--tokens", "64", "--rounds", "3"],
                 ["--quick"]),
    "llamacpp": ("llamacpp.py", ["--rounds", "3", "--tokens", "64"], ["--quick"]),
    # One OpenMP pool (server.threads) vs the pool of the loading thread kept.
    "threads": ("threads_ab.py", ["--rounds", "2", "--tokens", "32"],
                ["--rounds", "1", "--tokens", "8"]),
}


HAND_BEGIN = "<!-- hand-written analysis: run_all.py keeps this section as it is -->"
HAND_END = "<!-- end of hand-written analysis -->"


def hand_written(previous: str) -> str:
    """The hand-written section of a previous dashboard (markers included), or ''."""
    start, end = previous.find(HAND_BEGIN), previous.find(HAND_END)
    if start < 0 or end < start:
        return ""
    return previous[start : end + len(HAND_END)]


def compose(generated_head: str, generated_tail: str, previous: str) -> str:
    """The new dashboard: generated head, the previous hand-written section, generated tail."""
    parts = [generated_head.rstrip("\n")]
    kept = hand_written(previous)
    if kept:
        parts.append(kept)
    parts.append(generated_tail.strip("\n"))
    return "\n\n".join(parts) + "\n"


def run(name: str, quick: bool) -> tuple[list[tuple[str, float, str, float]], str, float, int]:
    script, full, small = BENCHMARKS[name]
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *(small if quick else full)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - t0
    ratios = []
    lines = []
    for line in proc.stdout.splitlines():
        if line.startswith("RATIO|"):
            _, rname, value, op, target = line.split("|")
            ratios.append((rname, float(value), op, float(target)))
        else:
            lines.append(line)
    output = "\n".join(lines)
    if proc.returncode != 0:
        output += "\n" + proc.stderr[-3000:]
    return ratios, output, wall, proc.returncode


def gpu_note() -> str:
    """What the dashboard can say about CUDA on this machine."""
    import torch

    if torch.cuda.is_available():
        return (f"Measured on {torch.cuda.get_device_name(0)}: the numbers above are GPU "
                "numbers (the server picks CUDA when present).")
    return ("No CUDA device was available where this dashboard ran, so nothing here was "
            "measured on a GPU; the project's tests and benchmarks do not need one. On a CUDA "
            "machine `python benchmarks/run_all.py` measures the same ratios there (the "
            "server uses CUDA and bfloat16 by default when present), and the test fixtures load "
            "their models with device `auto`, so `make test` would run the mixed-batch "
            "correctness tests there — that has not been tried yet. The fast-path work "
            "(issue 13) had no device machine lent to its session, so its GPU item was "
            "not run either.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    rows: list[str] = []
    details: list[str] = []
    for name in names:
        print(f"== {name} ...", flush=True)
        ratios, output, wall, rc = run(name, args.quick)
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        print(f"   {status} in {wall:.0f} s: " + "; ".join(f"{r[0]} = {r[1]:.3f}" for r in ratios),
              flush=True)
        for rname, value, op, target in ratios:
            met = value <= target if op == "<=" else value >= target
            rows.append(f"| {name} | {rname} | {value:.3f}× | {op} {target}× | "
                        f"{'met' if met else '**missed**'} |")
        if rc != 0:
            rows.append(f"| {name} | (benchmark failed, exit {rc}) | — | — | **failed** |")
        details.append(f"### {name} (`benchmarks/{BENCHMARKS[name][0]}`, {wall:.0f} s)\n\n"
                       f"```\n{output.strip()}\n```\n")
    head = "\n".join([
        "# Performance dashboard",
        "",
        f"Generated by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine()}.",
        "Every ratio is measured side by side in one run (variants interleaved round by round,",
        "medians); the machine is shared and noisy, so ratios near a target can move by a few %.",
        "",
        "| benchmark | ratio | value | target | |",
        "|---|---|---|---|---|",
        *rows,
    ])
    tail = "\n".join([
        "## GPU",
        "",
        gpu_note(),
        "",
        "## Outputs",
        "",
        *details,
    ])
    out = Path(args.out)
    previous = out.read_text() if out.exists() else ""
    out.write_text(compose(head, tail, previous))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
