"""server.threads: the calling thread's OpenMP workers are given back.

Observed from outside libgomp, by the process's thread count (``/proc/self/task``): a
thread's first parallel torch op makes ``torch.get_num_threads() - 1`` workers, and after
``release_thread_pool`` (or ``Engine.start``, or ``load_model``, which call it) they are
gone.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from server.engine import Engine, EngineConfig
from server.loading import load_model
from server.threads import release_thread_pool

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir() or torch.get_num_threads() < 2,
    reason="needs Linux and 2+ torch threads (one thread makes no OpenMP pool)",
)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _settled(target: int, timeout: float = 5.0) -> int:
    """The thread count once it reaches ``target`` (workers exit asynchronously)."""
    deadline = time.monotonic() + timeout
    while (n := _threads()) != target and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


def _on_a_thread(body: Callable[[dict[str, Any]], None], added: int = 0) -> dict[str, Any]:
    """Run ``body(out)`` on a new thread, after a parallel op there made its pool; then
    wait for the thread count to settle at the count before the op plus ``added``
    (threads ``body`` starts on purpose)."""
    out: dict[str, Any] = {}

    def run() -> None:
        base = _threads()  # the other threads + this one
        (torch.randn(8, 1 << 16) * 2).amax(-1)  # big enough to go parallel
        out["base"], out["pooled"] = base, _threads()
        body(out)
        out["after"] = _settled(base + added)

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    return out


def test_release_frees_the_calling_threads_workers() -> None:
    out = _on_a_thread(lambda o: o.update(released=release_thread_pool()))
    assert out["pooled"] >= out["base"] + 1  # the op made workers
    assert out["released"] is True
    assert out["after"] == out["base"]  # and they are gone


def test_engine_start_releases_the_starting_threads_pool(tiny_bundle: Any) -> None:
    engines: list[Engine] = []

    def start(o: dict[str, Any]) -> None:
        engine = Engine(tiny_bundle.model, tiny_bundle.tokenizer, EngineConfig())
        engines.append(engine)
        engine.start()

    out = _on_a_thread(start, added=1)  # the engine thread (idle: no pool of its own yet)
    try:
        assert out["pooled"] >= out["base"] + 1
        # The starting thread's workers are gone; only the new engine thread was added.
        assert out["after"] == out["base"] + 1, out
    finally:
        for e in engines:
            e.stop()


def test_load_model_gives_its_pool_back(tmp_path: Path) -> None:
    out = _on_a_thread(lambda o: o.update(bundle=load_model("random:tiny", tmp_path)))
    assert out["bundle"].model is not None
    assert out["after"] == out["base"]
