"""Two replicas on one data directory (issue 14): real ``python -m server`` processes on
loopback ports, building the same names at the same moment. Exactly one build of each
name is stored (the other gets 409), and a fresh third server loads every artifact
intact: 0 corrupt, 0 stored twice, each with the winner's content."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from tests.hardening.conftest import ServerProcess, gguf_bytes

NAMES = 12  # per kind


def _race(urls: list[str], kind: str, name: str, bodies: list[Any]) -> list[httpx.Response]:
    """POST (prior) or PUT (GGUF) ``name`` on every server at once."""
    out: list[httpx.Response | None] = [None] * len(urls)
    go = threading.Barrier(len(urls))

    def fire(i: int) -> None:
        go.wait()
        with httpx.Client(timeout=60) as c:
            if kind == "prior":
                out[i] = c.post(urls[i] + "/v1/priors", json={"name": name, "text": bodies[i]})
            else:
                out[i] = c.put(urls[i] + f"/v1/control-vectors/{name}/gguf", content=bodies[i])

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(len(urls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(r is not None for r in out)
    return [r for r in out if r is not None]


def test_two_replicas_never_corrupt_or_double_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    servers = [ServerProcess(data, tmp_path / f"s{i}.log") for i in range(2)]
    winners: dict[tuple[str, str], tuple[int, str]] = {}  # (kind, name) -> (server, sha)
    try:
        for s in servers:
            s.wait_ready()
        urls = [s.url for s in servers]
        for j in range(NAMES):
            # Different content per replica, so the stored file tells whose build won.
            for kind, bodies in (
                ("prior", [f"replica {i} text {j} " * (200 + 50 * i) for i in range(2)]),
                ("vector", [gguf_bytes(layers=(1,), seed=100 * j + i) for i in range(2)]),
            ):
                name = f"{kind}-{j}"
                resps = _race(urls, kind, name, bodies)
                codes = sorted(r.status_code for r in resps)
                assert codes == [201, 409], (name, [(r.status_code, r.text[:200])
                                                    for r in resps])
                win = next(i for i, r in enumerate(resps) if r.status_code == 201)
                loser = resps[1 - win].json()["error"]
                assert loser["param"] == "name", loser
                winners[(kind, name)] = (win, resps[win].json()["sha256"])
    finally:
        for s in servers:
            s.stop()
    assert {w for w, _ in winners.values()} <= {0, 1}

    third = ServerProcess(data, tmp_path / "s3.log")
    try:
        third.wait_ready()
        with httpx.Client(base_url=third.url, timeout=30) as c:
            priors = c.get("/v1/priors").json()
            vectors = c.get("/v1/control-vectors").json()
            assert priors["skipped"] == [] and vectors["skipped"] == []  # 0 corrupt
            stored = {("prior", d["name"]): d["sha256"] for d in priors["data"]}
            stored |= {("vector", d["name"]): d["sha256"] for d in vectors["data"]}
            assert set(stored) == set(winners)  # every name once, none lost
            for key, (_, sha) in winners.items():
                assert stored[key] == sha, key  # the winner's bytes, not a mix
            # Each loads and is usable.
            for j in range(0, NAMES, 4):
                resp = c.post("/v1/generate", json={"prompt": "hi", "max_tokens": 2,
                                                    "steering": [{"type": "control",
                                                                  "vector": f"vector-{j}",
                                                                  "alpha": 1.0}]})
                assert resp.status_code == 200, resp.text
    finally:
        third.stop()
    leftovers = [p.name for sub in ("priors", "control-vectors")
                 for p in (data / sub).iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # no temp or lock file outlives its writer
