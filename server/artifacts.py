"""Named artifacts on disk: atomic, checksummed, pickle-free; and an in-memory registry.

An artifact ``NAME`` of a store rooted at ``DIR`` is two files:

* ``DIR/NAME.safetensors`` — the arrays (numpy, any safetensors dtype; no pickle);
* ``DIR/NAME.json`` — ``{"format", "kind", "name", "sha256", "bytes", "created_at",
  "meta"}``; ``sha256``/``bytes`` describe the data file, ``meta`` is the owner's JSON.

Writes go to a temporary file in the same directory, are fsynced and renamed into
place, then the directory is fsynced. The data file is written first and the JSON last,
so the JSON is the commit point: a crash leaves either no artifact or a complete one
(an orphaned data file or temp file is ignored and cleaned up at a later scan). At load,
an artifact whose JSON does not parse, whose data file is missing, differs from its
checksum or fails the owner's decoder is *reported and skipped*, never loaded half.

Several processes may share one directory (replicas on one volume). Every write of a
name happens under an exclusive ``fcntl.flock`` on ``DIR/.NAME.lock``, taken without
waiting and held from :meth:`ArtifactRegistry.reserve` (before the build starts) to the
commit: exactly one writer of a name proceeds, every other gets ``ArtifactExistsError``
(the API's 409) before doing any work, and a process that dies releases its lock with
it. Start-up scans remove only temporary files older than a grace period and data
files whose name's lock is free (no writer anywhere), never another replica's write in
progress.

The store is generic: priors and control vectors each use it with their own ``kind``
and codec (:class:`ArtifactRegistry`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

log = logging.getLogger("steerserve.artifacts")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STORE_FORMAT = 1
_DATA_SUFFIX = ".safetensors"
_META_SUFFIX = ".json"


class ArtifactError(Exception):
    """Base class of store errors."""


class InvalidNameError(ArtifactError, ValueError):
    """The name does not match :data:`NAME_RE`."""


class ArtifactExistsError(ArtifactError):
    """The name is taken (by a loaded, pending or corrupt artifact)."""


class ArtifactNotFoundError(ArtifactError, KeyError):
    """No artifact of that name."""


class CorruptArtifactError(ArtifactError):
    """The files on disk are unreadable or fail their checksum."""


class ArtifactBudgetError(ArtifactError):
    """Storing the artifact would exceed the memory budget of loaded artifacts."""

    def __init__(self, size: int, room: int) -> None:
        super().__init__(f"the artifact needs {size} bytes; {max(room, 0)} bytes of the "
                         "artifact memory budget are free")
        self.size, self.room = size, room


class ArtifactBusyError(ArtifactExistsError):
    """Another writer (this process or another sharing the directory) holds the name."""


class NameLock:
    """An exclusive, non-blocking ``flock`` on ``root/.NAME.lock`` (see the module doc).

    The lock file is unlinked on release; a waiter that opened the old file notices
    (its inode is no longer the path's) and retries, so exactly one holder exists even
    while files come and go. ``acquire`` raises :class:`ArtifactBusyError` when held.
    """

    def __init__(self, root: Path, name: str) -> None:
        self.path = root / f".{name}.lock"
        self.fd: int | None = None

    def acquire(self) -> NameLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ArtifactBusyError(
                        f"'{self.path.name[1:-5]}' is being written by another build"
                    ) from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)  # released and unlinked meanwhile: lock the new file instead

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still held: nobody can hold a lock on it now
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> NameLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid artifact name, else raise InvalidNameError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid name {name!r}: names are 1-64 characters of letters, digits, '.', "
            "'_' and '-', starting with a letter or digit"
        )
    return name


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem can fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename + directory fsync."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class StoredArtifact:
    """One artifact as read back from disk."""

    name: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    sha256: str
    bytes: int
    created_at: float


class ArtifactStore:
    """The files of one artifact kind under ``root`` (created if missing).

    ``tmp_grace_s``: temporary files younger than this are never swept (another process
    sharing the directory may be writing them).
    """

    def __init__(self, root: Path, kind: str, tmp_grace_s: float = 300.0) -> None:
        self.root = Path(root)
        self.kind = kind
        self.tmp_grace_s = tmp_grace_s
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._held: dict[str, NameLock] = {}  # names this store has locked (reserve)

    def lock(self, name: str) -> NameLock:
        """Take ``name``'s cross-process write lock (ArtifactBusyError if held); the
        caller releases it with :meth:`unlock`. ``save`` of a locked name uses it."""
        check_name(name)
        lock = NameLock(self.root, name).acquire()
        with self._lock:
            self._held[name] = lock
        return lock

    def unlock(self, name: str) -> None:
        with self._lock:
            lock = self._held.pop(name, None)
        if lock is not None:
            lock.release()

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """Hold ``name``'s lock for one write: the one this store already holds (a
        reservation), or a new one for the duration."""
        with self._lock:
            held = name in self._held
        if held:
            yield
            return
        with NameLock(self.root, name):
            yield

    def _paths(self, name: str) -> tuple[Path, Path]:
        check_name(name)
        return self.root / f"{name}{_DATA_SUFFIX}", self.root / f"{name}{_META_SUFFIX}"

    def exists(self, name: str) -> bool:
        """Whether a committed (JSON present) artifact, valid or not, has this name."""
        return self._paths(name)[1].exists()

    def save(
        self, name: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
    ) -> StoredArtifact:
        """Write a new artifact; raise ArtifactExistsError if the name is taken."""
        data_path, meta_path = self._paths(name)
        payload = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        digest = hashlib.sha256(payload).hexdigest()
        created_at = time.time()
        record = {
            "format": STORE_FORMAT,
            "kind": self.kind,
            "name": name,
            "sha256": digest,
            "bytes": len(payload),
            "created_at": created_at,
            "meta": dict(meta),
        }
        text = json.dumps(record, indent=1, sort_keys=True, allow_nan=False).encode()
        with self._writing(name):
            if meta_path.exists():
                raise ArtifactExistsError(f"{self.kind} '{name}' already exists")
            write_atomic(data_path, payload)
            try:
                write_atomic(meta_path, text)  # the commit point
            except BaseException:
                # Not committed: leave no orphaned data file (e.g. the disk filled up).
                with contextlib.suppress(OSError):
                    data_path.unlink()
                raise
        return StoredArtifact(
            name, dict(arrays), dict(meta), digest, len(payload), created_at
        )

    def load(self, name: str) -> StoredArtifact:
        """Read and verify one artifact (CorruptArtifactError / ArtifactNotFoundError)."""
        data_path, meta_path = self._paths(name)
        try:
            raw = meta_path.read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFoundError(name) from None
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise CorruptArtifactError(f"metadata is not valid JSON: {exc}") from None
        if not isinstance(record, dict) or record.get("format") != STORE_FORMAT:
            raise CorruptArtifactError("metadata has an unknown format")
        if record.get("kind") != self.kind or record.get("name") != name:
            raise CorruptArtifactError("metadata names another artifact")
        try:
            payload = data_path.read_bytes()
        except FileNotFoundError:
            raise CorruptArtifactError(f"data file {data_path.name} is missing") from None
        digest = hashlib.sha256(payload).hexdigest()
        if len(payload) != record.get("bytes") or digest != record.get("sha256"):
            raise CorruptArtifactError(
                f"checksum mismatch: {data_path.name} has sha256 {digest[:12]}… "
                f"({len(payload)} bytes), metadata says {str(record.get('sha256'))[:12]}… "
                f"({record.get('bytes')} bytes)"
            )
        try:
            arrays = st_load(payload)
        except Exception as exc:  # noqa: BLE001 - any parse failure means corrupt
            raise CorruptArtifactError(f"data file does not parse: {exc}") from None
        meta = record.get("meta")
        if not isinstance(meta, dict):
            raise CorruptArtifactError("metadata lacks 'meta'")
        return StoredArtifact(
            name, arrays, meta, digest, len(payload), float(record.get("created_at", 0.0))
        )

    def delete(self, name: str) -> None:
        """Remove an artifact (JSON first, so a crash mid-delete leaves no artifact)."""
        data_path, meta_path = self._paths(name)
        with self._writing(name):
            if not meta_path.exists() and not data_path.exists():
                raise ArtifactNotFoundError(name)
            with contextlib.suppress(FileNotFoundError):
                meta_path.unlink()
            _fsync_dir(self.root)
            with contextlib.suppress(FileNotFoundError):
                data_path.unlink()

    def committed_names(self) -> list[str]:
        """Committed artifact names (sorted), touching nothing: safe to call while other
        processes sharing the directory are writing (see ``ArtifactRegistry.refresh``)."""
        return sorted(
            p.stem
            for p in self.root.iterdir()
            if p.suffix == _META_SUFFIX and NAME_RE.fullmatch(p.stem)
        )

    def _sweep_tmp(self, path: Path, now: float) -> None:
        """Remove a leftover temporary file once it is older than ``tmp_grace_s`` and no
        process holds its artifact's lock (its writer died); a write in progress, here
        or in a replica sharing the directory, is left alone."""
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            return  # its writer renamed it into place meanwhile
        if age < self.tmp_grace_s:
            return
        # ".NAME.json.RANDOM.tmp" / ".NAME.safetensors.RANDOM.tmp" (write_atomic)
        stem = path.name[1:].removesuffix(".tmp").rpartition(".")[0]
        name = stem.removesuffix(_META_SUFFIX).removesuffix(_DATA_SUFFIX)
        with self._lock:
            if name in self._held:
                return
        try:
            lock = NameLock(self.root, name).acquire() if NAME_RE.fullmatch(name) else None
        except ArtifactBusyError:
            return
        try:
            log.info("removing leftover temporary file %s (%.0f s old)", path, age)
            with contextlib.suppress(OSError):
                path.unlink()
        finally:
            if lock is not None:
                lock.release()

    def names(self) -> list[str]:
        """Committed artifact names (sorted). Sweeps what dead writers left: temporary
        files (:meth:`_sweep_tmp`) and data files whose JSON never landed (a crash
        between the two renames), each only when no process holds that name's lock."""
        out: list[str] = []
        now = time.time()
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                self._sweep_tmp(p, now)
            elif p.suffix == _META_SUFFIX and NAME_RE.fullmatch(p.stem):
                out.append(p.stem)
            elif p.suffix == _DATA_SUFFIX and NAME_RE.fullmatch(p.stem):
                with self._lock:
                    if p.stem in self._held:
                        continue
                try:
                    with NameLock(self.root, p.stem):
                        if not p.with_suffix(_META_SUFFIX).exists():
                            log.info("removing uncommitted data file %s", p)
                            with contextlib.suppress(OSError):
                                p.unlink()
                except ArtifactBusyError:
                    continue  # someone is writing it right now
        return sorted(set(out))


