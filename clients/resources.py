"""Artifact endpoints as namespaces of the clients: ``client.priors`` and
``client.vectors`` (control vectors), sync and async. Each method builds its
:class:`~clients._base.RequestSpec` with the shared helpers below, so the two flavours
only differ in ``await``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from clients import _base as base
from clients.types import (
    ContrastPair,
    ControlVector,
    ControlVectorCreate,
    ControlVectorList,
    CorpusList,
    Deleted,
    Prior,
    PriorCreate,
    PriorList,
)

if TYPE_CHECKING:
    from clients.client import AsyncSteerClient, SteerClient

PRIORS = "priors"
VECTORS = "control-vectors"


def _prior_spec(
    name: str, text: str | Sequence[str] | None, corpus: str | None, estimator: str | None,
    weights: Sequence[float] | None, max_documents: int | None, timeout: float | None,
) -> base.RequestSpec:
    if (text is None) == (corpus is None):
        raise ValueError("give exactly one of text= or corpus=")
    body = PriorCreate(
        name=name, text=text if text is None or isinstance(text, str) else list(text),
        corpus=corpus, estimator=estimator,
        weights=list(weights) if weights is not None else None, max_documents=max_documents,
    )
    return base.create_prior_spec(body, timeout)


def _vector_spec(
    name: str, pairs: Sequence[ContrastPair], layers: Sequence[int] | None,
    method: str | None, timeout: float | None,
) -> base.RequestSpec:
    body = ControlVectorCreate(
        name=name, pairs=[dict(p) for p in pairs],
        layers=list(layers) if layers is not None else None, method=method,
    )
    return base.create_vector_spec(body, timeout)


def _gguf_bytes(data: bytes | str | Path) -> bytes:
    """A GGUF file's bytes, given the bytes or a path."""
    return data if isinstance(data, bytes) else Path(data).read_bytes()


class Priors:
    """``/v1/priors``: n-gram style priors (build, list, get, delete) and corpora."""

    def __init__(self, client: SteerClient) -> None:
        self._c = client

    def build(
        self, name: str, *, text: str | Sequence[str] | None = None, corpus: str | None = None,
        estimator: str | None = None, weights: Sequence[float] | None = None,
        max_documents: int | None = None, timeout: float | None = None,
    ) -> Prior:
        """Train a prior from ``text`` (one document or a list) or a named ``corpus``."""
        spec = _prior_spec(name, text, corpus, estimator, weights, max_documents, timeout)
        return self._c.call(spec, Prior)

    def list(self) -> PriorList:
        """Every stored prior (``.priors``) and the ones skipped as corrupt (``.skipped``)."""
        return self._c.call(base.list_spec(PRIORS), PriorList)

    def get(self, name: str) -> Prior:
        """One prior's description (counts, estimator, tokenizer fingerprint...)."""
        return self._c.call(base.get_spec(PRIORS, name), Prior)

    def delete(self, name: str) -> Deleted:
        """Delete a prior."""
        return self._c.call(base.delete_spec(PRIORS, name), Deleted)

    def corpora(self) -> CorpusList:
        """The named corpora the server knows (``GET /v1/corpora``)."""
        return self._c.call(base.list_spec("corpora"), CorpusList)


class ControlVectors:
    """``/v1/control-vectors``: extract, import/export GGUF, list, get, delete."""

    def __init__(self, client: SteerClient) -> None:
        self._c = client

    def extract(
        self, name: str, pairs: Sequence[ContrastPair], *, layers: Sequence[int] | None = None,
        method: str | None = None, timeout: float | None = None,
    ) -> ControlVector:
        """Fit a direction per layer from ``{positive, negative}`` prompt pairs."""
        return self._c.call(_vector_spec(name, pairs, layers, method, timeout), ControlVector)

    def import_gguf(
        self, name: str, data: bytes | str | Path, *, timeout: float | None = None
    ) -> ControlVector:
        """Upload a GGUF control-vector file (repeng / llama.cpp layout) as ``name``."""
        return self._c.call(base.put_gguf_spec(name, _gguf_bytes(data), timeout), ControlVector)

    def export_gguf(
        self, name: str, path: str | Path | None = None, *, timeout: float | None = None
    ) -> bytes:
        """Download ``name`` as a GGUF file; also written to ``path`` when given."""
        data = self._c.request(base.get_gguf_spec(name, timeout)).content
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def list(self) -> ControlVectorList:
        """Every stored control vector (``.vectors``)."""
        return self._c.call(base.list_spec(VECTORS), ControlVectorList)

    def get(self, name: str) -> ControlVector:
        """One control vector's description."""
        return self._c.call(base.get_spec(VECTORS, name), ControlVector)

    def delete(self, name: str) -> Deleted:
        """Delete a control vector."""
        return self._c.call(base.delete_spec(VECTORS, name), Deleted)


class AsyncPriors:
    """Async :class:`Priors`."""

    def __init__(self, client: AsyncSteerClient) -> None:
        self._c = client

    async def build(
        self, name: str, *, text: str | Sequence[str] | None = None, corpus: str | None = None,
        estimator: str | None = None, weights: Sequence[float] | None = None,
        max_documents: int | None = None, timeout: float | None = None,
    ) -> Prior:
        """Train a prior from ``text`` (one document or a list) or a named ``corpus``."""
        spec = _prior_spec(name, text, corpus, estimator, weights, max_documents, timeout)
        return await self._c.call(spec, Prior)

    async def list(self) -> PriorList:
        """Every stored prior."""
        return await self._c.call(base.list_spec(PRIORS), PriorList)

    async def get(self, name: str) -> Prior:
        """One prior's description."""
        return await self._c.call(base.get_spec(PRIORS, name), Prior)

    async def delete(self, name: str) -> Deleted:
        """Delete a prior."""
        return await self._c.call(base.delete_spec(PRIORS, name), Deleted)

    async def corpora(self) -> CorpusList:
        """The named corpora the server knows."""
        return await self._c.call(base.list_spec("corpora"), CorpusList)


class AsyncControlVectors:
    """Async :class:`ControlVectors`."""

    def __init__(self, client: AsyncSteerClient) -> None:
        self._c = client

    async def extract(
        self, name: str, pairs: Sequence[ContrastPair], *, layers: Sequence[int] | None = None,
        method: str | None = None, timeout: float | None = None,
    ) -> ControlVector:
        """Fit a direction per layer from ``{positive, negative}`` prompt pairs."""
        spec = _vector_spec(name, pairs, layers, method, timeout)
        return await self._c.call(spec, ControlVector)

    async def import_gguf(
        self, name: str, data: bytes | str | Path, *, timeout: float | None = None
    ) -> ControlVector:
        """Upload a GGUF control-vector file as ``name``."""
        spec = base.put_gguf_spec(name, _gguf_bytes(data), timeout)
        return await self._c.call(spec, ControlVector)

    async def export_gguf(
        self, name: str, path: str | Path | None = None, *, timeout: float | None = None
    ) -> bytes:
        """Download ``name`` as a GGUF file; also written to ``path`` when given."""
        data = (await self._c.request(base.get_gguf_spec(name, timeout))).content
        if path is not None:
            Path(path).write_bytes(data)
        return data

    async def list(self) -> ControlVectorList:
        """Every stored control vector."""
        return await self._c.call(base.list_spec(VECTORS), ControlVectorList)

    async def get(self, name: str) -> ControlVector:
        """One control vector's description."""
        return await self._c.call(base.get_spec(VECTORS, name), ControlVector)

    async def delete(self, name: str) -> Deleted:
        """Delete a control vector."""
        return await self._c.call(base.delete_spec(VECTORS, name), Deleted)
