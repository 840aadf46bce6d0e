"""Shared pieces of the hardening suite: a cheap live server over the tiny random model,
the error-envelope assertion, GGUF bytes, and a real ``python -m server`` subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from processors.control import ControlVector
from processors.control_gguf import write_control_gguf
from server.loading import ModelBundle
from tests.conftest import LiveServer, free_port, live_server

REPO = Path(__file__).resolve().parents[2]

# Every generation a fuzzer can ask for stays a handful of tiny-model steps.
CHEAP: dict[str, Any] = dict(
    max_tokens_limit=8,
    default_max_tokens=4,
    max_sweep_points=4,
    max_n=2,
    max_prompts=2,
    max_stop_sequences=4,
    max_steering_entries=4,
    max_body_bytes=1 << 20,
    max_corpus_bytes=1 << 18,
    request_timeout_s=30.0,
)

ENVELOPE_KEYS = {"message", "type", "param", "code"}


def assert_envelope(resp: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """``resp`` is an error in the documented envelope; returns its inner object."""
    if status is not None:
        assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.status_code >= 400, resp.text[:500]
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == ENVELOPE_KEYS, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], (int, str)), err
    return err


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (relative, as strings)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def gguf_bytes(hidden: int = 32, layers: tuple[int, ...] = (1,), seed: int = 0) -> bytes:
    """A valid control-vector GGUF file for the tiny model (hidden size 32, 2 blocks)."""
    rng = np.random.default_rng(seed)
    dirs = {layer: rng.standard_normal(hidden).astype(np.float32) for layer in layers}
    return write_control_gguf(ControlVector("v", dirs, "llama", {}))


@pytest.fixture(scope="module")
def cheap_server(tiny_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[LiveServer]:
    """A live server (uvicorn thread) with generation limits a fuzzer cannot make slow."""
    data = tmp_path_factory.mktemp("hardening-data")
    with live_server(tiny_bundle, data, **CHEAP) as srv:
        srv.data_dir = data  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="module")
def http(cheap_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cheap_server.url, timeout=30) as c:
        yield c


# ------------------------------------------------------------------ subprocess server
class ServerProcess:
    """``python -m server --model random:tiny`` on a free loopback port."""

    def __init__(self, data_dir: Path, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "STEER_DATA_DIR": str(data_dir),
            "STEER_LOG_LEVEL": "info",
            **env,
        }
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--model", "random:tiny", "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode} during start:\n{self.log()}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.03)
        raise AssertionError(f"server did not become ready:\n{self.log()}")

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()
                return
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]
