"""HTTP glue shared by ``/v1/priors`` and ``/v1/control-vectors``.

One home for what both artifact kinds do the same way: the registry lookup (503 while
loading), the error helper, the name check, the stored-record fields of a card, the
list and delete endpoints' bodies and response models, and the build runner.

Builds (a prior's tokenize-and-count, a vector's extraction, a GGUF import) are bounded
and abandonable (:func:`run_build`): at most ``max_concurrent_builds`` run at once per
server (more get 429 with ``Retry-After``), each gets ``build_timeout_s``, and a client
that disconnects abandons its build. The work runs on a worker thread and receives a
:class:`threading.Event` it checks between stages (:func:`check_cancelled`); an
abandoned build stores nothing and keeps its slot until its thread has really ended,
so the bound holds for threads, not just for requests. (An extraction's worker hands
its forwards to the engine as a job, ``server.engine.extract``, and waits; the job shares
the event, so the engine drops it before its next forward.) Storing goes through
:func:`store_artifact`, which enforces the memory budget of loaded artifacts
(``max_artifact_bytes``, 507 when full).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from server.api.errors import APIError
from server.api.state import ServerState
from server.artifacts import (
    ArtifactBudgetError,
    ArtifactBusyError,
    ArtifactNotFoundError,
    ArtifactRegistry,
    InvalidNameError,
    StoredArtifact,
    check_name,
)

log = logging.getLogger("steerserve.api")
R = TypeVar("R")
C = TypeVar("C", bound=BaseModel)


# Artifact responses are declared models serialized with ``exclude_unset`` (:func:`wire`):
# a key is on the wire exactly when the server set it (a card's optional build facts, the
# stored-record fields), so the OpenAPI schema lists every key a card can carry.
STORED_AT = "When it was stored (Unix seconds); with file_bytes and sha256, the stored file."


class Skipped(BaseModel):
    """An artifact file found corrupt and not loaded."""

    name: str
    reason: str


class Deleted(BaseModel):
    """The answer of ``DELETE /v1/<kind>/{name}``."""

    name: str
    object: str = Field(description="The artifact kind: prior | control_vector.")
    deleted: bool = True


def wire(model: BaseModel, status_code: int = 200) -> JSONResponse:
    """``model`` as its JSON response: the fields it was built with (``exclude_unset``;
    build every always-present field explicitly, ``object`` included)."""
    return JSONResponse(model.model_dump(exclude_unset=True), status_code=status_code)


def bad(param: str, message: str, status: int = 400) -> APIError:
    """An error naming ``param`` (400 unless told)."""
    return APIError(status, message, param=param)


def check_artifact_name(name: str) -> None:
    """400 naming ``name`` unless it is a valid artifact name."""
    try:
        check_name(name)
    except InvalidNameError as err:
        raise bad("name", str(err)) from None


def registry(reg: ArtifactRegistry[R] | None) -> ArtifactRegistry[R]:
    """``reg`` (a ``ServerState`` registry, attached with the model), or 503 before."""
    if reg is None:
        raise APIError(503, "the server is still loading", headers={"Retry-After": "1"})
    return reg


def record_fields(reg: ArtifactRegistry[Any], name: str) -> dict[str, Any]:
    """``created_at``/``file_bytes``/``sha256`` of a loaded artifact ({} if none)."""
    try:
        rec = reg.record(name)
    except KeyError:
        return {}
    return {"created_at": rec.created_at, "file_bytes": rec.bytes, "sha256": rec.sha256}


def build_card(model: type[C], card: dict[str, Any], facts: frozenset[str], name: str) -> C:
    """``model(**card)``, leaving out build facts (``facts``: keys copied from the
    artifact's ``info``) whose values do not fit the card.

    An artifact's JSON is not checksummed (only its arrays are), so a hand-edited one can
    carry, say, ``"build_seconds": "quick"``: the arrays are sound and the artifact stays
    usable, and its card omits that fact (logged) instead of failing with a 500. Any
    other field that does not validate is a bug and raises.
    """
    try:
        return model(**card)
    except ValidationError as exc:
        bad = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
        if not bad or not bad <= facts:
            raise
        log.warning("%s: leaving malformed build facts %s out of the card", name, sorted(bad))
        return model(**{k: v for k, v in card.items() if k not in bad})


async def list_artifacts(
    reg: ArtifactRegistry[R], card: Callable[[R], C]
) -> tuple[list[C], list[Skipped]]:
    """The parts of ``GET /v1/<kind>``: every loaded artifact's card, and those skipped
    as corrupt (name and reason). Replicas sharing the volume may have added some."""
    await run_in_threadpool(reg.refresh)
    skipped = [Skipped(name=k, reason=v) for k, v in sorted(reg.corrupt.items())]
    return [card(reg[name]) for name in reg], skipped


async def delete_artifact(
    reg: ArtifactRegistry[Any], name: str, what: str, object_type: str
) -> JSONResponse:
    """The body of ``DELETE /v1/<kind>/{name}`` (404 unknown, 409 while being written)."""
    try:
        check_name(name)
        await run_in_threadpool(reg.remove, name)
    except (InvalidNameError, ArtifactNotFoundError):
        raise bad("name", f"unknown {what} '{name}'", 404) from None
    except ArtifactBusyError:
        raise bad("name", f"{what} '{name}' is being written; try again", 409) from None
    return wire(Deleted(name=name, object=object_type, deleted=True))


# ------------------------------------------------------------------------ builds
class BuildCancelled(Exception):
    """Raised inside a build when its request was abandoned (timeout or disconnect)."""


def check_cancelled(cancel: threading.Event | None) -> None:
    """Call between a build's stages: raises :class:`BuildCancelled` once abandoned."""
    if cancel is not None and cancel.is_set():
        raise BuildCancelled


class BuildSlots:
    """At most ``limit`` builds in flight (counted until their threads end), and one
    lock that makes "is there room in the budget, then store" atomic."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()
        self.store_lock = asyncio.Lock()

    def acquire(self, retry_after: int) -> None:
        with self._lock:
            if self.active >= self.limit:
                raise APIError(
                    429,
                    f"{self.active} artifact builds are running; the limit "
                    f"(max_concurrent_builds) is {self.limit}",
                    headers={"Retry-After": str(max(1, retry_after))},
                )
            self.active += 1

    def release(self) -> None:
        with self._lock:
            self.active -= 1


def build_slots(state: ServerState) -> BuildSlots:
    """The server's :class:`BuildSlots` (made on first use)."""
    if state.builds is None:
        state.builds = BuildSlots(state.settings.max_concurrent_builds)
    slots: BuildSlots = state.builds
    return slots


def used_artifact_bytes(state: ServerState) -> int:
    """Stored bytes of every loaded artifact of every kind."""
    registries: tuple[ArtifactRegistry[Any] | None, ...] = (state.priors, state.control_vectors)
    return sum(reg.loaded_bytes() for reg in registries if reg is not None)


def check_budget_room(state: ServerState) -> None:
    """507 before any work when the artifact memory budget is already spent."""
    budget = state.settings.max_artifact_bytes
    used = used_artifact_bytes(state)
    if used >= budget:
        raise APIError(
            507,
            f"the artifact memory budget (max_artifact_bytes = {budget}) is full "
            f"({used} bytes loaded); delete artifacts to make room",
            code="artifact_budget_full",
        )


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body was already read)."""
    with contextlib.suppress(Exception):  # a transport error is a disconnect too
        while (await request.receive())["type"] != "http.disconnect":
            pass


async def run_build(
    state: ServerState, request: Request, what: str, work: Callable[[threading.Event], R]
) -> R:
    """Run ``work(cancel)`` on a worker thread within the build limits.

    429 when ``max_concurrent_builds`` builds are in flight; 413 (code
    ``build_timeout``) past ``build_timeout_s``; when the client disconnects the build
    is abandoned (the answer goes nowhere). Abandoning sets ``cancel``: the work stops at
    its next :func:`check_cancelled`, and the caller stores nothing.
    """
    slots = build_slots(state)
    slots.acquire(state.settings.retry_after_s)
    cancel = threading.Event()
    try:
        fut = asyncio.get_running_loop().run_in_executor(None, work, cancel)
    except BaseException:
        slots.release()
        raise
    fut.add_done_callback(lambda _: slots.release())
    watcher = asyncio.ensure_future(_disconnected(request))
    waiting: set[asyncio.Future[Any]] = {fut, watcher}
    try:
        done, _ = await asyncio.wait(
            waiting, timeout=state.settings.build_timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        watcher.cancel()
    gone = watcher in done
    if fut in done and not gone:
        return fut.result()  # the work's own errors (APIError, ...) propagate
    cancel.set()
    # The thread ends at its next check; its outcome is not wanted any more.
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    if gone:
        log.info("%s: the client disconnected; build abandoned, nothing stored", what)
        raise APIError(400, f"{what}: the client disconnected; nothing was stored",
                       code="client_disconnected")
    log.warning("%s: build exceeded build_timeout_s = %g s; abandoned", what,
                state.settings.build_timeout_s)
    raise APIError(
        413,
        f"{what}: the build took longer than build_timeout_s = "
        f"{state.settings.build_timeout_s:g} s and was abandoned; nothing was stored "
        "(send less text or fewer pairs)",
        code="build_timeout",
    )


async def store_artifact(
    state: ServerState, reg: ArtifactRegistry[R], name: str, obj: R
) -> StoredArtifact:
    """Persist and register ``obj`` (inside ``reg.reserve(name)``) within the memory
    budget: 507 (code ``artifact_budget_full``) and nothing written when it does not
    fit."""
    slots = build_slots(state)
    async with slots.store_lock:
        room = state.settings.max_artifact_bytes - used_artifact_bytes(state)
        try:
            return await run_in_threadpool(reg.add, name, obj, room)
        except ArtifactBudgetError as err:
            raise APIError(
                507,
                f"{err} (max_artifact_bytes = {state.settings.max_artifact_bytes}); delete "
                "artifacts to make room",
                code="artifact_budget_full",
            ) from None
