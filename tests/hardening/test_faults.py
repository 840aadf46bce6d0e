"""Faults: kill -9 during artifact writes, corrupt files at start, a full disk.

The store's promise (DESIGN.md, "Persistence and limits"): an artifact is either whole and
loadable or absent, never half-visible; a corrupt file is reported and skipped; a failed
write leaves nothing behind. ``python -m server --model random:tiny`` takes ~4 s to start
on a CPU, so the many kill trials run against a small writer process that stores priors
through the real ``ArtifactRegistry``/``ArtifactStore`` code; a few full-server trials
kill the real server during ``POST /v1/priors`` / ``PUT .../gguf`` and restart it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from processors.ngram import NgramPrior
from server import artifacts
from server.api.app import create_app
from server.artifacts import ArtifactRegistry
from server.loading import ModelBundle
from server.settings import Settings
from tests.conftest import LiveServer
from tests.hardening.conftest import CHEAP, REPO, ServerProcess, assert_envelope, gguf_bytes, tree

HARNESS_TRIALS = 50
# Each full-server trial is a fresh ``python -m server`` start (~4 s, far more on a loaded
# CI core); the harness above does the many trials.
SERVER_TRIALS = int(os.environ.get("STEER_HARDENING_SERVER_TRIALS", "4"))
GEN = {"prompt": "ab", "max_tokens": 2, "temperature": 0}


def corpus(n_chars: int, seed: int, alphabet: int = 48) -> str:
    """Random text over ``alphabet`` byte-tokens: ~alphabet³ trigrams → a prior of ~1 MB."""
    rng = random.Random(seed)
    chars = [chr(ord("!") + i) for i in range(alphabet)]
    return "".join(rng.choices(chars, k=n_chars))


def open_priors(root: Path) -> ArtifactRegistry[NgramPrior]:
    # Grace 0: the killed writer is gone, so even a just-written temp file is an orphan
    # (its name's lock is free); the default grace protects other replicas' writes.
    return ArtifactRegistry.open(root, "prior", NgramPrior.from_artifact, NgramPrior.to_artifact,
                                 tmp_grace_s=0)


def leftovers(root: Path) -> list[str]:
    """Temp files and data files without their committing JSON."""
    out = []
    for p in root.iterdir():
        if p.name.endswith(".tmp"):
            out.append(p.name)
        elif p.suffix == ".safetensors" and not p.with_suffix(".json").exists():
            out.append(p.name)
    return out


# -------------------------------------------------------------- kill -9: the harness
WRITER = r"""
import json, sys
from pathlib import Path
from safetensors.numpy import load_file
from server.artifacts import ArtifactRegistry, ArtifactStore

root, template, prefix = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
arrays = load_file(str(template / "t.safetensors"))
meta = json.loads((template / "t.json").read_text())["meta"]
reg = ArtifactRegistry(ArtifactStore(root, "prior"), lambda n, a, m: (a, m), lambda obj: obj)
print("ready", flush=True)
i = 0
while True:  # create, and now and then delete, until killed
    name = f"{prefix}-{i}"
    with reg.reserve(name):
        reg.add(name, (arrays, meta))
    if i % 3 == 2:
        reg.remove(f"{prefix}-{i - 1}")
    i += 1
"""


@pytest.fixture(scope="module")
def prior_template(cheap_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real prior (~1 MB on disk) built by the server, copied out as t.{safetensors,json}."""
    resp = httpx.post(cheap_server.url + "/v1/priors", json={
        "name": "template", "text": corpus(200_000, seed=1)}, timeout=60)
    assert resp.status_code == 201, resp.text
    src: Path = cheap_server.data_dir / "priors"  # type: ignore[attr-defined]
    out = tmp_path_factory.mktemp("template")
    shutil.copy(src / "template.safetensors", out / "t.safetensors")
    shutil.copy(src / "template.json", out / "t.json")
    assert (out / "t.safetensors").stat().st_size > 500_000
    return out


def test_kill9_during_writes_never_leaves_half_an_artifact(prior_template: Path,
                                                          tmp_path: Path) -> None:
    root = tmp_path / "priors"
    root.mkdir()
    sha = json.loads((prior_template / "t.json").read_text())["sha256"]
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    interrupted = whole = 0
    for trial in range(HARNESS_TRIALS):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(prior_template), f"t{trial}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == b"ready", proc.stderr.read() if proc.stderr else line
            time.sleep(rng.uniform(0.0, 0.3))
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        finally:
            proc.kill()  # SIGKILL
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()
            if proc.stderr:
                proc.stderr.close()
        interrupted += bool(leftovers(root))
        reg = open_priors(root)  # what a restarted server does
        assert reg.corrupt == {}, reg.corrupt  # nothing half-written became visible
        assert leftovers(root) == []  # ... and the scan cleaned up what was not committed
        names = list(reg)
        for name in names:
            assert reg.record(name).sha256 == sha  # whole: the exact bytes written
            assert reg[name].vocab_size == 259
        whole += len(names)
        for name in names:  # keep the disk small: only this trial's artifacts matter
            reg.remove(name)
    assert whole > 0, "the writer never committed an artifact"
    # Most kills land inside a write (the writer does nothing else); if none did the test
    # would prove nothing.
    assert interrupted >= HARNESS_TRIALS // 5, (interrupted, HARNESS_TRIALS)


