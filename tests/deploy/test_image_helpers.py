"""deploy/healthcheck.py (the image's HEALTHCHECK) and deploy/bake_model.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DEPLOY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        _Health.status = 200


def _run_healthcheck(port: int) -> subprocess.CompletedProcess:
    env = {"STEER_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_healthcheck_ok(health_server: HTTPServer):
    assert _run_healthcheck(health_server.server_address[1]).returncode == 0


def test_healthcheck_loading_is_unhealthy(health_server: HTTPServer):
    _Health.status = 503
    proc = _run_healthcheck(health_server.server_address[1])
    assert proc.returncode == 1
    assert "503" in proc.stderr


def test_healthcheck_nothing_listening():
    server = HTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    server.server_close()
    assert _run_healthcheck(port).returncode == 1


def test_healthcheck_url_override(monkeypatch):
    hc = _load("healthcheck")
    monkeypatch.setenv("STEER_PORT", "9123")
    monkeypatch.delenv("STEER_HEALTH_URL", raising=False)
    assert hc.health_url() == "http://127.0.0.1:9123/health"
    monkeypatch.setenv("STEER_HEALTH_URL", "http://127.0.0.1:1/health")
    assert hc.health_url() == "http://127.0.0.1:1/health"


def test_bake_moves_the_cache_and_makes_it_readable(tmp_path: Path, monkeypatch):
    bake = _load("bake_model")
    import server.loading

    def fake_resolve(source: str, data_dir: Path) -> Path:
        cache = data_dir / "models" / "m-0123"
        cache.mkdir(parents=True)
        (cache / "config.json").write_text("{}")
        data_dir.chmod(0o700)
        return cache

    monkeypatch.setattr(server.loading, "resolve_source", fake_resolve)
    target = tmp_path / "models" / "baked"
    bake.bake("embedded:x", target)
    assert (target / "config.json").read_text() == "{}"
    assert target.stat().st_mode & 0o777 == 0o755
    assert (target / "config.json").stat().st_mode & 0o777 == 0o644
    with pytest.raises(SystemExit, match="already exists"):
        bake.bake("embedded:x", target)


def test_bake_refuses_random_models(tmp_path: Path):
    bake = _load("bake_model")
    with pytest.raises(SystemExit, match="no weights"):
        bake.bake("random:tiny", tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_bake_usage():
    assert _load("bake_model").main([]) == 2
