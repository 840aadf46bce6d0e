"""``/v1/priors``: build, list, show and delete n-gram style priors; ``/v1/corpora``.

``POST /v1/priors`` tokenizes uploaded ``text`` (a string = one document, a list of
strings = several) or a named ``corpus`` (see ``server.corpora``) with the serving
model's tokenizer, counts 1/2/3-grams and stores the prior as an artifact
(``server.artifacts``) under ``<data_dir>/priors``. Building runs on a worker thread
within the build limits (``server.api.artifact_http.run_build``: bounded in number and
time, abandoned when the client leaves) and logs its progress on ``steerserve.priors``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from processors.base import ParamError, check_number
from processors.ngram import NgramPrior, check_weights
from processors.ngram_tables import (
    DEFAULT_ADD_K,
    DEFAULT_DISCOUNT,
    DEFAULT_WEIGHTS,
    ESTIMATORS,
    MIN_ADD_K,
)
from server.api.artifact_http import (
    STORED_AT,
    Deleted,
    Skipped,
    bad,
    build_card,
    check_artifact_name,
    check_budget_room,
    check_cancelled,
    delete_artifact,
    list_artifacts,
    record_fields,
    run_build,
    store_artifact,
    wire,
)
from server.api.artifact_http import (
    registry as artifact_registry,
)
from server.api.errors import APIError, artifact_or_404, error_responses
from server.api.protocol import StrictFloat, StrictInt, StrictStr
from server.api.state import ServerState, StateDep
from server.artifacts import ArtifactExistsError, ArtifactRegistry
from server.corpora import (
    CorpusTooLargeError,
    CorpusUnavailableError,
    UnknownCorpusError,
    corpus_available,
    corpus_info,
    corpus_names,
    load_corpus,
)

log = logging.getLogger("steerserve.priors")
router = APIRouter()

_ERRORS = error_responses(400, 404, 409, 413, 429, 503, 507)  # POST (507: disk/budget)
_READ_ERRORS = error_responses(404, 503)
_TOKENIZE_BATCH = 256  # documents per tokenizer call (progress granularity)


class PriorCreate(BaseModel):
    """``POST /v1/priors``. Exactly one of ``text``/``corpus``."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(description="Artifact name: ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    text: StrictStr | list[StrictStr] | None = Field(
        None, description="Uploaded corpus: one document, or a list of documents."
    )
    corpus: StrictStr | None = Field(None, description="A named corpus (GET /v1/corpora).")
    max_documents: StrictInt | None = Field(
        None, ge=1, description="Use only the first N documents of a named corpus."
    )
    estimator: StrictStr = Field("jelinek_mercer", description="jelinek_mercer | kneser_ney")
    weights: list[StrictFloat] | None = Field(
        None, description="Default [w1, w2, w3] for jelinek_mercer (requests may override)."
    )
    add_k: StrictFloat | None = Field(
        None, description=f"Lidstone constant of the unigram (jelinek_mercer; {DEFAULT_ADD_K})."
    )
    discount: StrictFloat | None = Field(
        None, description=f"Absolute discount in (0, 1] (kneser_ney; {DEFAULT_DISCOUNT})."
    )


class CorpusCard(BaseModel):
    """One named corpus."""

    name: str
    description: str
    package: str
    license: str
    installed: bool
    install: str


def registry(state: ServerState) -> ArtifactRegistry[NgramPrior]:
    """The loaded priors (attached with the model), or 503 while loading."""
    return artifact_registry(state.priors)


class CorpusList(BaseModel):
    """``GET /v1/corpora``."""

    object: Literal["list"] = "list"
    data: list[CorpusCard]


class PriorCard(BaseModel):
    """A stored n-gram style prior (``GET /v1/priors/{name}``); the build facts are
    there when the prior has them."""

    name: str
    object: Literal["prior"] = "prior"
    estimator: str
    orders: list[int] = Field(default_factory=lambda: [1, 2, 3],
                              description="The n-gram orders interpolated (always 1-3).")
    vocab_size: int
    tokenizer_fingerprint: str
    compatible: bool = Field(description="Built with the serving model's tokenizer.")
    default_weights: list[float] | None = Field(
        description="Jelinek-Mercer interpolation weights (null for other estimators)."
    )
    corpus: dict[str, Any] | None = Field(None, description="Where the text came from.")
    counts: dict[str, Any] | None = Field(None, description="Tokens, documents, n-grams.")
    params: dict[str, Any] | None = Field(None, description="The estimator's parameters.")
    build_seconds: float | None = None
    created_at: float | None = Field(None, description=STORED_AT)
    file_bytes: int | None = None
    sha256: str | None = None


class PriorList(BaseModel):
    """``GET /v1/priors``."""

    object: Literal["list"] = "list"
    data: list[PriorCard]
    skipped: list[Skipped]


# The card keys copied from a prior's stored ``info`` (hand-editable: see build_card).
_PRIOR_FACTS = frozenset({"orders", "corpus", "counts", "params", "build_seconds"})