# ----------------------------------------------------------- kill -9: the real server
def _fire(url: str, kind: str, name: str, body: Any, out: dict[str, Any]) -> None:
    try:
        if kind == "prior":
            r = httpx.post(url + "/v1/priors", json={"name": name, "text": body}, timeout=60)
        else:
            r = httpx.put(f"{url}/v1/control-vectors/{name}/gguf", content=body, timeout=60)
        out["status"] = r.status_code
    except httpx.HTTPError as exc:
        out["error"] = type(exc).__name__


def _check_restarted(srv: ServerProcess, seen: dict[str, set[str]], planted: set[str]) -> None:
    """After a restart: the listings hold only whole artifacts, each usable."""
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        priors = c.get("/v1/priors").json()
        assert {s["name"] for s in priors["skipped"]} == planted, priors["skipped"]
        for card in priors["data"]:
            if card["name"] in seen["prior"]:
                continue
            assert c.get(f"/v1/priors/{card['name']}").status_code == 200
            resp = c.post("/v1/generate", json={**GEN, "steering": [
                {"type": "ngram", "prior": card["name"], "lambda": 0.5}]})
            assert resp.status_code == 200, resp.text
            seen["prior"].add(card["name"])
        vectors = c.get("/v1/control-vectors").json()
        assert vectors["skipped"] == [], vectors["skipped"]
        for card in vectors["data"]:
            if card["name"] in seen["vector"]:
                continue
            assert c.get(f"/v1/control-vectors/{card['name']}/gguf").status_code == 200
            resp = c.post("/v1/generate", json={**GEN, "steering": [
                {"type": "control", "vector": card["name"], "alpha": 1.0}]})
            assert resp.status_code == 200, resp.text
            seen["vector"].add(card["name"])


def test_kill9_real_server_during_create_and_upload(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "priors").mkdir(parents=True)
    # Planted damage: every start must skip and list it, never crash on it.
    (data / "priors" / "planted.json").write_text('{"format": 1, "kind": "prior", "na')
    (data / "priors" / "planted.safetensors").write_bytes(b"\0" * 64)
    planted = {"planted"}
    rng = random.Random(99)
    bodies = {"prior": corpus(150_000, seed=2), "vector": gguf_bytes(layers=(0, 1))}
    seen: dict[str, set[str]] = {"prior": set(), "vector": set()}
    durations: dict[str, float] = {}
    outcomes = []
    for trial in range(SERVER_TRIALS + 1):
        srv = ServerProcess(data, tmp_path / "server.log", STEER_ARTIFACT_TMP_GRACE_S="0")
        try:
            srv.wait_ready()
            _check_restarted(srv, seen, planted)  # the previous trial's kill left no half
            if trial == SERVER_TRIALS:
                break
            if trial == 0:  # unkilled requests: how long does each kind take here?
                for kind, body in bodies.items():
                    t = time.monotonic()
                    out: dict[str, Any] = {}
                    _fire(srv.url, kind, f"calib-{kind}", body, out)
                    assert out.get("status") == 201, out
                    durations[kind] = time.monotonic() - t
            kind = "prior" if trial % 2 == 0 else "vector"
            out = {}
            worker = threading.Thread(target=_fire,
                                      args=(srv.url, kind, f"k{trial}", bodies[kind], out))
            worker.start()
            # Aim at the end of the request, where the artifact is written (a prior's
            # tokenizing and counting come first).
            time.sleep(rng.uniform(0.5, 1.1) * durations[kind])
        finally:
            srv.kill9()
        worker.join(30)
        outcomes.append(out.get("status", out.get("error")))
    assert len(outcomes) == SERVER_TRIALS
    assert seen["prior"] >= {"calib-prior"} and seen["vector"] >= {"calib-vector"}
    assert leftovers(data / "priors") == [] and leftovers(data / "control-vectors") == []


# --------------------------------------------------------------- corrupt on disk
@contextlib.contextmanager
def api(data: Path, bundle: ModelBundle) -> Iterator[TestClient]:
    app = create_app(Settings(model="random:tiny", data_dir=data, **CHEAP), bundle=bundle)
    with TestClient(app) as c:
        yield c


