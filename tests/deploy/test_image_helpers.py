"""deploy/healthcheck.py (the image's HEALTHCHECK) and deploy/bake_model.py."""

from __future__ import annotations

import importlib.util
import re
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


# ----------------------------------------------------------- deploy/apt-mirror.sh

APT_MIRROR = DEPLOY / "apt-mirror.sh"


def _apt_mirror(tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None):
    env = {
        "PATH": "/usr/bin:/bin",
        "APT_SOURCES_DIR": str(tmp_path / "sources.list.d"),
        "APT_SOURCES_LIST": str(tmp_path / "sources.list"),
        **(env_extra or {}),
    }
    return subprocess.run(
        ["bash", str(APT_MIRROR), *args], env=env, capture_output=True, text=True,
        timeout=30, check=False,
    )


def test_apt_mirror_reads_deb822_stanza_for_the_suite(tmp_path):
    d = tmp_path / "sources.list.d"
    d.mkdir()
    # The security stanza comes first, a disabled one second: the suite's own stanza wins.
    (d / "a.sources").write_text(
        "Types: deb\n# URIs: http://commented.invalid/debian\n"
        "URIs: http://sec.invalid/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://off.invalid/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb deb-src\nURIs: http://main.invalid/debian\nSuites: bookworm bookworm-updates\n"
    )
    r = _apt_mirror(tmp_path, "bookworm")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "http://main.invalid/debian"
    # Without a suite: the first enabled deb stanza.
    assert _apt_mirror(tmp_path).stdout.strip() == "http://sec.invalid/debian-security"


def test_apt_mirror_falls_back_to_sources_list(tmp_path):
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.invalid/debian bookworm main\n"
        "deb-src http://src.invalid/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://list.invalid/debian bookworm main\n"
    )
    r = _apt_mirror(tmp_path, "bookworm")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "http://list.invalid/debian"


def test_apt_mirror_override_and_missing(tmp_path):
    r = _apt_mirror(tmp_path, "bookworm", env_extra={"DEBIAN_MIRROR": "http://mine.invalid/d"})
    assert r.stdout.strip() == "http://mine.invalid/d"
    r = _apt_mirror(tmp_path, "bookworm")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "DEBIAN_MIRROR" in lines[0]


def test_test_image_script_uses_apt_mirror():
    script = (DEPLOY / "test-image.sh").read_text()
    assert "apt-mirror.sh" in script
    assert "DEBIAN_MIRROR:-" not in script  # no written-in default host


# ------------------------------------------------------- no package host in the repo

_ALLOWED_URL_HOSTS = re.compile(
    # www.w3.org: XML namespace names (the playground's SVG), identifiers, never fetched.
    r"^(127\.0\.0\.1|localhost|0\.0\.0\.0|\[::1\]|www\.w3\.org"
    r"|[a-z0-9.-]+\.(example|invalid|svc)|\.\.\.)$"
)
# Registry/mirror domains written without a scheme (image references, prose).
_HOST_WORDS = re.compile(
    r"\b(deb\.debian|security\.debian|archive\.ubuntu|pypi|files\.pythonhosted|registry\.npmjs"
    r"|download\.pytorch|docker|ghcr|quay|gcr|nvcr|huggingface|mirror\.gcr)\.(org|io|com|co)\b"
)


def _tracked_text_files() -> list[Path]:
    root = DEPLOY.parent
    out = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    me = Path(__file__).resolve()
    files = []
    for name in out.stdout.splitlines():
        p = root / name
        if p.resolve() == me or p.suffix in {".png", ".gguf", ".safetensors"} or not p.is_file():
            continue
        files.append(p)
    return files


def test_repository_names_no_package_host():
    """Issue 21: scripts and docs take registries and mirrors from the machine's own
    configuration; only loopback, reserved example names and in-cluster names appear."""
    bad = []
    for p in _tracked_text_files():
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            continue
        for host in re.findall(r"[a-z][a-z0-9+.-]*://([^/\s:\"'`)>]+)", text):
            if not _ALLOWED_URL_HOSTS.match(host) and not set("${}") & set(host):
                bad.append(f"{p.name}: {host}")
        bad += [f"{p.name}: {m.group(0)}" for m in _HOST_WORDS.finditer(text)]
    assert not bad, bad
