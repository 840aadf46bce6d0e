"""``POST /v1/sweep``: one generate request × a grid of parameter values, one batch.

The grid maps dotted paths into the generate request (``"steering.0.lambda"``,
``"temperature"``, ``"steering.1.bias.42"``) to lists of values; the points are the
Cartesian product. All points are submitted to the engine atomically, so when the batch
has room they are admitted together and — having the same prompt — share one prefill.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from server.api.convert import to_generation_request
from server.api.disconnect import cancel_on_disconnect
from server.api.errors import APIError, validation_error
from server.api.protocol import GenerateRequest, GenerateResponse
from server.api.routes import ERROR_RESPONSES, collect
from server.api.state import EventStream, StateDep, submit_all

router = APIRouter()

GridValue = Annotated[list[Any], Field(min_length=1)]


class SweepRequest(BaseModel):
    """A base generate request and the grid of values to substitute into it."""

    model_config = ConfigDict(extra="forbid")

    request: dict[str, Any] = Field(description="A /v1/generate request body.")
    grid: dict[str, GridValue] = Field(
        description="Dotted path into `request` → values, e.g. {'steering.0.lambda': [0, 0.1]}."
    )


class SweepPoint(BaseModel):
    """One grid point and its generate response."""

    params: dict[str, Any]
    response: GenerateResponse


class SweepResponse(BaseModel):
    """``POST /v1/sweep``: results in grid order (the last axis varies fastest)."""

    results: list[SweepPoint]


def set_path(body: dict[str, Any], path: str, value: Any, param: str) -> None:
    """Set ``body[a][b]...`` for ``path = 'a.b...'`` (list indices as integers)."""
    keys = path.split(".")
    node: Any = body
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise APIError(400, f"'{path}': no list element {key}", param=param)
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise APIError(400, f"'{path}' does not lead into an object or list", param=param)


def expand(sweep: SweepRequest, limit: int) -> list[tuple[dict[str, Any], GenerateRequest]]:
    """Validate the grid and return ``(params, request)`` for every point."""
    if not sweep.grid:
        raise APIError(400, "'grid' must name at least one parameter", param="grid")
    axes = list(sweep.grid.items())
    n = 1
    for _, values in axes:
        n *= len(values)
    if n > limit:
        raise APIError(400, f"the grid has {n} points; the limit is {limit}", param="grid")
    if sweep.request.get("stream"):
        raise APIError(400, "a sweep cannot stream", param="request.stream")
    points = []
    for combo in itertools.product(*[values for _, values in axes]):
        body = copy.deepcopy(sweep.request)
        params = {}
        for (path, _), value in zip(axes, combo, strict=True):
            set_path(body, path, value, f"grid.{path}")
            params[path] = value
        try:
            req = GenerateRequest.model_validate(body)
        except ValidationError as exc:
            err = validation_error(exc)
            raise APIError(400, err.message, param=f"request.{err.param}") from None
        points.append((params, req))
    return points


@router.post("/v1/sweep", response_model=SweepResponse, responses=ERROR_RESPONSES)
async def sweep(body: SweepRequest, request: Request, state: StateDep) -> JSONResponse:
    """Run every grid point of one request in one batch; results in grid order."""
    bundle, engine, env = state.ready()
    points = expand(body, state.settings.max_sweep_points)
    sweep_id = f"sweep-{uuid.uuid4().hex[:20]}"

    def convert() -> list[Any]:
        out = []
        prompts: dict[str, list[int]] = {}  # points share their prompt: tokenize it once
        for i, (params, wire) in enumerate(points):
            try:
                out.append(to_generation_request(
                    wire, bundle, state.settings, env, request_id=f"{sweep_id}-{i}",
                    prompt_cache=prompts, aux=state.aux))
            except APIError as err:
                where = ", ".join(f"{k}={v!r}" for k, v in params.items())
                raise APIError(err.status, f"at grid point {where}: {err.message}",
                               param=f"request.{err.param}" if err.param else None) from None
        return out

    reqs = await run_in_threadpool(convert)
    loop = asyncio.get_running_loop()
    streams = [EventStream(loop) for _ in reqs]
    handles = submit_all(state, engine, [(r, s.put) for r, s in zip(reqs, streams, strict=True)])
    for s, h in zip(streams, handles, strict=True):
        s.handle = h

    def cancel_all() -> None:
        for s in streams:
            s.cancel()

    async with cancel_on_disconnect(request, cancel_all):
        responses = await asyncio.gather(*[
            collect(s, r.request_id, bundle.name, r.warnings)
            for s, r in zip(streams, reqs, strict=True)
        ])
    result = SweepResponse(results=[
        SweepPoint(params=params, response=resp)
        for (params, _), resp in zip(points, responses, strict=True)
    ])
    return JSONResponse(result.model_dump(exclude_none=True))
