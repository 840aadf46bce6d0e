"""Shared fixtures: the tiny random model, engines, and a real uvicorn server."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite's exactness tests (mixed batch == solo, engine == generate, sweep == solo)
# compare bit-for-bit, which only the fp32 path guarantees; the server's default 'auto'
# would pick bf16/int4 here. Pinned for every in-process and subprocess server (they
# inherit the environment); the fast paths have their own tolerance-based tests
# (tests/unit/test_quant.py, tests/e2e/test_fastpath_real.py) that pass weights explicitly.
os.environ.setdefault("STEER_WEIGHTS", "fp32")

import httpx
import pytest
import torch
import uvicorn

import processors  # noqa: F401  (registers processors)
from server.api.app import create_app
from server.engine import (
    Engine,
    EngineConfig,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from server.loading import ModelBundle, load_model
from server.settings import Settings

EMBEDDED = "embedded:smollm2-135m-instruct"

# Every device present: the CPU always, CUDA when available (issue 20: the processor and
# engine unit tests run on each).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device present (see ``DEVICES``)."""
    return torch.device(request.param)


def real_data_dir() -> Path:
    """Where the converted embedded model is cached (shared across test runs)."""
    return Settings().data_dir


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return load_model("random:tiny", tmp_path_factory.mktemp("tiny"), weights="fp32")


@pytest.fixture(scope="session")
def real_bundle() -> ModelBundle:
    return load_model(EMBEDDED, real_data_dir(), weights="fp32")


_ON_DEVICE: dict[str, Any] = {}


def model_on(model: Any, device: torch.device) -> Any:
    """``model`` itself on the CPU, else a copy moved to ``device`` (made once)."""
    if device.type == "cpu":
        return model
    key = f"{id(model)}:{device}"
    if key not in _ON_DEVICE:
        import copy

        _ON_DEVICE[key] = copy.deepcopy(model).to(device)
    return _ON_DEVICE[key]


@pytest.fixture
def tiny_engine(tiny_bundle: ModelBundle, device: torch.device) -> Iterator[Engine]:
    """An engine over the tiny model on each device present (float32)."""
    model = model_on(tiny_bundle.model, device)
    engine = Engine(model, tiny_bundle.tokenizer, EngineConfig(max_batch_size=16))
    engine.start()
    yield engine
    engine.stop()


def make_request(
    tokenizer: Any, prompt: str, rid: str = "r", steering: tuple = (), diagnostics: str = "off",
    **sampling: Any,
) -> GenerationRequest:
    ids = tuple(tokenizer(prompt)["input_ids"])
    return GenerationRequest(rid, ids, SamplingParams(**sampling), steering, diagnostics)  # type: ignore[arg-type]


def collect_events(q: queue.Queue[Any]) -> tuple[list[int], FinishEvent]:
    """Read one request's events from its queue: the token ids and the final event."""
    tokens: list[int] = []
    while True:
        ev = q.get(timeout=60)
        if isinstance(ev, TokenEvent):
            tokens.extend(ev.token_ids)
        elif isinstance(ev, FinishEvent):
            return tokens, ev
        else:
            raise AssertionError(f"engine error: {ev}")


def run_to_completion(
    engine: Engine, request: GenerationRequest, timeout: float = 600.0
) -> tuple[list[int], str, FinishEvent]:
    """Submit ``request`` and block until it finishes: the generated token ids, the full
    text and the final event; raises RuntimeError on an ErrorEvent."""
    q: queue.Queue[Any] = queue.Queue()
    engine.submit(request, q.put)
    tokens: list[int] = []
    text: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        ev = q.get(timeout=max(0.0, deadline - time.monotonic()))
        if isinstance(ev, TokenEvent):
            tokens.extend(ev.token_ids)
            text.append(ev.text)
        elif isinstance(ev, FinishEvent):
            text.append(ev.text)
            return tokens, "".join(text), ev
        else:
            raise RuntimeError(ev.message)


class EngineProbe:
    """What a test observes of an engine from outside, by wrapping two of its calls on
    the instance: ``peak_batch`` (most rows sampled in one step) and ``prefill_rows``
    (prompts actually prefilled; a shared prefix counts once). Use :func:`probe`."""

    def __init__(self, engine: Engine) -> None:
        self.peak_batch = 0
        self.prefill_rows = 0
        sample, prefill = engine.sampler.sample, engine.runner.prefill

        def sample_spy(logits: Any, *a: Any, **k: Any) -> Any:
            self.peak_batch = max(self.peak_batch, int(logits.shape[0]))
            return sample(logits, *a, **k)

        def prefill_spy(prompts: Any, *a: Any, **k: Any) -> Any:
            self.prefill_rows += len(prompts)
            return prefill(prompts, *a, **k)

        engine.sampler.sample = sample_spy  # type: ignore[method-assign]
        engine.runner.prefill = prefill_spy  # type: ignore[method-assign]


def probe(engine: Engine) -> EngineProbe:
    """The engine's probe, installed on first use (so wrappers never stack)."""
    found = engine.__dict__.get("_test_probe")
    if not isinstance(found, EngineProbe):
        found = EngineProbe(engine)
        engine.__dict__["_test_probe"] = found
    return found


def run_together(
    engine: Engine, reqs: list[GenerationRequest]
) -> list[tuple[list[int], FinishEvent]]:
    """Submit atomically so that the requests are admitted and decoded as one batch
    (checked: the engine's peak batch is exactly their number)."""
    seen = probe(engine)
    seen.peak_batch = 0
    queues: list[queue.Queue[Any]] = [queue.Queue() for _ in reqs]
    engine.submit_many([(r, q.put) for r, q in zip(reqs, queues, strict=True)])
    out = [collect_events(q) for q in queues]
    assert seen.peak_batch == len(reqs)
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus exposition as ``name{label=value,...}`` → value."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.app = app
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become healthy")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def engine(self) -> Engine:
        return self.app.state.steer.engine


@contextmanager
def live_server(bundle: ModelBundle, tmp_path: Path, **settings: Any) -> Iterator[LiveServer]:
    s = Settings(model=bundle.source, data_dir=tmp_path, **settings)
    with LiveServer(create_app(s, bundle=bundle)) as srv:
        yield srv