def prior_card(
    reg: ArtifactRegistry[NgramPrior], prior: NgramPrior, fingerprint: str
) -> PriorCard:
    """The description of a prior (``GET /v1/priors/{name}``)."""
    info = dict(prior.info)
    card: dict[str, Any] = {
        "name": prior.name,
        "object": "prior",
        "estimator": prior.estimator,
        "orders": info.pop("orders", [1, 2, 3]),
        "vocab_size": prior.vocab_size,
        "tokenizer_fingerprint": prior.tokenizer_fingerprint,
        "compatible": prior.tokenizer_fingerprint == fingerprint,
        "default_weights": list(prior.default_weights)
        if prior.estimator == "jelinek_mercer"
        else None,
    }
    for key in sorted(_PRIOR_FACTS - {"orders"}):
        if key in info:
            card[key] = info.pop(key)
    card.update(record_fields(reg, prior.name))
    return build_card(PriorCard, card, _PRIOR_FACTS, prior.name)


_bad = bad


def _check_body(body: PriorCreate) -> dict[str, Any]:
    """Meaning checks of the body beyond its shape; returns the build parameters."""
    check_artifact_name(body.name)
    if (body.text is None) == (body.corpus is None):
        raise _bad("text", "give exactly one of 'text' or 'corpus'")
    if body.max_documents is not None and body.corpus is None:
        raise _bad("max_documents", "'max_documents' applies to a named 'corpus' only")
    if body.estimator not in ESTIMATORS:
        raise _bad(
            "estimator",
            f"'estimator' must be one of {', '.join(ESTIMATORS)}, got {body.estimator!r}",
        )
    params: dict[str, Any] = {"estimator": body.estimator}
    if body.estimator == "jelinek_mercer":
        if body.discount is not None:
            raise _bad("discount", "'discount' applies to the kneser_ney estimator only")
        try:
            params["weights"] = (
                DEFAULT_WEIGHTS if body.weights is None else check_weights(body.weights)
            )
            # Below MIN_ADD_K an unseen token's probability could underflow float64.
            add_k = DEFAULT_ADD_K if body.add_k is None else body.add_k
            params["add_k"] = check_number(add_k, "add_k", lo=MIN_ADD_K, hi=100.0)
        except ParamError as err:
            raise APIError.from_param_error(err) from None
    else:
        if body.weights is not None:
            raise _bad("weights", "'weights' apply to the jelinek_mercer estimator only")
        if body.add_k is not None:
            raise _bad("add_k", "'add_k' applies to the jelinek_mercer estimator only")
        discount = DEFAULT_DISCOUNT if body.discount is None else body.discount
        try:
            params["discount"] = check_number(discount, "discount", lo=0.0, lo_open=True, hi=1.0)
        except ParamError as err:
            raise APIError.from_param_error(err) from None
    return params


def _documents(body: PriorCreate, max_bytes: int) -> tuple[list[str], dict[str, Any]]:
    """The corpus as a list of documents, and how it is described in the prior's info."""
    if body.corpus is not None:
        try:
            corpus_info(body.corpus)
            docs = load_corpus(body.corpus, max_bytes=max_bytes, max_documents=body.max_documents)
        except UnknownCorpusError as err:
            raise _bad("corpus", str(err.args[0]), 404) from None
        except CorpusUnavailableError as err:
            raise _bad("corpus", str(err), 404) from None
        except CorpusTooLargeError as err:
            raise _bad("corpus", str(err), 413) from None
        source: dict[str, Any] = {"source": "corpus", "name": body.corpus}
        if body.max_documents is not None:
            source["max_documents"] = body.max_documents
    else:
        assert body.text is not None
        docs = [body.text] if isinstance(body.text, str) else list(body.text)
        size = sum(len(d.encode("utf-8")) for d in docs)
        if size > max_bytes:
            raise _bad(
                "text",
                f"'text' has {size} bytes; the limit (max_corpus_bytes) is {max_bytes}",
                413,
            )
        source = {"source": "text"}
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise _bad(body.corpus and "corpus" or "text", "the corpus is empty")
    source["documents"] = len(docs)
    source["bytes"] = sum(len(d.encode("utf-8")) for d in docs)
    return docs, source


def tokenize_documents(
    tokenizer: Any, docs: Sequence[str], name: str, cancel: threading.Event | None = None
) -> list[list[int]]:
    """Token ids of each document (no special tokens), logging progress; stops between
    batches once ``cancel`` is set (:class:`BuildCancelled`)."""
    out: list[list[int]] = []
    t0 = last = time.perf_counter()
    total = 0
    for i in range(0, len(docs), _TOKENIZE_BATCH):
        check_cancelled(cancel)
        batch = list(docs[i : i + _TOKENIZE_BATCH])
        enc = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        ids = enc["input_ids"]
        out.extend(ids)
        total += sum(len(x) for x in ids)
        now = time.perf_counter()
        if now - last > 1.0 or i + _TOKENIZE_BATCH >= len(docs):
            log.info(
                "prior '%s': tokenized %d/%d documents (%s tokens, %.1f s)",
                name,
                min(i + _TOKENIZE_BATCH, len(docs)),
                len(docs),
                f"{total:,}",
                now - t0,
            )
            last = now
    return out


