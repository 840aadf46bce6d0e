"""Graceful shutdown: SIGTERM drains (503 / refused for new requests), in-flight requests
finish within the grace period, then the rest are aborted cleanly; exit status 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port, live_server

ROOT = Path(__file__).resolve().parents[2]
LONG = {"model": "tiny", "prompt": "drain", "max_tokens": 120, "temperature": 0,
        "ignore_eos": True, "stream": True}


def frames(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def refused_or_503(url: str) -> None:
    try:
        r = httpx.post(url + "/v1/completions", timeout=10,
                       json={"model": "tiny", "prompt": "late", "max_tokens": 2})
    except httpx.TransportError:
        return  # the listener is closed: connection refused
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "service_unavailable"


def test_sigterm_lets_the_in_flight_request_finish_and_exits_0(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "STEER_DATA_DIR": str(tmp_path), "STEER_SHUTDOWN_GRACE_S": "30",
           "STEER_LOG_LEVEL": "warning"}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--model", "random:tiny", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        with httpx.stream("POST", url + "/v1/completions", json=LONG, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            refused_or_503(url)
            rest = frames([first, *lines])
        assert rest[-1] == "[DONE]"
        assert rest[-2]["choices"][0]["finish_reason"] == "length"
        text = "".join(f["choices"][0]["text"] for f in rest[:-1])
        assert len(text) > 0
        assert proc.wait(60) == 0, (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


def test_grace_period_over_aborts_cleanly(tiny_bundle, tmp_path):
    with live_server(tiny_bundle, tmp_path) as srv:
        body = {**LONG, "max_tokens": 1000}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            srv.app.state.steer.begin_drain(0.3)
            h = httpx.get(srv.url + "/health", timeout=10)
            assert h.status_code == 503 and h.json()["status"] == "draining"
            refused_or_503(srv.url)
            got = frames([first, *lines])
        assert got[-1] == "[DONE]"
        assert got[-2]["choices"][0]["finish_reason"] == "abort"
        assert srv.engine.running == 0 and srv.engine.waiting == 0
