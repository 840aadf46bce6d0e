"""The server's shared state (model bundle, engine, settings), injected into routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from processors.base import ModelGeometry, ProcessorEnv
from processors.control import ControlVector
from processors.ngram import NgramPrior
from server.api.errors import APIError
from server.api.protocol import HealthStatus
from server.artifacts import ArtifactRegistry
from server.auxiliary import AuxBundle, aux_roles, check_aux, load_aux_models
from server.engine import (
    Engine,
    EngineConfig,
    EngineUnavailableError,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
)
from server.engine.types import EngineEvent, ErrorEvent, EventSink, FinishEvent
from server.loading import ModelBundle, load_model
from server.settings import Settings

log = logging.getLogger("steerserve.api")


@dataclass
class ServerState:
    """Everything a route needs; one instance per app.

    The artifact registries and the model geometry are typed fields, set by
    :meth:`attach` (None while loading); ``env`` hands the processors read-only views of
    them. Server-only things (the auxiliary bundles with their prompt templates) stay
    here, outside the processors' environment.
    """

    settings: Settings
    bundle: ModelBundle | None = None
    engine: Engine | None = None
    env: ProcessorEnv | None = None
    status: HealthStatus = "loading"
    detail: str | None = None
    priors: ArtifactRegistry[NgramPrior] | None = None
    control_vectors: ArtifactRegistry[ControlVector] | None = None
    geometry: ModelGeometry | None = None
    metrics: Any = None  # server.api.metrics.ServerMetrics (also the engine's observer)
    _drain_timer: threading.Timer | None = None
    aux: list[AuxBundle] = field(default_factory=list)  # fusion's auxiliary models
    builds: Any = None  # server.api.artifact_http.BuildSlots (made on first build)

    def attach(self, bundle: ModelBundle, aux: list[AuxBundle] | None = None) -> None:
        """Start the engine over a loaded model and mark the server ready.

        The auxiliary models of ``settings.aux_models`` load here, after the main model
        (``aux`` passes pre-loaded ones instead); one whose vocabulary differs from the
        main model's raises ``AuxModelError`` and the server does not start.
        """
        s = self.settings
        if aux is None:
            aux = load_aux_models(s.aux_models, bundle, s.data_dir)
        check_aux(bundle, aux)
        self.aux = aux  # fusion's models; their templates stay server-side
        # Artifacts processors look up by name (validate() reads them through env).
        if self.priors is None:
            self.priors = ArtifactRegistry.open(
                Path(s.data_dir) / "priors",
                "prior",
                NgramPrior.from_artifact,
                NgramPrior.to_artifact,
                tmp_grace_s=s.artifact_tmp_grace_s,
            )
        if self.control_vectors is None:
            self.control_vectors = ArtifactRegistry.open(
                Path(s.data_dir) / "control-vectors",
                "control_vector",
                ControlVector.from_artifact,
                ControlVector.to_artifact,
                tmp_grace_s=s.artifact_tmp_grace_s,
            )
        cfg = bundle.model.config
        self.geometry = ModelGeometry(int(cfg.num_hidden_layers), int(cfg.hidden_size))
        engine = Engine(
            bundle.model,
            bundle.tokenizer,
            EngineConfig(
                max_batch_size=s.max_batch_size,
                max_queue=s.max_queue,
                max_prefill_tokens=s.max_prefill_tokens,
                request_timeout_s=s.request_timeout_s,
                fusion_memory_mb=s.fusion_memory_mb,
            ),
            aux_models={a.name: a.bundle.model for a in aux},
        )
        if self.metrics is not None:
            engine.observer = self.metrics
            self.metrics.model_load.set(bundle.load_seconds)
        engine.start()
        self.env = ProcessorEnv(
            vocab_size=bundle.vocab_size,
            tokenizer_fingerprint=bundle.tokenizer_fingerprint(),
            priors=self.priors,
            control_vectors=self.control_vectors,
            aux_roles=aux_roles(aux),
            geometry=self.geometry,
        )
        self.bundle, self.engine = bundle, engine
        self.status = "ok"

    def load_in_background(self, on_error: Any = None) -> threading.Thread:
        """Load the configured model on a thread so /health can answer 503 meanwhile."""

        def work() -> None:
            s = self.settings
            try:
                bundle = load_model(
                    s.model, s.data_dir, device=s.device, dtype=s.dtype,
                    weights=s.weights, name=s.model_name,
                )
                self.attach(bundle)
            except Exception as exc:
                log.exception("model loading failed")
                self.status, self.detail = "error", f"model loading failed: {exc}"
                if on_error is not None:
                    on_error(exc)

        thread = threading.Thread(target=work, name="steer-loader", daemon=True)
        thread.start()
        return thread

    def ready(self) -> tuple[ModelBundle, Engine, ProcessorEnv]:
        """The loaded parts, or a 503 while loading/after a failure."""
        if self.status == "draining":
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if self.bundle is None or self.engine is None or self.env is None:
            raise APIError(
                503,
                self.detail or "the model is still loading",
                headers={"Retry-After": str(self.settings.retry_after_s or 1)},
            )
        if not self.engine.alive:
            raise APIError(503, self.engine.dead or "the engine is not running")
        return self.bundle, self.engine, self.env

    def begin_drain(self, grace_s: float) -> None:
        """SIGTERM: answer 503 to new requests from now on, let the running ones finish,
        and abort what is still running after ``grace_s`` seconds (each aborted request
        ends with finish_reason "abort", streams with ``[DONE]``)."""
        if self.status == "draining":
            return
        self.status, self.detail = "draining", "the server is shutting down"
        log.info("draining: new requests get 503; in-flight ones have %.1f s", grace_s)

        def abort() -> None:
            if self.engine is not None and (self.engine.running or self.engine.waiting):
                log.warning("grace period over: aborting %d request(s)",
                            self.engine.running + self.engine.waiting)
                self.engine.stop()

        self._drain_timer = threading.Timer(grace_s, abort)
        self._drain_timer.daemon = True
        self._drain_timer.start()

    def shutdown(self) -> None:
        """Stop the engine (aborting what is left)."""
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self.engine is not None:
            self.engine.stop()


def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the app's ServerState."""
    return request.app.state.steer


