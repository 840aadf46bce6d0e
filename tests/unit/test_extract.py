"""Extraction as an engine job (server/engine/extract.py): the states equal a plain
forward's hidden states, jobs interleave with decoding without changing its tokens, a
cancelled job runs no forward (or stops between chunks), and the queue bound holds."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from server.engine import Engine, EngineConfig, QueueFullError
from server.engine.extract import ExtractionJob, JobCancelled
from server.loading import ModelBundle, load_model
from tests.conftest import collect_events, make_request, run_to_completion

TEXTS = ["hello there", "a much longer prompt, to force left padding in its chunk", "xy",
         "the quick brown fox", "0123456789", "ünïcödé ✓ ok"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    # 4 blocks, so blocks 0-2 are plain hidden states (the last one is pre-norm).
    return load_model("random:tiny:3:4", tmp_path_factory.mktemp("tiny4"), weights="fp32")


def _engine(bundle: ModelBundle, **config: Any) -> Engine:
    engine = Engine(bundle.model, bundle.tokenizer, EngineConfig(**config))
    engine.start()
    return engine


@pytest.fixture
def engine(bundle: ModelBundle) -> Iterator[Engine]:
    engine = _engine(bundle)
    yield engine
    engine.stop()


@contextlib.contextmanager
def on_forward(model: Any, fn: Callable[[bool], None]) -> Iterator[None]:
    """Call ``fn(use_cache)`` before every forward of ``model`` (extraction forwards
    run without a cache, the engine's prefill and decode forwards with one)."""
    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        fn(bool(kwargs.get("use_cache")))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def first_forward_blocker() -> tuple[threading.Event, threading.Event, Callable[[bool], None]]:
    """(started, release, fn) for :func:`on_forward`: the first uncached forward sets
    ``started`` and waits (at most 30 s) for ``release``, so a test can act while the
    engine is known to be inside it."""
    started, release = threading.Event(), threading.Event()

    def block(cached: bool) -> None:
        if not cached and not started.is_set():
            started.set()
            release.wait(30)

    return started, release, block


def ids(bundle: ModelBundle, texts: list[str]) -> list[list[int]]:
    return [list(bundle.tokenizer(t)["input_ids"]) for t in texts]


def oracle(bundle: ModelBundle, prompts: list[list[int]], layer: int) -> torch.Tensor:
    """Block ``layer``'s output at the last token, one unpadded prompt at a time, from
    transformers' own ``output_hidden_states`` (entry ``layer + 1``; no hooks involved)."""
    rows = []
    with torch.no_grad():
        for p in prompts:
            out = bundle.model(torch.tensor([p]), output_hidden_states=True)
            rows.append(out.hidden_states[layer + 1][0, -1].float())
    return torch.stack(rows)


def test_job_states_equal_plain_hidden_states(bundle: ModelBundle, engine: Engine) -> None:
    prompts = ids(bundle, TEXTS)
    job = engine.submit_job(ExtractionJob(prompts, (0, 2), batch_size=4))
    got = job.result.result(timeout=60)
    assert job.chunks_run == 2  # 6 prompts in chunks of at most 4
    for layer in (0, 2):
        assert got[layer].shape == (len(prompts), bundle.model.config.hidden_size)
        torch.testing.assert_close(got[layer], oracle(bundle, prompts, layer),
                                   rtol=1e-4, atol=1e-5)
    assert not engine.runner.hooks.active()


def test_prefill_budget_bounds_a_chunk(bundle: ModelBundle) -> None:
    """A chunk never holds more padded tokens than max_prefill_tokens (one prompt at
    least); the states do not depend on the chunking."""
    prompts = ids(bundle, TEXTS)
    budget = max(len(p) for p in prompts)
    shapes: list[tuple[int, int]] = []

    def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not kwargs.get("use_cache"):
            shapes.append(tuple(kwargs["input_ids"].shape))

    engine = _engine(bundle, max_prefill_tokens=budget)
    handle = bundle.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        job = engine.submit_job(ExtractionJob(prompts, (1,), batch_size=16))
        got = job.result.result(timeout=60)
    finally:
        handle.remove()
        engine.stop()
    assert sum(n for n, _ in shapes) == len(prompts) and len(shapes) == job.chunks_run
    assert all(n * t <= budget for n, t in shapes) and 1 < len(shapes) < len(prompts)
    torch.testing.assert_close(got[1], oracle(bundle, prompts, 1), rtol=1e-4, atol=1e-5)


def test_extraction_interleaves_with_a_running_generation(
    bundle: ModelBundle, engine: Engine
) -> None:
    tok = bundle.tokenizer
    req = make_request(tok, "once upon a time", max_tokens=40, temperature=0, ignore_eos=True)
    solo, _, _ = run_to_completion(engine, req)
    kinds: list[str] = []
    first_token, submitted = threading.Event(), threading.Event()
    events: queue.Queue[Any] = queue.Queue()

    def sink(ev: Any) -> None:  # engine thread: hold the first step until the job is in
        events.put(ev)
        if not first_token.is_set():
            first_token.set()
            submitted.wait(30)

    prompts = ids(bundle, TEXTS) * 2
    with on_forward(bundle.model, lambda cached: kinds.append("gen" if cached else "job")):
        engine.submit(req, sink)
        assert first_token.wait(30)
        job = engine.submit_job(ExtractionJob(prompts, (1,), batch_size=2))
        submitted.set()
        states = job.result.result(timeout=120)
        tokens, fin = collect_events(events)
    assert tokens == solo and fin.finish_reason == "length"
    assert job.chunks_run == len(prompts) // 2 and states[1].shape[0] == len(prompts)
    # One chunk per engine step: a decode forward ran between any two of the job's.
    first, last = kinds.index("job"), len(kinds) - 1 - kinds[::-1].index("job")
    window = kinds[first:last + 1]
    assert window.count("job") == job.chunks_run
    assert all(a != b for a, b in zip(window, window[1:], strict=False))
    torch.testing.assert_close(states[1], oracle(bundle, prompts, 1), rtol=1e-4, atol=1e-5)


def test_a_cancelled_job_runs_no_forward(bundle: ModelBundle, engine: Engine) -> None:
    job = ExtractionJob(ids(bundle, TEXTS), (1,), batch_size=2)
    job.cancel.set()
    forwards: list[bool] = []
    with on_forward(bundle.model, forwards.append):
        engine.submit_job(job)
        with pytest.raises(JobCancelled):
            job.result.result(timeout=30)
    assert forwards == [] and job.chunks_run == 0
    assert len(engine.jobs) == 0


def test_cancelling_stops_a_job_between_chunks(bundle: ModelBundle, engine: Engine) -> None:
    job = ExtractionJob(ids(bundle, TEXTS), (1,), batch_size=2)  # 3 chunks
    with on_forward(bundle.model, lambda cached: job.cancel.set()):
        engine.submit_job(job)
        with pytest.raises(JobCancelled):
            job.result.result(timeout=30)
    assert job.chunks_run == 1


def test_jobs_share_the_request_queue_bound(bundle: ModelBundle) -> None:
    engine = _engine(bundle, max_queue=2)
    started, release, block = first_forward_blocker()

    prompts = ids(bundle, TEXTS[:2])
    try:
        with on_forward(bundle.model, block):
            running = engine.submit_job(ExtractionJob(prompts, (1,)))
            assert started.wait(30)  # the engine is inside the first job's forward
            queued = engine.submit_job(ExtractionJob(prompts, (1,)))
            with pytest.raises(QueueFullError):
                engine.submit_job(ExtractionJob(prompts, (1,)))
            with pytest.raises(QueueFullError):  # requests see the same full queue
                engine.submit(make_request(bundle.tokenizer, "hi", max_tokens=2),
                              lambda ev: None)
            release.set()
            for job in (running, queued):
                assert job.result.result(timeout=60)[1].shape[0] == 2
    finally:
        release.set()
        engine.stop()


def test_stopping_the_engine_fails_waiting_jobs(bundle: ModelBundle) -> None:
    from server.engine import EngineUnavailableError

    engine = _engine(bundle)
    started, release, block = first_forward_blocker()

    prompts = ids(bundle, TEXTS[:2])
    with on_forward(bundle.model, block):
        engine.submit_job(ExtractionJob(prompts, (1,)))
        assert started.wait(30)
        waiting = engine.submit_job(ExtractionJob(prompts, (1,)))
        threading.Timer(0.2, release.set).start()
        engine.stop()
    with pytest.raises(EngineUnavailableError):
        waiting.result.result(timeout=30)
    with pytest.raises(EngineUnavailableError):
        engine.submit_job(ExtractionJob(prompts, (1,)))
