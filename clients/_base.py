"""What the sync and async clients share: configuration, request building, the retry
policy and response parsing. No I/O happens here, so both clients run the same logic.

Retries (see :meth:`BaseClient.should_retry` and :meth:`BaseClient.retry_delay`): a
request is retried up to ``max_retries`` times on connection errors (refused, reset,
connect timeout; *not* a read timeout, which usually means a long generation that a
retry would only repeat) and on HTTP 408, 429 and 5xx. The wait honours the server's
``Retry-After`` in seconds; otherwise it is ``backoff_base · 2^attempt`` capped at
``backoff_max``, with up to 25% random jitter so that clients that failed together do
not retry together.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from clients import exceptions as exc
from clients._grid import apply_params, expand_grid, resolve_grid
from clients.steering import SteeringLike
from clients.sweep import SweepResult
from clients.types import (
    ControlVectorCreate,
    GenerateRequest,
    GenerateResponse,
    PriorCreate,
    SweepRequest,
    SweepResponse,
)

__version__ = "0.1.0"

ENV_BASE_URL = "STEER_BASE_URL"
ENV_API_KEY = "STEER_API_KEY"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 2
#: Longest Retry-After the client will sleep for; a longer one is capped to this.
RETRY_AFTER_CAP_S = 60.0
RETRY_STATUSES = frozenset({408, 429})

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class RequestSpec:
    """One HTTP call, before it is sent: what the endpoint helpers below produce."""

    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None
    #: Non-2xx statuses that are answers, not errors (``/health`` answers 503 with a body).
    accept: frozenset[int] = frozenset()
    #: False for calls where a retry could not help (e.g. health probes).
    retry: bool = True


class BaseClient:
    """Configuration and policy shared by :class:`SteerClient` and :class:`AsyncSteerClient`.

    ``base_url`` and ``api_key`` default to ``$STEER_BASE_URL`` (else
    ``http://127.0.0.1:8000``) and ``$STEER_API_KEY``; a key is sent as
    ``Authorization: Bearer <key>``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = (base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else (os.environ.get(ENV_API_KEY) or None)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.extra_headers = dict(headers or {})

    def default_headers(self) -> dict[str, str]:
        """Headers sent with every request."""
        h = {"Accept": "application/json", "User-Agent": f"steerserve-sdk/{__version__}"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        h.update(self.extra_headers)
        return h

    def build_request(
        self, http: httpx.Client | httpx.AsyncClient, spec: RequestSpec, base_url: str,
        headers: Mapping[str, str],
    ) -> httpx.Request:
        """The ``httpx.Request`` for a spec: ``base_url + spec.path``, the client's headers
        updated with the spec's, and the spec's timeout if it has one."""
        timeout: Any = spec.timeout if spec.timeout is not None else httpx.USE_CLIENT_DEFAULT
        return http.build_request(
            spec.method,
            base_url + spec.path,
            json=spec.json,
            content=spec.content,
            headers={**headers, **spec.headers},
            timeout=timeout,
        )

    # ---------------------------------------------------------------- retry policy

    def should_retry(
        self, spec: RequestSpec, attempt: int, *, status: int | None = None,
        error: Exception | None = None,
    ) -> bool:
        """Whether attempt number ``attempt`` (0-based) that failed this way is retried."""
        if not spec.retry or attempt >= self.max_retries:
            return False
        if error is not None:
            return isinstance(error, exc.APIConnectionError) and not isinstance(
                error, _NoRetryTimeout
            )
        assert status is not None
        return status in RETRY_STATUSES or status >= 500

    def retry_delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before retry ``attempt + 1``: Retry-After, else backoff+jitter."""
        if response is not None:
            after = exc.parse_retry_after(response.headers.get("retry-after"))
            if after is not None:
                return min(after, RETRY_AFTER_CAP_S)
        delay = min(self.backoff_max, self.backoff_base * (2.0**attempt))
        return delay * (1.0 - 0.25 * random.random())

    # ---------------------------------------------------------------- parsing

    @staticmethod
    def transport_error(error: httpx.TransportError) -> exc.APIConnectionError:
        """An httpx transport failure as the SDK's exception."""
        request = _request_of(error)
        where = f" ({request.method} {request.url})" if request is not None else ""
        if isinstance(error, (httpx.ConnectTimeout, httpx.PoolTimeout)):
            return exc.APITimeoutError(f"timed out connecting{where}", request=request)
        if isinstance(error, httpx.TimeoutException):
            return _NoRetryTimeout(f"timed out waiting for the server{where}", request=request)
        return exc.APIConnectionError(
            f"could not reach the server{where}: {error or type(error).__name__}",
            request=request,
        )

    @staticmethod
    def is_ok(spec: RequestSpec, response: httpx.Response) -> bool:
        """2xx, or a status the spec accepts as an answer."""
        return response.is_success or response.status_code in spec.accept

    @staticmethod
    def parse(response: httpx.Response, model: type[M]) -> M:
        """Validate a JSON response body into ``model``."""
        try:
            data = response.json()
        except ValueError as e:
            raise exc.APIStatusError(
                f"the server answered with invalid JSON: {response.text[:200]!r}",
                status=response.status_code, response=response,
            ) from e
        return model.model_validate(data)


class _NoRetryTimeout(exc.APITimeoutError):
    """A read/write timeout: reported as APITimeoutError but not retried."""


def _request_of(error: httpx.TransportError) -> httpx.Request | None:
    try:
        return error.request
    except RuntimeError:  # httpx raises when the error has no request attached
        return None


# -------------------------------------------------------------------- endpoints


def _name(name: str) -> str:
    """An artifact name as one URL path segment."""
    return quote(name, safe="")


def generate_spec(body: GenerateRequest, timeout: float | None = None) -> RequestSpec:
    """``POST /v1/generate``."""
    return RequestSpec("POST", "/v1/generate", json=body.to_wire(), timeout=timeout)


def stream_spec(body: GenerateRequest, timeout: float | None = None) -> RequestSpec:
    """``POST /v1/generate`` with ``stream: true`` (answered as SSE)."""
    wire = {**body.to_wire(), "stream": True}
    return RequestSpec(
        "POST", "/v1/generate", json=wire, timeout=timeout,
        headers={"Accept": "text/event-stream"},
    )


def sweep_spec(body: SweepRequest, timeout: float | None = None) -> RequestSpec:
    """``POST /v1/sweep``."""
    return RequestSpec("POST", "/v1/sweep", json=body.to_wire(), timeout=timeout)


def create_prior_spec(body: PriorCreate, timeout: float | None = None) -> RequestSpec:
    """``POST /v1/priors`` (201)."""
    return RequestSpec("POST", "/v1/priors", json=body.to_wire(), timeout=timeout)


def list_spec(collection: str) -> RequestSpec:
    """``GET /v1/<collection>``."""
    return RequestSpec("GET", f"/v1/{collection}")


def get_spec(collection: str, name: str) -> RequestSpec:
    """``GET /v1/<collection>/{name}``."""
    return RequestSpec("GET", f"/v1/{collection}/{_name(name)}")


def delete_spec(collection: str, name: str) -> RequestSpec:
    """``DELETE /v1/<collection>/{name}``."""
    return RequestSpec("DELETE", f"/v1/{collection}/{_name(name)}")


def create_vector_spec(body: ControlVectorCreate, timeout: float | None = None) -> RequestSpec:
    """``POST /v1/control-vectors`` (201)."""
    return RequestSpec("POST", "/v1/control-vectors", json=body.to_wire(), timeout=timeout)


def put_gguf_spec(name: str, data: bytes, timeout: float | None = None) -> RequestSpec:
    """``PUT /v1/control-vectors/{name}/gguf``: the body is the raw GGUF file."""
    return RequestSpec(
        "PUT", f"/v1/control-vectors/{_name(name)}/gguf", content=data, timeout=timeout,
        headers={"Content-Type": "application/octet-stream"},
    )


def get_gguf_spec(name: str, timeout: float | None = None) -> RequestSpec:
    """``GET /v1/control-vectors/{name}/gguf``: the GGUF file as bytes."""
    return RequestSpec(
        "GET", f"/v1/control-vectors/{_name(name)}/gguf", timeout=timeout,
        headers={"Accept": "application/octet-stream"},
    )


def models_spec() -> RequestSpec:
    """``GET /v1/models``."""
    return RequestSpec("GET", "/v1/models")


def health_spec(timeout: float | None = None) -> RequestSpec:
    """``GET /health``: 503 is an answer (loading/draining/dead), not retried."""
    return RequestSpec("GET", "/health", accept=frozenset({503}), retry=False, timeout=timeout)


# -------------------------------------------------------------------- sweep plan


@dataclass(frozen=True)
class SweepUnit:
    """One HTTP call of a sweep: all of prompt ``prompt`` (``point`` None, via
    ``/v1/sweep``) or one grid point of it (a single ``/v1/generate``)."""

    prompt: int
    point: int | None
    spec: RequestSpec


def missing_endpoint(error: exc.APIStatusError) -> bool:
    """A 404 for the route itself (no ``param``: not an unknown prior or vector) or a 405:
    the server predates ``/v1/sweep``."""
    return error.status == 405 or (error.status == 404 and error.param is None)


class SweepPlan:
    """What a sweep sends and how answers combine; the sync and async clients only send.

    Both clients drive it the same way: if :meth:`probe` gives a unit, send it first
    (it finds out whether the server has ``/v1/sweep``) and report with :meth:`store` or
    :meth:`probe_failed`; then send every unit of :meth:`units`, **at most
    ``concurrency`` calls in flight** (one call is a whole prompt via ``/v1/sweep``, or
    one point when falling back to single generates), and :meth:`store` each answer;
    :meth:`result` assembles the table. Fallback requests are the prompt's generate body
    with the point's values set (:func:`~clients._grid.apply_params`).
    """

    def __init__(
        self,
        prompts: Sequence[str | list[int]],
        steering: Sequence[SteeringLike] | None,
        grid: Mapping[str, Sequence[Any]] | None,
        lambdas: Sequence[float] | None,
        options: Mapping[str, Any],
        *,
        concurrency: int,
        server_sweep: bool | None,
    ) -> None:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts, not one string")
        if not prompts:
            raise ValueError("prompts is empty")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.prompts = list(prompts)
        self.grid = resolve_grid(steering, grid, lambdas)
        self.points = expand_grid(self.grid)
        self.bodies = [
            GenerateRequest.build(p, steering=list(steering or []), **options).to_wire()
            for p in prompts
        ]
        self.timeout: float | None = options.get("timeout")
        self.concurrency = concurrency
        self.server_sweep = server_sweep
        self.results: list[list[GenerateResponse | None]] = [
            [None] * len(self.points) for _ in self.bodies
        ]
        self._probed = False

    @property
    def total(self) -> int:
        """Generations in the sweep (for a progress bar)."""
        return len(self.bodies) * len(self.points)

    def _sweep_unit(self, i: int) -> SweepUnit:
        body = SweepRequest(request=self.bodies[i], grid=self.grid)
        return SweepUnit(i, None, sweep_spec(body, self.timeout))

    def probe(self, has_endpoint: bool | None) -> SweepUnit | None:
        """The first prompt's ``/v1/sweep`` call when whether the server has the endpoint
        is unknown (``has_endpoint`` None) and the caller left it to the SDK."""
        if self.server_sweep is None and has_endpoint is None:
            self._probed = True
            return self._sweep_unit(0)
        return None

    def probe_failed(self, error: exc.APIStatusError) -> bool:
        """False (fall back to single generates) for a missing endpoint; else re-raise."""
        if not missing_endpoint(error):
            raise error
        return False

    def units(self, has_endpoint: bool | None) -> list[SweepUnit]:
        """The calls still to send (after the probe, if any)."""
        use_sweep = self.server_sweep if self.server_sweep is not None else bool(has_endpoint)
        first = 1 if self._probed and use_sweep else 0
        if use_sweep:
            return [self._sweep_unit(i) for i in range(first, len(self.bodies))]
        return [
            SweepUnit(i, j, RequestSpec(
                "POST", "/v1/generate", json=apply_params(self.bodies[i], point),
                timeout=self.timeout,
            ))
            for i in range(len(self.bodies))
            for j, point in enumerate(self.points)
        ]

    @staticmethod
    def model_of(unit: SweepUnit) -> type[SweepResponse] | type[GenerateResponse]:
        """The response model of a unit's call."""
        return SweepResponse if unit.point is None else GenerateResponse

    def store(self, unit: SweepUnit, answer: BaseModel) -> int:
        """Record a unit's answer; the number of generations it completed."""
        if unit.point is not None:
            assert isinstance(answer, GenerateResponse)
            self.results[unit.prompt][unit.point] = answer
            return 1
        assert isinstance(answer, SweepResponse)
        by_params = {json.dumps(r.params, sort_keys=True): r.response for r in answer.results}
        try:
            self.results[unit.prompt] = [
                by_params[json.dumps(p, sort_keys=True)] for p in self.points
            ]
        except KeyError as e:
            raise exc.APIStatusError(
                f"/v1/sweep did not return grid point {e.args[0]}", status=200
            ) from None
        return len(self.points)

    def result(self) -> SweepResult:
        """The finished sweep (every unit stored)."""
        rows: list[list[GenerateResponse]] = []
        for per_prompt in self.results:
            done = [r for r in per_prompt if r is not None]
            assert len(done) == len(per_prompt), "a sweep unit was not stored"
            rows.append(done)
        return SweepResult.from_responses(self.prompts, self.grid, rows)