def build_prior(
    body: PriorCreate,
    params: dict[str, Any],
    tokenizer: Any,
    fingerprint: str,
    max_bytes: int,
    cancel: threading.Event | None = None,
) -> NgramPrior:
    """Read, tokenize and count the corpus; returns the prior (not yet stored). Checks
    ``cancel`` between stages and tokenizer batches (an abandoned build stops there)."""
    t0 = time.perf_counter()
    docs, source = _documents(body, max_bytes)
    check_cancelled(cancel)
    log.info(
        "prior '%s': building %s from %s (%d documents, %s bytes)",
        body.name,
        params["estimator"],
        source.get("name", "uploaded text"),
        source["documents"],
        f"{source['bytes']:,}",
    )
    ids = tokenize_documents(tokenizer, docs, body.name, cancel)
    check_cancelled(cancel)
    source["tokens"] = sum(len(x) for x in ids)
    if source["tokens"] == 0:
        raise _bad(body.corpus and "corpus" or "text", "the corpus produced no tokens")
    vocab = len(tokenizer)

    def progress(msg: str) -> None:
        check_cancelled(cancel)  # counting reports between its stages: stop there
        log.info("prior '%s': %s", body.name, msg)

    prior = NgramPrior.build(
        body.name,
        ids,
        vocab,
        estimator=params["estimator"],
        weights=params.get("weights", DEFAULT_WEIGHTS),
        add_k=params.get("add_k", DEFAULT_ADD_K),
        discount=params.get("discount", DEFAULT_DISCOUNT),
        tokenizer_fingerprint=fingerprint,
        info={"corpus": source},
        progress=progress,
    )
    check_cancelled(cancel)
    prior.info["build_seconds"] = round(time.perf_counter() - t0, 3)
    return prior


@router.post("/v1/priors", status_code=201, response_model=PriorCard, responses=_ERRORS)
async def create_prior(body: PriorCreate, request: Request, state: StateDep) -> JSONResponse:
    """Build an n-gram style prior from uploaded text or a named corpus (201)."""
    bundle, _, env = state.ready()
    reg = registry(state)
    params = _check_body(body)
    try:
        with reg.reserve(body.name):  # 409 before any work, across replicas too
            check_budget_room(state)
            prior = await run_build(
                state, request, f"prior '{body.name}'",
                lambda cancel: build_prior(
                    body, params, bundle.tokenizer, env.tokenizer_fingerprint,
                    state.settings.max_corpus_bytes, cancel,
                ),
            )
            stored = await store_artifact(state, reg, body.name, prior)
    except ArtifactExistsError as err:
        raise _bad("name", str(err), 409) from None
    log.info(
        "prior '%s': stored (%s bytes, sha256 %s…) after %.2f s",
        body.name,
        f"{stored.bytes:,}",
        stored.sha256[:12],
        prior.info["build_seconds"],
    )
    return wire(prior_card(reg, prior, env.tokenizer_fingerprint), 201)


@router.get("/v1/priors", response_model=PriorList, responses=error_responses(503))
async def list_priors(state: StateDep) -> JSONResponse:
    """Every loaded prior, and the artifacts skipped as corrupt (name and reason)."""
    reg = registry(state)
    fp = state.env.tokenizer_fingerprint if state.env else ""
    cards, skipped = await list_artifacts(reg, lambda prior: prior_card(reg, prior, fp))
    return wire(PriorList(object="list", data=cards, skipped=skipped))


@router.get("/v1/priors/{name}", response_model=PriorCard, responses=_READ_ERRORS)
async def get_prior(name: str, state: StateDep) -> JSONResponse:
    """One prior: counts, orders, estimator, tokenizer fingerprint, corpus size."""
    reg = registry(state)
    prior = artifact_or_404(reg, name, "prior")
    fp = state.env.tokenizer_fingerprint if state.env else ""
    return wire(prior_card(reg, prior, fp))


@router.delete("/v1/priors/{name}", response_model=Deleted, responses=_READ_ERRORS)
async def delete_prior(name: str, state: StateDep) -> JSONResponse:
    """Delete a prior (also one skipped as corrupt). Running requests keep theirs."""
    return await delete_artifact(registry(state), name, "prior", "prior")


@router.get("/v1/corpora", response_model=CorpusList)
async def list_corpora() -> JSONResponse:
    """The named corpora this build knows and whether each is installed."""
    cards = []
    for name in corpus_names():
        info = corpus_info(name)
        cards.append(
            CorpusCard(
                name=name,
                description=info.description,
                package=info.package,
                license=info.license,
                installed=corpus_available(name),
                install=info.install,
            )
        )
    return wire(CorpusList(object="list", data=cards))