StateDep = Annotated[ServerState, Depends(get_state)]


class EventStream:
    """Bridge from the engine thread to one asyncio consumer.

    The engine calls ``put`` on its thread; ``put`` hops onto the event loop with
    ``call_soon_threadsafe``. If the loop is closed the call raises, which the engine
    treats as "consumer gone" and drops the row.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self.handle: RequestHandle | None = None
        self.done = False

    def put(self, event: EngineEvent) -> None:
        if self.loop.is_closed():
            raise RuntimeError("event loop closed")
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self) -> AsyncIterator[EngineEvent]:
        """Yield events until the FinishEvent or ErrorEvent (inclusive)."""
        while True:
            ev = await self.queue.get()
            yield ev
            if isinstance(ev, (FinishEvent, ErrorEvent)):
                self.done = True
                return

    def cancel(self) -> None:
        """Tell the engine to drop the request (no-op once it finished)."""
        if self.handle is not None and not self.done:
            self.handle.cancel()


@contextlib.contextmanager
def engine_errors(state: ServerState) -> Iterator[None]:
    """Map the engine's refusals to HTTP: a full queue is 429 (``Retry-After``), an
    engine that is not running 503. Every submission (requests, extraction jobs) goes
    through this, so they fail alike."""
    try:
        yield
    except QueueFullError as err:
        raise APIError(
            429, str(err), headers={"Retry-After": str(max(1, state.settings.retry_after_s))}
        ) from None
    except EngineUnavailableError as err:
        raise APIError(503, str(err), headers={"Retry-After": "5"}) from None


def submit_all(
    state: ServerState, engine: Engine, items: list[tuple[GenerationRequest, EventSink]]
) -> list[RequestHandle]:
    """``engine.submit_many`` with a full queue mapped to 429 and a dead engine to 503."""
    with engine_errors(state):
        return engine.submit_many(items)


def submit(state: ServerState, engine: Engine, req: GenerationRequest) -> EventStream:
    """Submit one request to the engine; see ``submit_all`` for the error mapping."""
    stream = EventStream(asyncio.get_running_loop())
    stream.handle = submit_all(state, engine, [(req, stream.put)])[0]
    return stream
