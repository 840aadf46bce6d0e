"""The FastAPI application factory."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

import processors  # noqa: F401  (registers the shipped processors)
from server import __version__
from server.api.auth import APIKeyAuth, is_protected
from server.api.errors import APIError, install_error_handlers
from server.api.metrics import ServerMetrics
from server.api.metrics import router as metrics_router
from server.api.openai_compat import router as openai_router
from server.api.openai_protocol import ChatCompletionChunk, CompletionChunk
from server.api.playground import install_playground
from server.api.priors import router as priors_router
from server.api.protocol import StreamEvent
from server.api.routes import router
from server.api.state import ServerState
from server.api.sweep import router as sweep_router
from server.api.vectors import router as vectors_router
from server.auxiliary import AuxBundle
from server.loading import ModelBundle
from server.settings import Settings
from server.threads import release_thread_pool

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


MAX_JSON_DEPTH = 64  # the deepest legitimate body (sweep → steering → bias) is ~6
_SURROGATE = re.compile("[\ud800-\udfff]")
# The smallest integer float() cannot represent: 2**1024 (float max is just below it).
# A JSON integer at or beyond it in a free-form field would raise OverflowError the
# moment anything calls float() on it; no legitimate field needs one.
_FLOAT_OVERFLOW = 2**1024
_MAX_INT_DIGITS = 400  # beyond float range already; also far below int()'s 4300-digit cap


class _HugeInt:
    """A JSON integer too long to convert (its digit count), flagged by the walk."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(text: str) -> int | _HugeInt:
    digits = len(text.lstrip("-"))
    return _HugeInt(digits) if digits > _MAX_INT_DIGITS else int(text)


def is_json_media_type(ctype: bytes) -> bool:
    """``application/json`` or any ``application/*+json`` (RFC 6839), parameters ignored:
    FastAPI parses all of them as JSON, so all of them go through the same guard."""
    media = ctype.split(b";")[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def json_body_problem(body: bytes) -> APIError | None:
    """Why a JSON body must be refused before FastAPI parses it, or None.

    JSON may spell lone UTF-16 surrogates (``"\\ud800"``), which no tokenizer or UTF-8
    response can carry, may nest deeper than the parsers' recursion limits, and may
    write integers no float can hold (``1`` followed by 400 zeros); all three are a 400
    naming the field here instead of a ``TypeError``/``RecursionError``/``OverflowError``
    deep inside. Syntax errors are left to FastAPI's own message.
    """
    try:
        doc = json.loads(body, parse_int=_parse_int)
    except RecursionError:
        return APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                        param="body")
    except UnicodeDecodeError as exc:
        return APIError(400, f"the request body is not valid UTF-8: {exc.reason} at byte "
                        f"{exc.start}", param="body")
    except ValueError:
        return None
    stack: list[tuple[Any, tuple[str, ...]]] = [(doc, ())]
    while stack:  # iterative: the depth is what is being checked
        node, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            return APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                            param=".".join(path[:8]) or "body")
        if isinstance(node, str):
            if _SURROGATE.search(node):
                return APIError(400, "strings must be valid Unicode: a lone UTF-16 surrogate "
                                "(\\ud800-\\udfff) is not a character", param=".".join(path)
                                or "body")
        elif isinstance(node, _HugeInt) or (
            isinstance(node, int) and not -_FLOAT_OVERFLOW < node < _FLOAT_OVERFLOW
        ):
            digits = node.digits if isinstance(node, _HugeInt) else len(str(abs(node)))
            return APIError(400, "numbers must be within the float range (about ±1.8e308); "
                            f"got an integer of {digits} digits",
                            param=".".join(path) or "body")
        elif isinstance(node, dict):
            for key, value in node.items():
                if _SURROGATE.search(key):
                    return APIError(400, "object keys must be valid Unicode: a lone UTF-16 "
                                    "surrogate is not a character", param=".".join(path)
                                    or "body")
                stack.append((value, (*path, key)))
        elif isinstance(node, list):
            stack.extend((v, (*path, str(i))) for i, v in enumerate(node))
    return None


class JSONBodyGuard:
    """Refuse JSON bodies with lone surrogates, invalid UTF-8, absurd nesting or integers
    beyond float range (400), for every JSON media type (:func:`is_json_media_type`).

    Runs inside :class:`BodySizeLimit` (so the buffered body is bounded) and after
    :class:`DefaultJSONContentType`; the body is replayed to the app unchanged, and
    later ``receive`` calls (disconnect watching) reach the server as before.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") not in ("POST", "PUT", "PATCH")
            or scope["path"].endswith("/gguf")  # binary uploads, whatever their label
        ):
            await self.app(scope, receive, send)
            return
        ctype = next((v for k, v in scope.get("headers", []) if k == b"content-type"), b"")
        if not is_json_media_type(ctype):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected while sending
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = json_body_problem(body) if body.strip() else None
        if problem is not None:
            await problem.response()(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# The model of every ``data:`` frame of each streaming endpoint (SSE is not a JSON body,
# so FastAPI cannot see them): OpenAPI documents them under ``text/event-stream``.
STREAM_FRAMES: dict[str, type[BaseModel]] = {
    "/v1/generate": StreamEvent,
    "/v1/completions": CompletionChunk,
    "/v1/chat/completions": ChatCompletionChunk,
}


def tidy_openapi(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Make the generated OpenAPI schema say what the server does (in place).

    FastAPI documents a 422 ``HTTPValidationError`` for every operation with input;
    this server answers 400 in the error envelope instead (``errors.validation_error``).
    Every operation with a body can also get a 400 (bad JSON) and a 413 (body size),
    and with API keys set every protected path a 401, all as ``ErrorResponse``.
    A streaming endpoint's ``text/event-stream`` answer names its frame model
    (:data:`STREAM_FRAMES`).
    """
    envelope = {
        "description": "Error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    exempt = set(settings.auth_exempt)
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            extra = []
            if "requestBody" in op:
                extra += ["400", "413"]
            if settings.api_keys and is_protected(path, exempt):
                extra.append("401")
            for code in extra:
                responses.setdefault(code, envelope)
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    for path, frame in STREAM_FRAMES.items():
        ok = schema.get("paths", {}).get(path, {}).get("post", {}).get("responses", {}).get("200")
        if ok is None:
            continue
        doc = frame.model_json_schema(ref_template="#/components/schemas/{model}",
                                      mode="serialization")
        for name, sub in doc.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components.setdefault(frame.__name__, doc)
        ok.setdefault("content", {})["text/event-stream"] = {
            "schema": {"$ref": f"#/components/schemas/{frame.__name__}"}
        }
    return schema


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
        # The event loop's thread (the main one) does no parallel torch work of its own
        # once serving: give back the OpenMP workers importing and set-up made, so the
        # engine thread's pool is the only one (server.threads).
        release_thread_pool()
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
    install_playground(app)
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            tidy_openapi(base_openapi(), settings)
        assert app.openapi_schema is not None  # set by base_openapi()
        return app.openapi_schema

    # FastAPI's documented way to customize the schema is to replace this method.
    app.openapi = openapi  # type: ignore[method-assign]
    # add_middleware wraps: the last added runs first (CORS answers preflights before auth).
    app.add_middleware(JSONBodyGuard)
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
