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
    SweepResponse,
)

DEFAULT_SWEEP_CONCURRENCY = 4


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
        """``POST /v1/generate`` with ``stream: true``: a :class:`Stream` of events, sent
        on first use (``with`` or iteration), where HTTP errors raise; an in-band error
        frame raises while iterating."""
        timeout = options.get("timeout")
        spec = base.stream_spec(GenerateRequest.build(prompt, **options), timeout)
        return Stream(lambda: self.request(spec, stream=True))

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
        server has no ``/v1/sweep`` (404/405, found out once with the first prompt), the
        points are sent as single generate requests. ``server_sweep=False`` always does
        that (e.g. for grids over the server's ``max_sweep_points``); ``True`` never does.
        ``concurrency`` is the most calls in flight at once (whole prompts via
        ``/v1/sweep``, else single points), the same in :class:`AsyncSteerClient`.
        ``progress`` shows a tqdm bar (default: when stderr is a terminal and tqdm is
        installed).
        """
        plan = base.SweepPlan(prompts, steering, grid, lambdas, options,
                              concurrency=concurrency, server_sweep=server_sweep)
        with Progress(plan.total, "sweep", progress) as bar:
            if (probe := plan.probe(self._sweep_endpoint)) is not None:
                try:
                    answer = self.call(probe.spec, SweepResponse)
                except exc.APIStatusError as e:
                    self._sweep_endpoint = plan.probe_failed(e)
                else:
                    self._sweep_endpoint = True
                    bar.update(plan.store(probe, answer))

            def one(unit: base.SweepUnit) -> None:
                bar.update(plan.store(unit, self.call(unit.spec, plan.model_of(unit))))

            with ThreadPoolExecutor(max_workers=plan.concurrency) as pool:
                for _ in pool.map(one, plan.units(self._sweep_endpoint)):
                    pass
        return plan.result()

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
        """See :meth:`SteerClient.sweep` (the same plan, the same ``concurrency``)."""
        plan = base.SweepPlan(prompts, steering, grid, lambdas, options,
                              concurrency=concurrency, server_sweep=server_sweep)
        sem = asyncio.Semaphore(plan.concurrency)
        with Progress(plan.total, "sweep", progress) as bar:
            if (probe := plan.probe(self._sweep_endpoint)) is not None:
                try:
                    answer = await self.call(probe.spec, SweepResponse)
                except exc.APIStatusError as e:
                    self._sweep_endpoint = plan.probe_failed(e)
                else:
                    self._sweep_endpoint = True
                    bar.update(plan.store(probe, answer))

            async def one(unit: base.SweepUnit) -> None:
                async with sem:
                    answer = await self.call(unit.spec, plan.model_of(unit))
                bar.update(plan.store(unit, answer))

            await asyncio.gather(*(one(u) for u in plan.units(self._sweep_endpoint)))
        return plan.result()

    async def models(self) -> ModelList:
        """``GET /v1/models``."""
        return await self.call(base.models_spec(), ModelList)

    async def health(self, timeout: float | None = None) -> Health:
        """``GET /health`` (503 answers too, with ``ready`` False)."""
        return await self.call(base.health_spec(timeout), Health)
