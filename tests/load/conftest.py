"""Load tests against a real server subprocess (``python -m server --model random:tiny``).

Everything stays on loopback and is bounded in request count and wall time.

The soak test (``test_soak.py``) is marked ``soak`` and is opt-in: a plain ``pytest`` (and
``make test``) deselects it in ``pytest_collection_modifyitems`` below. It runs with
``pytest -m soak`` (any ``-m`` expression that names ``soak``) or with ``STEER_SOAK=1``;
``STEER_SOAK_SECONDS`` sets its duration (default 120, at most 300).

Resource numbers come from ``/proc/PID`` (RSS from ``status``, descriptors from ``fd``),
so these tests need Linux and skip elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, parse_metrics

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------- soak opt-in
def soak_selected(config: pytest.Config) -> bool:
    """True when the run asked for the soak test (``-m`` naming it, or STEER_SOAK=1)."""
    return "soak" in (config.getoption("markexpr") or "") or os.environ.get("STEER_SOAK") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if soak_selected(config):
        return
    soak = [it for it in items if it.get_closest_marker("soak") is not None]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [it for it in items if it.get_closest_marker("soak") is None]


# ------------------------------------------------------------------ the subprocess
def proc_rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_fd_count(pid: int) -> int:
    """Open file descriptors of ``pid`` (entries of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class ServerProcess:
    """``python -m server --model random:tiny`` on a free loopback port.

    ``settings`` are ``STEER_*`` environment variables (names without the prefix).
    """

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = data_dir / "server.log"
        self.env = {
            **os.environ,
            "STEER_DATA_DIR": str(data_dir),
            "STEER_LOG_LEVEL": "warning",
            "HF_HUB_OFFLINE": "1",
            **{f"STEER_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServerProcess:
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--model", "random:tiny", "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log_text()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start:\n" + self.log_text()
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int:
        return proc_rss_bytes(self.pid)

    def fds(self) -> int:
        return proc_fd_count(self.pid)

    def metrics(self) -> dict[str, float]:
        """Every sample of ``GET /metrics`` as ``name{label=value,...}`` → value."""
        r = httpx.get(self.url + "/metrics", timeout=10)
        assert r.status_code == 200, r.text
        return parse_metrics(r.text)

    def wait_idle(self, limit: float = 20.0) -> dict[str, float]:
        """Poll /metrics until the running and waiting gauges are 0; return that scrape."""
        deadline = time.monotonic() + limit
        while True:
            m = self.metrics()
            if m["steerserve_requests_running"] == 0 and m["steerserve_requests_waiting"] == 0:
                return m
            assert time.monotonic() < deadline, (
                f"gauges did not return to 0: running={m['steerserve_requests_running']} "
                f"waiting={m['steerserve_requests_waiting']}"
            )
            time.sleep(0.05)


PRIOR_TEXT = "abc abd abe the cat sat on the mat and the dog ate the hat " * 20
PAIRS = [
    {"positive": f"I love the {w}. It is great", "negative": f"I hate the {w}. It is awful"}
    for w in ("cat", "dog", "sun", "rain", "tea", "car", "song", "town")
]


def add_artifacts(srv: ServerProcess) -> None:
    """The prior ``style`` and the control vector ``mood`` the request mix uses."""
    r = httpx.post(srv.url + "/v1/priors", json={"name": "style", "text": PRIOR_TEXT},
                   timeout=60)
    assert r.status_code == 201, r.text
    r = httpx.post(srv.url + "/v1/control-vectors", json={"name": "mood", "pairs": PAIRS},
                   timeout=60)
    assert r.status_code == 201, r.text
    models = httpx.get(srv.url + "/v1/models", timeout=10).json()["data"]
    assert models[0]["id"] == MODEL_NAME, models


@pytest.fixture(scope="module")
def load_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux) for RSS and descriptor counts")
    with ServerProcess(
        tmp_path_factory.mktemp("load"), max_batch_size=16, max_queue=256,
        request_timeout_s=60,
    ) as srv:
        add_artifacts(srv)
        yield srv


# ------------------------------------------------------------------ the request mix
STACKS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "bias": [{"type": "logit_bias", "bias": {"70": 3.0, "71": -2.0}}],
    "ngram": [{"type": "ngram", "prior": "style", "lambda": 0.6}],
    "ngram_margin": [{"type": "ngram", "prior": "style", "lambda": 0.8, "scale": "zscore"},
                     {"type": "margin", "tau": 0.3, "gamma": 0.5}],
    "control": [{"type": "control", "vector": "mood", "alpha": 4.0}],
    "control_bias": [{"type": "control", "vector": "mood", "alpha": -3.0,
                      "positions": "generated"},
                     {"type": "logit_bias", "bias": {"72": 2.0}}],
}
SAMPLING: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0},
    "t07_s1": {"temperature": 0.7, "seed": 1},
    "topk_s2": {"temperature": 1.0, "top_k": 20, "seed": 2},
    "topp_rep_s3": {"temperature": 0.9, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 3},
    "minp_s4": {"temperature": 1.2, "min_p": 0.05, "seed": 4},
}
PROMPTS = ("the cat", "And the dog", "Once upon a time, ")
MODEL_NAME = "tiny"  # what the server calls random:tiny (checked in add_artifacts)


