"""SDK fixtures: one real server over the tiny random model, and a small fake server
whose answers the tests script (retries, in-band stream errors, a server-side sweep)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import LiveServer, live_server


@pytest.fixture(scope="session")
def real_server(tiny_bundle, tmp_path_factory) -> Iterator[LiveServer]:
    """A real steerserve on a free port (tiny random model), shared by the SDK tests."""
    with live_server(tiny_bundle, tmp_path_factory.mktemp("sdk")) as srv:
        yield srv


def gen_body(text: str = "ok", token_ids: list[int] | None = None, **extra: Any) -> dict:
    ids = token_ids if token_ids is not None else [1, 2]
    return {"id": "gen-fake", "model": "fake", "text": text, "token_ids": ids,
            "finish_reason": "length",
            "usage": {"prompt_tokens": 1, "completion_tokens": len(ids),
                      "total_tokens": 1 + len(ids)}, **extra}


def envelope(status: int, message: str, param: str | None = None, etype: str = "x") -> dict:
    return {"error": {"message": message, "type": etype, "param": param, "code": status}}


class Script:
    """What the fake server answers; tests set ``plan`` and read ``hits``/``headers``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.hits: dict[str, int] = {}
        self.headers: list[dict[str, str]] = []
        self.bodies: list[Any] = []
        #: per path, a list of (status, body, headers) answered in turn; the last repeats
        self.plan: dict[str, list[tuple[int, Any, dict[str, str]]]] = {}


def make_fake_app(script: Script) -> Starlette:
    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "model": "fake"})

    async def scripted(request: Request) -> Response:
        path = request.url.path
        n = script.hits.get(path, 0)
        script.hits[path] = n + 1
        script.headers.append(dict(request.headers))
        raw = await request.body()
        script.bodies.append(raw if path.endswith("/gguf") else (json.loads(raw) if raw else None))
        plan = script.plan.get(path)
        if not plan:
            return JSONResponse(envelope(404, "no such endpoint", etype="not_found_error"), 404)
        status, body, headers = plan[min(n, len(plan) - 1)]
        if callable(body):
            body = body(script.bodies[-1])
        if isinstance(body, bytes):
            return Response(body, status, headers=headers, media_type="application/octet-stream")
        if isinstance(body, list) and body and isinstance(body[0], str):  # SSE frames
            async def frames() -> Any:
                for frame in body:
                    yield f"data: {frame}\n\n".encode()
            return StreamingResponse(frames(), status, headers=headers,
                                     media_type="text/event-stream")
        return JSONResponse(body, status, headers=headers)

    methods = ["GET", "POST", "PUT", "DELETE"]
    return Starlette(routes=[
        Route("/health", health),
        Route("/{path:path}", scripted, methods=methods),
    ])


@pytest.fixture(scope="session")
def _fake(request) -> Iterator[tuple[LiveServer, Script]]:
    script = Script()
    with LiveServer(make_fake_app(script)) as srv:
        yield srv, script


@pytest.fixture
def fake(_fake) -> tuple[LiveServer, Script]:
    """The fake server with a fresh script."""
    srv, script = _fake
    script.reset()
    return srv, script
