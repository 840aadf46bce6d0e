"""The generic artifact store: atomic writes, checksums, corrupt files, names."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from server import artifacts
from server.artifacts import (
    ArtifactExistsError,
    ArtifactNotFoundError,
    ArtifactRegistry,
    ArtifactStore,
    CorruptArtifactError,
    InvalidNameError,
    check_name,
)

ARRAYS = {"a": np.arange(10, dtype=np.int64), "b": np.linspace(0, 1, 7)}


def decode(name: str, arrays: dict[str, np.ndarray], meta: dict) -> dict:
    if "a" not in arrays:
        raise ValueError("missing array 'a'")
    return {"name": name, "arrays": arrays, "meta": meta}


def encode(obj: dict) -> tuple[dict[str, np.ndarray], dict]:
    return obj["arrays"], obj["meta"]


def registry(root: Path) -> ArtifactRegistry[dict]:
    return ArtifactRegistry.open(root, "thing", decode, encode)


@pytest.mark.parametrize("name", ["a", "kjv", "A-1.b_c", "9" * 64, "x.json"])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", ".hidden", "_x", "a/b", "a b", "é", "9" * 65, "a\n"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid name"):
        check_name(name)


def test_round_trip_files_and_checksum(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, "thing")
    saved = store.save("x", ARRAYS, {"k": [1, 2]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.safetensors"]
    record = json.loads((tmp_path / "x.json").read_text())
    payload = (tmp_path / "x.safetensors").read_bytes()
    assert record["sha256"] == saved.sha256 and record["bytes"] == len(payload)
    assert record["kind"] == "thing" and record["meta"] == {"k": [1, 2]}
    # safetensors layout: u64 header length, then a JSON header — no pickle anywhere.
    (n,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + n])
    assert header["a"]["dtype"] == "I64" and header["b"]["dtype"] == "F64"
    back = store.load("x")
    assert back.meta == {"k": [1, 2]}
    for k, v in ARRAYS.items():
        np.testing.assert_array_equal(back.arrays[k], v)
        assert back.arrays[k].dtype == v.dtype


def test_duplicate_and_missing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, "thing")
    store.save("x", ARRAYS, {})
    with pytest.raises(ArtifactExistsError):
        store.save("x", ARRAYS, {})
    with pytest.raises(ArtifactNotFoundError):
        store.load("y")
    with pytest.raises(ArtifactNotFoundError):
        store.delete("y")
    store.delete("x")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(tmp_path, "thing")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.save("x", ARRAYS, {})
    assert list(tmp_path.iterdir()) == []


def test_crash_between_data_and_commit_is_invisible(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, "thing")
    store.save("x", ARRAYS, {})
    (tmp_path / "x.json").unlink()  # as if the process died before the JSON rename
    old, fresh = tmp_path / ".y.json.123.tmp", tmp_path / ".z.json.456.tmp"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"another replica is writing this")
    hour_ago = time.time() - 3601
    os.utime(old, (hour_ago, hour_ago))
    reg = registry(tmp_path)
    assert len(reg) == 0 and reg.corrupt == {}
    assert not old.exists()  # leftovers past the grace period are cleaned up
    assert fresh.exists()  # younger ones may be another process's write in progress
    assert not (tmp_path / "x.safetensors").exists()  # no lock held: an orphan, removed


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / "bad.safetensors").write_bytes(b"\0" * 40), "checksum mismatch"),
        (lambda d: (d / "bad.safetensors").unlink(), "missing"),
        (lambda d: (d / "bad.json").write_text("{not json"), "not valid JSON"),
        (
            lambda d: (d / "bad.json").write_text(
                (d / "bad.json").read_text().replace('"thing"', '"other"')
            ),
            "another artifact",
        ),
    ],
)
def test_corrupt_artifact_is_reported_and_skipped(tmp_path: Path, damage, reason: str) -> None:
    reg = registry(tmp_path)
    reg.add("good", {"arrays": ARRAYS, "meta": {"v": 1}})
    reg.add("bad", {"arrays": ARRAYS, "meta": {"v": 2}})
    damage(tmp_path)
    reg2 = registry(tmp_path)
    assert list(reg2) == ["good"]
    assert reason in reg2.corrupt["bad"]
    np.testing.assert_array_equal(reg2["good"]["arrays"]["a"], ARRAYS["a"])
    with pytest.raises(CorruptArtifactError):
        reg2.store.load("bad")
    # The name stays taken until the corrupt artifact is deleted.
    with pytest.raises(ArtifactExistsError, match="corrupt"):
        with reg2.reserve("bad"):
            pass
    reg2.remove("bad")
    assert "bad" not in reg2.corrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.json", "good.safetensors"]


def test_decoder_rejection_counts_as_corrupt(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    reg.add("x", {"arrays": {"b": ARRAYS["b"]}, "meta": {}})
    reg2 = registry(tmp_path)
    assert len(reg2) == 0 and "missing array 'a'" in reg2.corrupt["x"]


def test_a_flipped_byte_is_caught(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, "thing")
    store.save("x", ARRAYS, {})
    path = tmp_path / "x.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the float payload: still parses, checksum must catch it
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="checksum"):
        store.load("x")


def test_reserve_blocks_concurrent_builds(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    with reg.reserve("x"):
        with pytest.raises(ArtifactExistsError):
            with reg.reserve("x"):
                pass
    with reg.reserve("x"):  # released after the first build ended
        reg.add("x", {"arrays": ARRAYS, "meta": {}})
    with pytest.raises(ArtifactExistsError):
        with reg.reserve("x"):
            pass


def test_registry_is_a_mapping_and_removes(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    reg.add("b", {"arrays": ARRAYS, "meta": {}})
    reg.add("a", {"arrays": ARRAYS, "meta": {}})
    assert list(reg) == ["a", "b"] and len(reg) == 2 and reg.get("zz") is None
    assert reg.record("a").bytes == os.path.getsize(tmp_path / "a.safetensors")
    reg.remove("a")
    assert list(reg) == ["b"] and list(registry(tmp_path)) == ["b"]
    with pytest.raises(ArtifactNotFoundError):
        reg.remove("a")


def test_registry_sees_artifacts_written_by_another_process(tmp_path):
    """Two registries over one directory (two replicas on a shared volume)."""
    import numpy as np

    from server.artifacts import ArtifactRegistry

    def decode(name, arrays, meta):
        return float(arrays["x"][0])

    def encode(obj):
        return {"x": np.array([obj], dtype=np.float32)}, {}

    a = ArtifactRegistry.open(tmp_path, "thing", decode, encode)
    b = ArtifactRegistry.open(tmp_path, "thing", decode, encode)
    with a.reserve("one"):
        a.add("one", 1.5)
    assert "one" in b and b["one"] == 1.5 and b.get("missing") is None
    with b.reserve("two"):
        b.add("two", 2.5)
    a.refresh()
    assert sorted(a) == ["one", "two"]
    b.remove("one")
    a.refresh()
    assert sorted(a) == ["two"]
    # A half-written save elsewhere (data file, no JSON yet) is neither loaded nor swept.
    (tmp_path / "three.safetensors").write_bytes(b"partial")
    a.refresh()
    assert "three" not in a and (tmp_path / "three.safetensors").exists()