@dataclass(frozen=True)
class Spec:
    """One distinct request (its output is a function of the spec alone)."""

    prompt: str
    stack: str
    sampling: str
    max_tokens: int

    def body(self, stream: bool, openai: bool = False) -> dict[str, Any]:
        """The request body: native ``/v1/generate``, or OpenAI ``/v1/completions``
        (the same steering and sampling fields, as top-level extras)."""
        body = {"prompt": self.prompt, "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": stream, "steering": STACKS[self.stack], **SAMPLING[self.sampling]}
        if openai:
            body["model"] = MODEL_NAME
        return body


def spec_pool(rng: random.Random, n: int) -> list[Spec]:
    """``n`` distinct specs covering every stack and every sampling setting."""
    pool: set[Spec] = set()
    stacks, samplings = list(STACKS), list(SAMPLING)
    for i in range(max(len(stacks), len(samplings))):  # every stack and sampling at least once
        pool.add(Spec(PROMPTS[i % len(PROMPTS)], stacks[i % len(stacks)],
                      samplings[i % len(samplings)], 8 + 2 * (i % 5)))
    while len(pool) < n:
        pool.add(Spec(rng.choice(PROMPTS), rng.choice(stacks), rng.choice(samplings),
                      rng.choice((8, 16, 24))))
    return sorted(pool, key=lambda s: (s.stack, s.sampling, s.prompt, s.max_tokens))


@dataclass(frozen=True)
class Job:
    """One request of a burst: a spec, streamed or not, and where the client hangs up
    (``cancel_after`` frames; 0 = right after the response headers, maybe still queued)."""

    spec: Spec
    stream: bool
    cancel_after: int | None = None
    openai: bool = False  # POST /v1/completions instead of /v1/generate
    hangup_after_s: float | None = None  # a non-streaming client that gives up waiting

    @property
    def cancelled(self) -> bool:
        return self.cancel_after is not None or self.hangup_after_s is not None


@dataclass
class Outcome:
    job: Job
    token_ids: list[int] = field(default_factory=list)  # not on /v1/completions
    text: str = ""
    finish_reason: str | None = None
    frames: int = 0
    error: str | None = None
    seconds: float = 0.0


def frame_of(line: str) -> Any:
    data = line[len("data: "):]
    return data if data == "[DONE]" else json.loads(data)


