"""The FastAPI application factory."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI

import processors  # noqa: F401  (registers the shipped processors)
from server import __version__
from server.api.auth import APIKeyAuth
from server.api.errors import APIError, install_error_handlers
from server.api.metrics import ServerMetrics
from server.api.metrics import router as metrics_router
from server.api.openai_compat import router as openai_router
from server.api.priors import router as priors_router
from server.api.routes import router
from server.api.state import ServerState
from server.api.sweep import router as sweep_router
from server.api.vectors import router as vectors_router
from server.auxiliary import AuxBundle
from server.loading import ModelBundle
from server.settings import Settings

log = logging.getLogger("steerserve.api")

ASGIApp = Callable[[dict[str, Any], Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]],
                   Awaitable[None]]


class BodySizeLimit:
    """Reject request bodies over ``limit`` bytes with 413 (declared or streamed)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = APIError(
            413, f"the request body exceeds the limit of {self.limit} bytes", param="body"
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await too_large.response()(scope, receive, send)
                    return
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await too_large.response()(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class DefaultJSONContentType:
    """Treat a body sent without a content type, or as a form (``curl -d``'s default),
    as JSON: every native endpoint except binary uploads takes JSON, and llama.cpp's
    server and vLLM accept ``curl -d '{...}'`` the same way."""

    _LENIENT = (b"", b"application/x-www-form-urlencoded")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") in ("POST", "PUT", "PATCH"):
            headers = list(scope.get("headers", []))
            ctype = next((v for k, v in headers if k == b"content-type"), b"")
            if ctype.split(b";")[0].strip().lower() in self._LENIENT and not scope[
                "path"
            ].endswith("/gguf"):
                headers = [(k, v) for k, v in headers if k != b"content-type"]
                headers.append((b"content-type", b"application/json"))
                scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    bundle: ModelBundle | None = None,
    aux_bundles: list[AuxBundle] | None = None,
) -> FastAPI:
    """Build the app. With ``bundle`` the engine starts at once (tests); otherwise the
    configured model loads on a background thread while ``/health`` answers 503.
    ``aux_bundles`` are pre-loaded fusion models (default: load ``settings.aux_models``)."""
    settings = settings or Settings()
    state = ServerState(settings)
    state.metrics = ServerMetrics(
        running=lambda: state.engine.running if state.engine else 0,
        waiting=lambda: state.engine.waiting if state.engine else 0,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if bundle is not None:
            state.attach(bundle, aux_bundles)
        else:
            state.load_in_background(on_error=getattr(app.state, "on_load_error", None))
        try:
            yield
        finally:
            state.shutdown()

    app = FastAPI(
        title="steerserve",
        version=__version__,
        description="Decoding-time steering inference server.",
        lifespan=lifespan,
    )
    app.state.steer = state
    app.state.metrics = state.metrics
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(sweep_router)
    app.include_router(priors_router)
    app.include_router(vectors_router)
    app.include_router(openai_router)
    app.include_router(metrics_router)
    # add_middleware wraps: the last added runs first (CORS answers preflights before auth).
    app.add_middleware(DefaultJSONContentType)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(APIKeyAuth, keys=settings.api_keys, exempt=settings.auth_exempt)
    if settings.cors_origin_list:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origin_list),
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
