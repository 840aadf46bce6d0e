"""Shared helpers for the benchmarks: a server subprocess, timing, medians.

Benchmarks print ratios of A and B measured side by side in one run, A and B
interleaved round by round, and quote medians: the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

EMBEDDED = "embedded:smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parent.parent

# Open questions for the style/fluency measures (calibration.py uses all 22; frontier.py
# tunes on the first 6 and reports on the other 16, never used for tuning).
STYLE_PROMPTS = [
    "Tell me about the sea.", "What should a good king do?", "Describe a morning in the city.",
    "Give advice to a young traveller.", "What is love?", "Why do people tell stories?",
    "Describe your favourite meal.", "What makes a good friend?", "Explain how rain forms.",
    "Write a note to a neighbour.", "What is the best way to learn?", "Describe a storm.",
    "What do you think about cities at night?", "How should we treat strangers?",
    "Tell me about a mountain.", "What is courage?", "Describe a market in summer.",
    "Why is honesty important?", "What happens when we forgive?", "Describe a long journey.",
    "What is the meaning of home?", "How do you comfort someone who is sad?",
]

# Short chat prompts for the throughput benchmarks (mixed.py uses the first 8, fastpath.py
# all 20), all different so no two requests share a prefill.
CHAT_PROMPTS = [
    "Write a short story about a lighthouse keeper.", "Describe a storm at sea.",
    "What should a good king do?", "Explain how rain forms.", "Tell me about the moon.",
    "Give advice to a young traveller.", "Describe a market in summer.", "What is courage?",
    "How do bees make honey?", "Why is the sky blue?", "Explain photosynthesis simply.",
    "What is the capital of France and why is it famous?", "Write a poem about autumn.",
    "How does a bicycle stay upright?", "Describe your ideal weekend.",
    "What are the benefits of reading?", "Explain what a computer program is.",
    "Tell me a fact about elephants.", "How should I prepare for an exam?",
    "What makes a good friend?",
]


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(model: str = EMBEDDED, **env: str) -> Iterator[str]:
    """Run ``python -m server`` on a free port; yield its base URL; stop it after."""
    port = free_port()
    environ = {**os.environ, "STEER_MODEL": model, "STEER_PORT": str(port),
               "STEER_LOG_LEVEL": "warning", **env}
    proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=environ)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("server did not become healthy")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(xs)


def step_times(client: Any, request: dict[str, Any], variants: dict[str, list[dict[str, Any]]],
               rounds: int, rows: int = 8) -> dict[str, float]:
    """Median decode-step time (ms) of a batch of ``rows`` for each steering stack.

    ``client`` is anything with ``post(path, json=...)`` (an ``httpx.Client`` on a server,
    or Starlette's test client on the in-process app); ``request`` is a ``/v1/generate``
    body with ``max_tokens`` ≥ 2 and ``ignore_eos``. Each round runs every variant as one
    ``/v1/sweep`` over ``rows`` seeds (one batch), once with ``max_tokens`` and once with a
    single token, variants interleaved; the difference over ``max_tokens − 1`` is the
    decode step time without prefill or request overhead. Returns the median per variant.
    """
    n = int(request["max_tokens"])
    if n < 2:
        raise ValueError("step_times needs max_tokens >= 2")
    seeds = {"seed": list(range(rows))}

    def wall(stack: list[dict[str, Any]], tokens: int) -> float:
        body = {"request": {**request, "steering": stack, "max_tokens": tokens}, "grid": seeds}
        t0 = time.perf_counter()
        client.post("/v1/sweep", json=body).raise_for_status()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, stack in variants.items():
            full, one = wall(stack, n), wall(stack, 1)
            times[name].append((full - one) / (n - 1) * 1000)
    return {k: median(v) for k, v in times.items()}


def machine() -> str:
    """One line describing where the numbers were measured."""
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {cuda}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")


def report_ratio(name: str, value: float, op: str, target: float) -> None:
    """Print one machine-readable ratio line for ``benchmarks/run_all.py``.

    ``op`` is ``"<="`` or ``">="``: the ratio meets its target when ``value op target``.
    """
    print(f"RATIO|{name}|{value:.4f}|{op}|{target}", flush=True)


def engine_burst(engine: Any, prompts: list[tuple[int, ...]], tokens: int,
                 prefix: str = "b") -> float:
    """In process: submit one greedy request of ``tokens`` tokens (EOS ignored) per
    prompt to a started ``server.engine.Engine`` at once; aggregate completion tokens/s
    from the submit to the last finish. Request ids are ``prefix`` + a running number."""
    from server.engine.types import FinishEvent, GenerationRequest, SamplingParams

    qs: list[queue.Queue] = [queue.Queue() for _ in prompts]
    reqs = [GenerationRequest(f"{prefix}{next(_SERIAL)}", tuple(p), SamplingParams(
        max_tokens=tokens, temperature=0.0, ignore_eos=True)) for p in prompts]
    t0 = time.perf_counter()
    engine.submit_many([(r, q.put) for r, q in zip(reqs, qs, strict=True)])
    done = 0
    for q in qs:
        while not isinstance(ev := q.get(timeout=600), FinishEvent):
            pass
        done += ev.completion_tokens
    return done / (time.perf_counter() - t0)


_SERIAL = itertools.count()


async def burst(url: str, bodies: list[dict], timeout: float = 1800) -> float:
    """Send ``bodies`` to ``/v1/generate`` all at once; aggregate completion tokens/s."""
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*[c.post("/v1/generate", json=b) for b in bodies])
        wall = time.perf_counter() - t0
    for r in rs:
        r.raise_for_status()
    return sum(r.json()["usage"]["completion_tokens"] for r in rs) / wall