async def run_job(client: httpx.AsyncClient, url: str, job: Job, timeout: float) -> Outcome:
    """Send one job; never raises (a failure is recorded in ``Outcome.error``)."""
    out = Outcome(job)
    t0 = time.monotonic()
    try:
        if job.hangup_after_s is not None:
            try:
                await asyncio.wait_for(_send(client, url, job, out), job.hangup_after_s)
                if out.error is None:
                    out.error = f"finished within {job.hangup_after_s} s: nothing to cancel"
            except (TimeoutError, asyncio.TimeoutError):
                pass  # cancelling the request task drops its connection
        else:
            await asyncio.wait_for(_send(client, url, job, out), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        out.error = f"timed out after {timeout:.0f} s"
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        out.seconds = time.monotonic() - t0
    return out


async def _send(client: httpx.AsyncClient, url: str, job: Job, out: Outcome) -> None:
    """One request of ``job``, recorded into ``out`` (for a stream, frame by frame)."""
    path = url + ("/v1/completions" if job.openai else "/v1/generate")
    if not job.stream:
        r = await client.post(path, json=job.spec.body(False, job.openai))
        if r.status_code != 200:
            out.error = f"HTTP {r.status_code}: {r.text[:200]}"
        elif job.openai:
            (choice,) = r.json()["choices"]
            out.text, out.finish_reason = choice["text"], choice["finish_reason"]
        else:
            body = r.json()
            out.token_ids, out.finish_reason = body["token_ids"], body["finish_reason"]
            out.text = body["text"]
    else:
        async with client.stream("POST", path, json=job.spec.body(True, job.openai)) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            if job.cancel_after == 0:
                return  # leaving the block closes the connection
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                frame = frame_of(line)
                if frame == "[DONE]":
                    done = True
                    break
                if "error" in frame:
                    out.error = f"in-band error: {frame['error']}"
                    break
                out.frames += 1
                if job.openai:
                    (frame,) = frame["choices"]
                else:
                    out.token_ids += frame["token_ids"]
                out.text += frame["text"]
                if frame.get("finish_reason"):
                    out.finish_reason = frame["finish_reason"]
                if job.cancel_after is not None and out.frames >= job.cancel_after:
                    return  # hang up mid-stream
            if not done and out.error is None:
                out.error = "stream ended without [DONE]"


async def run_jobs(
    url: str, jobs: list[Job], concurrency: int, timeout: float = 30.0
) -> list[Outcome]:
    """All ``jobs`` with at most ``concurrency`` in flight (one pooled client)."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one(job: Job) -> Outcome:
            async with sem:
                return await run_job(client, url, job, timeout)

        return list(await asyncio.gather(*(one(j) for j in jobs)))


async def expected_outputs(url: str, specs: list[Spec]) -> dict[Spec, Outcome]:
    """Every spec run alone (one at a time, non-streaming): the reference outputs."""
    ref: dict[Spec, Outcome] = {}
    for spec in specs:
        (out,) = await run_jobs(url, [Job(spec, stream=False)], concurrency=1)
        assert out.error is None, (spec, out.error)
        assert out.finish_reason == "length" and len(out.token_ids) == spec.max_tokens
        ref[spec] = out
    return ref


def mismatch(out: Outcome, ref: dict[Spec, Outcome]) -> str | None:
    """Why a completed request's output differs from its spec's solo run (None: equal).
    Native responses compare token ids and text, OpenAI ones the text."""
    want = ref[out.job.spec]
    got_ids = None if out.job.openai else out.token_ids
    want_ids = None if out.job.openai else want.token_ids
    if (got_ids, out.text, out.finish_reason) == (want_ids, want.text, "length"):
        return None
    return (f"{out.job}: got {got_ids} {out.text!r} ({out.finish_reason}), "
            f"alone {want_ids} {want.text!r}")


def check_outcomes(outcomes: list[Outcome], ref: dict[Spec, Outcome]) -> tuple[int, int]:
    """Completed requests equal their solo run; returns (completed, cancelled)."""
    failures = [f"{o.job}: {o.error}" for o in outcomes if o.error is not None]
    assert not failures, f"{len(failures)} request(s) failed:\n" + "\n".join(failures[:10])
    completed = [o for o in outcomes if not o.job.cancelled]
    wrong = [w for w in (mismatch(o, ref) for o in completed) if w is not None]
    assert not wrong, f"{len(wrong)} output(s) differ from the solo run:\n" + "\n".join(wrong[:5])
    cancelled = [o for o in outcomes if o.job.cancelled]
    for o in cancelled:
        assert o.finish_reason is None, o
        if o.job.cancel_after is not None:
            assert o.frames == o.job.cancel_after, o
    return len(completed), len(cancelled)


def check_counters(
    before: dict[str, float], after: dict[str, float], outcomes: list[Outcome], solo_runs: int = 0
) -> float:
    """The /metrics counters agree with what the client did; returns the number of
    cancellations the server counted.

    A stream the client hangs up on was submitted to the engine (its response headers
    came after the submit), so it must count as cancelled and aborted. A non-streaming
    request abandoned early may never reach the engine (the server sees the disconnect
    before it read the body); such a request leaves no trace in the counters at all.
    ``solo_runs`` are requests of the interval that were not in ``outcomes``.
    """

    def delta(name: str) -> float:
        return after[name] - before[name]

    completed = sum(1 for o in outcomes if not o.job.cancelled)
    streams = sum(1 for o in outcomes if o.job.cancel_after is not None)
    hangups = sum(1 for o in outcomes if o.job.hangup_after_s is not None)
    cancelled = delta("steerserve_requests_cancelled_total")
    abort = delta("steerserve_requests_finished_total{finish_reason=abort}")
    length = delta("steerserve_requests_finished_total{finish_reason=length}")
    assert streams <= cancelled <= streams + hangups, (streams, hangups, cancelled)
    assert abort == cancelled  # nothing else aborts
    # Every completed request ran to the end; so may a non-streaming request the client
    # abandons, when the server finished it before the hang-up arrived (seen under load:
    # 6 of ~300 hang-ups in a loaded short soak). Each hang-up is counted at most once:
    # never reached the engine, cancelled, or ran to the end.
    finished_anyway = length - completed - solo_runs
    assert finished_anyway >= 0, (length, completed, solo_runs)
    assert (cancelled - streams) + finished_anyway <= hangups, (
        cancelled, streams, finished_anyway, hangups)
    for reason in ("stop", "timeout", "error"):
        assert delta(f"steerserve_requests_finished_total{{finish_reason={reason}}}") == 0
    # Every request that reached the engine ended exactly once.
    assert delta("steerserve_e2e_request_latency_seconds_count") == length + abort
    return cancelled


def make_jobs(
    rng: random.Random, specs: list[Spec], n: int, cancel_fraction: float
) -> list[Job]:
    """``n`` jobs over ``specs``: about half streamed, one in four through the OpenAI
    endpoint. ``cancel_fraction`` of all jobs are cancelled with room left: mostly streams
    the client hangs up on after 0-3 frames (max_tokens 200), one in six a non-streaming
    request abandoned after 0.3 s (max_tokens 900, far more than the server decodes in
    that time)."""
    jobs: list[Job] = []
    n_cancel = round(n * cancel_fraction)
    for i in range(n):
        spec = rng.choice(specs)
        if i < n_cancel and i % 6 == 5:
            long = Spec(spec.prompt, spec.stack, spec.sampling, 900)
            jobs.append(Job(long, stream=False, hangup_after_s=0.3))
        elif i < n_cancel:
            long = Spec(spec.prompt, spec.stack, spec.sampling, 200)
            jobs.append(Job(long, stream=True, cancel_after=rng.choice((0, 1, 2, 3)),
                            openai=rng.random() < 0.25))
        else:
            jobs.append(Job(spec, stream=rng.random() < 0.5, openai=rng.random() < 0.25))
    rng.shuffle(jobs)
    return jobs


class HealthPoller:
    """Polls ``/health`` every ``interval`` seconds on its own client while active."""

    def __init__(self, url: str, interval: float = 0.1) -> None:
        self.url, self.interval = url, interval
        self.codes: list[int | str] = []
        self.slowest = 0.0
        self.max_running = self.max_waiting = 0
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                t0 = time.monotonic()
                try:
                    r = await client.get(self.url + "/health")
                    self.codes.append(r.status_code)
                    body = r.json()
                    self.max_running = max(self.max_running, body.get("running", 0))
                    self.max_waiting = max(self.max_waiting, body.get("waiting", 0))
                except httpx.HTTPError as exc:
                    self.codes.append(type(exc).__name__)
                self.slowest = max(self.slowest, time.monotonic() - t0)
                await asyncio.sleep(self.interval)

    async def __aenter__(self) -> HealthPoller:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
