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

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from clients import exceptions as exc
from clients.types import (
    ControlVectorCreate,
    GenerateRequest,
    PriorCreate,
    SweepRequest,
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