T = TypeVar("T")
Decoder = Callable[[str, dict[str, np.ndarray], dict[str, Any]], T]
Encoder = Callable[[T], tuple[dict[str, np.ndarray], dict[str, Any]]]


class ArtifactRegistry(Mapping[str, T], Generic[T]):
    """The loaded artifacts of one kind: a read-only ``Mapping[name, T]`` for processors
    (``ProcessorEnv.priors``, ``.control_vectors``), plus thread-safe add/remove for the API.

    ``decode(name, arrays, meta)`` turns stored arrays into an object (raising
    ValueError on bad content); ``encode(obj)`` gives ``(arrays, meta)`` back.
    """

    def __init__(self, store: ArtifactStore, decode: Decoder[T], encode: Encoder[T]) -> None:
        self.store = store
        self._decode = decode
        self._encode = encode
        self._items: dict[str, T] = {}
        self._records: dict[str, StoredArtifact] = {}
        self.corrupt: dict[str, str] = {}
        self._pending: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, root: Path, kind: str, decode: Decoder[T], encode: Encoder[T],
        tmp_grace_s: float = 300.0,
    ) -> ArtifactRegistry[T]:
        """Create the store under ``root`` and load everything in it."""
        reg = cls(ArtifactStore(root, kind, tmp_grace_s), decode, encode)
        reg.load_all()
        return reg

    def load_all(self) -> None:
        """(Re)load every artifact on disk; corrupt ones are logged and listed in
        ``corrupt`` (name → reason), never registered."""
        items: dict[str, T] = {}
        records: dict[str, StoredArtifact] = {}
        corrupt: dict[str, str] = {}
        for name in self.store.names():
            try:
                stored = self.store.load(name)
                items[name] = self._decode(name, stored.arrays, stored.meta)
            except (CorruptArtifactError, ValueError, KeyError, TypeError) as exc:
                reason = str(exc) or type(exc).__name__
                log.warning("skipping corrupt %s '%s': %s", self.store.kind, name, reason)
                corrupt[name] = reason
                continue
            records[name] = stored
        with self._lock:
            self._items, self._records, self.corrupt = items, records, corrupt
        log.info(
            "loaded %d %s artifact(s) from %s (%d skipped as corrupt)",
            len(items),
            self.store.kind,
            self.store.root,
            len(corrupt),
        )

    # ---- Mapping
    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            pass
        # Not loaded here: another replica sharing the directory may have written it.
        obj = self._load_new(name)
        if obj is None:
            raise KeyError(name)
        return obj

    def _load_new(self, name: str) -> T | None:
        """Load one artifact that appeared on disk after start-up (None if absent)."""
        try:
            check_name(name)
        except InvalidNameError:
            return None
        with self._lock:
            if name in self._pending or name in self.corrupt or name in self._items:
                return self._items.get(name)
        if not self.store.exists(name):
            return None
        try:
            stored = self.store.load(name)
            obj = self._decode(name, stored.arrays, stored.meta)
        except ArtifactNotFoundError:
            return None
        except (CorruptArtifactError, ValueError, KeyError, TypeError) as exc:
            reason = str(exc) or type(exc).__name__
            log.warning("skipping corrupt %s '%s': %s", self.store.kind, name, reason)
            with self._lock:
                self.corrupt = {**self.corrupt, name: reason}
            return None
        with self._lock:
            if name not in self._items:
                self._items = {**self._items, name: obj}
                self._records = {**self._records, name: stored}
            return self._items[name]

    def refresh(self) -> None:
        """Pick up artifacts that other processes sharing the directory (replicas on one
        volume) created or deleted since start-up. Never sweeps files: a save in
        progress elsewhere is left alone."""
        on_disk = set(self.store.committed_names())
        for name in sorted(on_disk - set(self._items) - set(self.corrupt)):
            self._load_new(name)
        with self._lock:
            gone = {n for n in self._items if n not in on_disk and n not in self._pending}
            if gone:
                self._items = {k: v for k, v in self._items.items() if k not in gone}
                self._records = {k: v for k, v in self._records.items() if k not in gone}
            self.corrupt = {k: v for k, v in self.corrupt.items() if k in on_disk}

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def loaded_bytes(self) -> int:
        """Stored size of every loaded artifact (what the memory budget counts)."""
        return sum(r.bytes for r in self._records.values())

    def record(self, name: str) -> StoredArtifact:
        """The stored record (checksum, size, creation time) of a loaded artifact."""
        return self._records[name]

    # ---- mutation
    @contextlib.contextmanager
    def reserve(self, name: str) -> Iterator[None]:
        """Hold ``name`` while an artifact is being built: ArtifactExistsError (409) when
        it exists or another build of it runs, in this process or in any other sharing
        the directory (the name's lock is held until the block ends)."""
        check_name(name)
        with self._lock:
            if name in self._items or name in self._pending or name in self.corrupt:
                what = "a corrupt artifact (DELETE it first)" if name in self.corrupt else None
                raise ArtifactExistsError(
                    f"{self.store.kind} '{name}' already exists" + (f" as {what}" if what else "")
                )
            self._pending.add(name)
        try:
            try:
                self.store.lock(name)
            except ArtifactBusyError:
                raise ArtifactExistsError(
                    f"{self.store.kind} '{name}' is being built by another request"
                ) from None
            try:
                if self.store.exists(name):  # committed by another process
                    raise ArtifactExistsError(f"{self.store.kind} '{name}' already exists")
                yield
            finally:
                self.store.unlock(name)
        finally:
            with self._lock:
                self._pending.discard(name)

    def add(self, name: str, obj: T, max_bytes: int | None = None) -> StoredArtifact:
        """Persist ``obj`` under ``name`` and register it; ArtifactBudgetError (nothing
        written) when its arrays exceed ``max_bytes``."""
        arrays, meta = self._encode(obj)
        if max_bytes is not None:
            size = sum(int(np.asarray(a).nbytes) for a in arrays.values())
            if size > max_bytes:
                raise ArtifactBudgetError(size, max_bytes)
        stored = self.store.save(name, arrays, meta)
        with self._lock:
            self._items = {**self._items, name: obj}
            self._records = {**self._records, name: stored}
        return stored

    def remove(self, name: str) -> None:
        """Delete ``name`` from disk and memory (corrupt artifacts included)."""
        with self._lock:
            known = name in self._items or name in self.corrupt
        if not known and not self.store.exists(name):
            raise ArtifactNotFoundError(name)
        self.store.delete(name)
        with self._lock:
            self._items = {k: v for k, v in self._items.items() if k != name}
            self._records = {k: v for k, v in self._records.items() if k != name}
            self.corrupt = {k: v for k, v in self.corrupt.items() if k != name}
