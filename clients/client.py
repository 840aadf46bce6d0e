"""``SteerClient`` (sync) and ``AsyncSteerClient`` (async) for the native API.

>>> from clients import SteerClient, Ngram               # doctest: +SKIP
>>> with SteerClient() as client:
...     r = client.generate("In the beginning", max_tokens=32,
...                         steering=[Ngram(prior="kjv", lam=0.1)])
...     print(r.text)

Both share :class:`~clients._base.BaseClient` (configuration, retry policy, parsing);
they differ only in how they wait.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import httpx
from typing_extensions import Unpack

from clients import _base as base
from clients import exceptions as exc
from clients._base import BaseClient, M, RequestSpec
from clients._grid import apply_params, expand_grid, resolve_grid
from clients._progress import Progress
from clients.resources import AsyncControlVectors, AsyncPriors, ControlVectors, Priors
from clients.steering import SteeringLike
from clients.streaming import AsyncStream, Stream
from clients.sweep import SweepResult
from clients.types import (
    GenerateOptions,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelList,
    SamplingOptions,
    SweepRequest,
    SweepResponse,
)

DEFAULT_SWEEP_CONCURRENCY = 4


def _missing_endpoint(error: exc.APIStatusError) -> bool:
    """A 404 for the route itself (no ``param``: not an unknown prior or vector) or a 405:
    the server predates ``/v1/sweep``."""
    return error.status == 405 or (error.status == 404 and error.param is None)


def _sweep_bodies(
    prompts: Sequence[str | list[int]], steering: Sequence[SteeringLike] | None,
    options: dict[str, Any],
) -> list[dict[str, Any]]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts, not one string")
    if not prompts:
        raise ValueError("prompts is empty")
    return [
        GenerateRequest.build(p, steering=list(steering or []), **options).to_wire()
        for p in prompts
    ]


def _order_points(
    response: SweepResponse, points: list[dict[str, Any]]
) -> list[GenerateResponse]:
    """The server's results in the client's grid order (matched by params)."""
    by_params = {json.dumps(r.params, sort_keys=True): r.response for r in response.results}
    try:
        return [by_params[json.dumps(p, sort_keys=True)] for p in points]
    except KeyError as e:
        raise exc.APIStatusError(
            f"/v1/sweep did not return grid point {e.args[0]}", status=200
        ) from None


class SteerClient(BaseClient):
    """Synchronous client. Thread-safe; reuse one instance (it pools connections).

    Args:
        base_url: server URL; default ``$STEER_BASE_URL`` or ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer``; default ``$STEER_API_KEY``.
        timeout: seconds (or an ``httpx.Timeout``) per request; per call via ``timeout=``.
        max_retries: retries on connection errors, 408, 429 and 5xx (default 2).
        http_client: an ``httpx.Client`` to use instead of the client's own.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = base.DEFAULT_TIMEOUT,
        max_retries: int = base.DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
        **policy: Any,
    ) -> None:
        super().__init__(base_url, api_key, timeout=timeout, max_retries=max_retries, **policy)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self.timeout)
        self._sweep_endpoint: bool | None = None  # unknown until the first sweep
        self._sleep: Callable[[float], None] = time.sleep
        self.priors = Priors(self)
        self.vectors = ControlVectors(self)

    # ------------------------------------------------------------------ transport

    def request(self, spec: RequestSpec, *, stream: bool = False) -> httpx.Response:
        """Send ``spec`` with retries; the response (2xx or accepted), else raise."""
        attempt = 0
        while True:
            request = self.build_request(self._http, spec, self.base_url, self.default_headers())
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                error = self.transport_error(e)
                if self.should_retry(spec, attempt, error=error):
                    self._sleep(self.retry_delay(attempt))
                    attempt += 1
                    continue
                raise error from e
            if self.is_ok(spec, response):
                return response
            if stream:
                response.read()
                response.close()
            if self.should_retry(spec, attempt, status=response.status_code):
                self._sleep(self.retry_delay(attempt, response))
                attempt += 1
                continue
            raise exc.from_response(response)

    def call(self, spec: RequestSpec, model: type[M]) -> M:
        """Send ``spec`` and parse the JSON answer into ``model``."""
        return self.parse(self.request(spec), model)

    def close(self) -> None:
        """Close the connection pool (if the client created it)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> SteerClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ endpoints

    def generate(
        self, prompt: str | list[int] | None = None, **options: Unpack[GenerateOptions]
    ) -> GenerateResponse:
        """``POST /v1/generate``: text, token ids, usage and (if asked) diagnostics."""
        timeout = options.get("timeout")
        body = GenerateRequest.build(prompt, **options)
        return self.call(base.generate_spec(body, timeout), GenerateResponse)

    def stream(
        self, prompt: str | list[int] | None = None, **options: Unpack[GenerateOptions]
    ) -> Stream:
        """``POST /v1/generate`` with ``stream: true``: a :class:`Stream` of events.
        HTTP errors raise here; an in-band error frame raises while iterating."""
        timeout = options.get("timeout")
        body = GenerateRequest.build(prompt, **options)
        return Stream(self.request(base.stream_spec(body, timeout), stream=True))

    def sweep(
        self,
        prompts: Sequence[str | list[int]],
        *,
        steering: Sequence[SteeringLike] | None = None,
        grid: dict[str, Sequence[Any]] | None = None,
        lambdas: Sequence[float] | None = None,
        concurrency: int = DEFAULT_SWEEP_CONCURRENCY,
        progress: bool | None = None,
        server_sweep: bool | None = None,
        **options: Unpack[SamplingOptions],
    ) -> SweepResult:
        """Generate every prompt at every grid point (``POST /v1/sweep`` per prompt).

        ``grid`` maps dotted paths of the generate request (``"steering.0.lambda"``,
        ``"temperature"``, ``"steering.0.bias.70"``) to values; ``lambdas=`` is short
        for ``{"steering.<i>.lambda": lambdas}`` with ``i`` the first Ngram entry. If the
        server has no ``/v1/sweep`` (404/405), the points are sent as single generate
        requests, at most ``concurrency`` at a time. ``server_sweep=False`` always does
        that (e.g. for grids over the server's ``max_sweep_points``); ``True`` never does.
        ``progress`` shows a tqdm bar (default: when stderr is a terminal and tqdm is
        installed).
        """
        full_grid = resolve_grid(steering, grid, lambdas)
        points = expand_grid(full_grid)
        bodies = _sweep_bodies(prompts, steering, dict(options))
        timeout = options.get("timeout")
        results: list[list[GenerateResponse] | None] = [None] * len(bodies)
        with Progress(len(bodies) * len(points), "sweep", progress) as bar:
            for i, body in enumerate(bodies):
                if server_sweep is False or (self._sweep_endpoint is False and not server_sweep):
                    break
                spec = base.sweep_spec(SweepRequest(request=body, grid=full_grid), timeout)
                try:
                    answer = self.call(spec, SweepResponse)
                except exc.APIStatusError as e:
                    if server_sweep or not _missing_endpoint(e):
                        raise
                    self._sweep_endpoint = False
                    break
                self._sweep_endpoint = True
                results[i] = _order_points(answer, points)
                bar.update(len(points))
            todo = [(i, j) for i, r in enumerate(results) if r is None for j in range(len(points))]
            if todo:
                self._fallback(bodies, points, todo, results, concurrency, timeout, bar)
        done = [r for r in results if r is not None]
        assert len(done) == len(results)  # the fallback filled every prompt left
        return SweepResult.from_responses(prompts, full_grid, done)

    def _fallback(
        self, bodies: list[dict[str, Any]], points: list[dict[str, Any]],
        todo: list[tuple[int, int]], results: list[Any], concurrency: int,
        timeout: float | None, bar: Progress,
    ) -> None:
        """Single generate requests for the (prompt, point) pairs in ``todo``."""
        for i in {i for i, _ in todo}:
            results[i] = [None] * len(points)

        def one(ij: tuple[int, int]) -> None:
            i, j = ij
            wire = apply_params(bodies[i], points[j])
            spec = RequestSpec("POST", "/v1/generate", json=wire, timeout=timeout)
            results[i][j] = self.call(spec, GenerateResponse)
            bar.update(1)

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            for _ in pool.map(one, todo):
                pass

    def models(self) -> ModelList:
        """``GET /v1/models``: the main model and auxiliary models with their roles."""
        return self.call(base.models_spec(), ModelList)

    def health(self, timeout: float | None = None) -> Health:
        """``GET /health``; a loading or failed server answers (503) with ``ready`` False."""
        return self.call(base.health_spec(timeout), Health)


class AsyncSteerClient(BaseClient):
    """Asynchronous client; same arguments and methods as :class:`SteerClient`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = base.DEFAULT_TIMEOUT,
        max_retries: int = base.DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
        **policy: Any,
    ) -> None:
        super().__init__(base_url, api_key, timeout=timeout, max_retries=max_retries, **policy)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout)
        self._sweep_endpoint: bool | None = None
        self._sleep: Callable[[float], Any] = asyncio.sleep
        self.priors = AsyncPriors(self)
        self.vectors = AsyncControlVectors(self)

    async def request(self, spec: RequestSpec, *, stream: bool = False) -> httpx.Response:
        """Send ``spec`` with retries; the response (2xx or accepted), else raise."""
        attempt = 0
        while True:
            request = self.build_request(self._http, spec, self.base_url, self.default_headers())
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                error = self.transport_error(e)
                if self.should_retry(spec, attempt, error=error):
                    await self._sleep(self.retry_delay(attempt))
                    attempt += 1
                    continue
                raise error from e
            if self.is_ok(spec, response):
                return response
            if stream:
                await response.aread()
                await response.aclose()
            if self.should_retry(spec, attempt, status=response.status_code):
                await self._sleep(self.retry_delay(attempt, response))
                attempt += 1
                continue
            raise exc.from_response(response)

    async def call(self, spec: RequestSpec, model: type[M]) -> M:
        """Send ``spec`` and parse the JSON answer into ``model``."""
        return self.parse(await self.request(spec), model)

    async def aclose(self) -> None:
        """Close the connection pool (if the client created it)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncSteerClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def generate(
        self, prompt: str | list[int] | None = None, **options: Unpack[GenerateOptions]
    ) -> GenerateResponse:
        """``POST /v1/generate``."""
        timeout = options.get("timeout")
        body = GenerateRequest.build(prompt, **options)
        return await self.call(base.generate_spec(body, timeout), GenerateResponse)

    def stream(
        self, prompt: str | list[int] | None = None, **options: Unpack[GenerateOptions]
    ) -> AsyncStream:
        """A streaming generate; sent on first ``async for`` / ``async with``."""
        timeout = options.get("timeout")
        spec = base.stream_spec(GenerateRequest.build(prompt, **options), timeout)
        return AsyncStream(lambda: self.request(spec, stream=True))

    async def sweep(
        self,
        prompts: Sequence[str | list[int]],
        *,
        steering: Sequence[SteeringLike] | None = None,
        grid: dict[str, Sequence[Any]] | None = None,
        lambdas: Sequence[float] | None = None,
        concurrency: int = DEFAULT_SWEEP_CONCURRENCY,
        progress: bool | None = None,
        server_sweep: bool | None = None,
        **options: Unpack[SamplingOptions],
    ) -> SweepResult:
        """See :meth:`SteerClient.sweep`; prompts are swept concurrently."""
        full_grid = resolve_grid(steering, grid, lambdas)
        points = expand_grid(full_grid)
        bodies = _sweep_bodies(prompts, steering, dict(options))
        timeout = options.get("timeout")
        sem = asyncio.Semaphore(max(1, concurrency))
        results: list[list[GenerateResponse]] = [[] for _ in bodies]

        async def generate_point(body: dict[str, Any], point: dict[str, Any]) -> GenerateResponse:
            wire = apply_params(body, point)
            async with sem:
                r = await self.call(RequestSpec("POST", "/v1/generate", json=wire,
                                                timeout=timeout), GenerateResponse)
            bar.update(1)
            return r

        async def one_prompt(i: int) -> None:
            if server_sweep or (server_sweep is None and self._sweep_endpoint is not False):
                spec = base.sweep_spec(SweepRequest(request=bodies[i], grid=full_grid), timeout)
                try:
                    async with sem:
                        answer = await self.call(spec, SweepResponse)
                except exc.APIStatusError as e:
                    if server_sweep or not _missing_endpoint(e):
                        raise
                    self._sweep_endpoint = False
                else:
                    self._sweep_endpoint = True
                    results[i] = _order_points(answer, points)
                    bar.update(len(points))
                    return
            results[i] = list(
                await asyncio.gather(*(generate_point(bodies[i], p) for p in points))
            )

        with Progress(len(bodies) * len(points), "sweep", progress) as bar:
            if server_sweep is None and self._sweep_endpoint is None:  # probe once first
                await one_prompt(0)
                rest = range(1, len(bodies))
            else:
                rest = range(len(bodies))
            await asyncio.gather(*(one_prompt(i) for i in rest))
        return SweepResult.from_responses(prompts, full_grid, results)

    async def models(self) -> ModelList:
        """``GET /v1/models``."""
        return await self.call(base.models_spec(), ModelList)

    async def health(self, timeout: float | None = None) -> Health:
        """``GET /health`` (503 answers too, with ``ready`` False)."""
        return await self.call(base.health_spec(timeout), Health)