def _flip(path: Path, at: float = 0.5) -> None:
    raw = bytearray(path.read_bytes())
    i = int(len(raw) * at)
    raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_corrupt_files_are_reported_and_skipped_at_start(
    tiny_bundle: ModelBundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with api(tmp_path, tiny_bundle) as c:
        for name in ("good", "flipped", "truncated", "header"):
            assert c.post("/v1/priors", json={"name": name, "text": "abc abd"}).status_code == 201
        for name in ("vgood", "vflipped", "vtruncated"):
            resp = c.put(f"/v1/control-vectors/{name}/gguf", content=gguf_bytes())
            assert resp.status_code == 201, resp.text
    priors, vectors = tmp_path / "priors", tmp_path / "control-vectors"
    _flip(priors / "flipped.safetensors")
    (priors / "truncated.json").write_bytes((priors / "truncated.json").read_bytes()[:40])
    _flip(priors / "header.safetensors", at=0.0)
    _flip(vectors / "vflipped.safetensors", at=0.9)
    (vectors / "vtruncated.json").write_text("")
    caplog.set_level(logging.WARNING, logger="steerserve.artifacts")
    with api(tmp_path, tiny_bundle) as c:
        warned = {r.getMessage() for r in caplog.records if "skipping corrupt" in r.getMessage()}
        for name in ("flipped", "truncated", "header", "vflipped", "vtruncated"):
            assert any(f"'{name}'" in m for m in warned), (name, warned)
        listing = c.get("/v1/priors").json()
        assert [p["name"] for p in listing["data"]] == ["good"]
        skipped = {s["name"]: s["reason"] for s in listing["skipped"]}
        assert set(skipped) == {"flipped", "truncated", "header"}
        assert "checksum" in skipped["flipped"] and "JSON" in skipped["truncated"]
        vlisting = c.get("/v1/control-vectors").json()
        assert [v["name"] for v in vlisting["data"]] == ["vgood"]
        assert {s["name"] for s in vlisting["skipped"]} == {"vflipped", "vtruncated"}
        err = assert_envelope(c.get("/v1/priors/flipped"), 404)
        assert "corrupt" in err["message"]
        assert "corrupt" in assert_envelope(c.get("/v1/control-vectors/vflipped/gguf"),
                                            404)["message"]
        resp = c.post("/v1/generate", json={**GEN, "steering": [
            {"type": "ngram", "prior": "flipped", "lambda": 0.5}]})
        assert_envelope(resp, 404)
        resp = c.post("/v1/generate", json={**GEN, "steering": [
            {"type": "ngram", "prior": "good", "lambda": 0.5},
            {"type": "control", "vector": "vgood", "alpha": 1.0}]})
        assert resp.status_code == 200, resp.text
        # The name stays taken (409) until the corrupt artifact is deleted.
        assert_envelope(c.post("/v1/priors", json={"name": "flipped", "text": "x y"}), 409)
        assert c.delete("/v1/priors/flipped").status_code == 200
        assert not (priors / "flipped.safetensors").exists()
        assert c.post("/v1/priors", json={"name": "flipped", "text": "x y"}).status_code == 201


# ------------------------------------------------------------------------ full disk
class _FillingFile:
    """A file whose ``write`` stores half the bytes, then fails as a full disk does."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def write(self, data: bytes) -> int:
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


@pytest.mark.parametrize("fail_on", [1, 2], ids=["data-file", "json-commit"])
def test_full_disk_is_507_and_leaves_nothing(
    tiny_bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: int
) -> None:
    real_fdopen = os.fdopen
    calls = {"n": 0}

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        f = real_fdopen(fd, *args, **kwargs)
        return _FillingFile(f) if calls["n"] % 2 == (fail_on % 2) else f

    with api(tmp_path, tiny_bundle) as c:
        before = tree(tmp_path)
        monkeypatch.setattr(artifacts.os, "fdopen", fdopen)
        requests = [
            lambda: c.post("/v1/priors", json={"name": "p", "text": "abc abd abe"}),
            lambda: c.put("/v1/control-vectors/g/gguf", content=gguf_bytes()),
            lambda: c.post("/v1/control-vectors", json={
                "name": "v", "pairs": [{"positive": "good day", "negative": "bad day"}]}),
        ]
        for send in requests:
            calls["n"] = 0
            err = assert_envelope(send(), 507)
            assert err["type"] == "insufficient_storage"
            assert tree(tmp_path) == before  # no partial, temp or orphaned file
        monkeypatch.undo()
        # Nothing was registered, the names are free again, and the server still works.
        assert c.get("/v1/priors").json()["data"] == []
        for send in requests:
            assert send().status_code == 201
        assert c.post("/v1/generate", json=GEN).status_code == 200


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    """A 192 KiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mnt = Path(tempfile.mkdtemp(prefix="steer-tinyfs-"))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mnt)],
                         capture_output=True)
    if res.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode(errors='replace')[:200]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def test_real_full_filesystem_is_507(tiny_bundle: ModelBundle, tiny_fs: Path) -> None:
    with api(tiny_fs, tiny_bundle) as c:
        before = tree(tiny_fs)
        # 48³ possible trigrams: the prior is far larger than the filesystem.
        resp = c.post("/v1/priors", json={"name": "big", "text": corpus(150_000, seed=3)})
        err = assert_envelope(resp, 507)
        assert err["type"] == "insufficient_storage"
        assert tree(tiny_fs) == before
        # Small artifacts still fit afterwards: nothing was leaked.
        assert c.post("/v1/priors", json={"name": "small", "text": "abc"}).status_code == 201
        assert c.put("/v1/control-vectors/v/gguf", content=gguf_bytes()).status_code == 201
