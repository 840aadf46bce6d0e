"""The SDK's exception tree, mapped from HTTP status codes and the server's error envelope.

Every error the SDK raises derives from :class:`SteerError`, so ``except SteerError``
catches them all::

    SteerError
    ├── APIConnectionError          the server could not be reached (DNS, refused, reset)
    │   └── APITimeoutError         connect/read/write/pool timeout
    └── APIStatusError              the server answered with a non-2xx status (or an
        │                           in-band error frame in a stream)
        ├── BadRequestError         400  a parameter has a bad value (see ``.param``)
        ├── AuthenticationError     401  missing or wrong API key
        ├── NotFoundError           404  unknown model, prior, control vector or endpoint
        ├── ConflictError           409  the artifact name is taken
        ├── PayloadTooLargeError    413  body, prompt or corpus over a server limit
        ├── RateLimitError          429  queue full; ``.retry_after`` in seconds
        └── InternalServerError     5xx
            └── ServiceUnavailableError  503  loading, draining or the engine died

Status errors carry ``status``, ``message``, ``param``, ``type``, ``code`` (from the
envelope ``{"error": {"message", "type", "param", "code"}}``) and the ``httpx.Response``.
"""

from __future__ import annotations

from typing import Any

import httpx


class SteerError(Exception):
    """Base class of every error the SDK raises."""


class APIConnectionError(SteerError):
    """The request never got an HTTP answer (refused, reset, DNS failure...)."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class APITimeoutError(APIConnectionError):
    """The request timed out (connect, read, write or waiting for a pooled connection)."""


class APIStatusError(SteerError):
    """The server answered with an error status or sent an in-band error frame.

    ``status`` is the HTTP status; for an in-band stream error (the HTTP status was
    already 200) it is the envelope's integer ``code`` when it has one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        param: str | None = None,
        type: str | None = None,
        code: int | str | None = None,
        response: httpx.Response | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(f"{status}: {message}" + (f" (param: {param})" if param else ""))
        self.message = message
        self.status = status
        self.param = param
        self.type = type
        self.code = code
        self.response = response
        self.body = body

    @property
    def retry_after(self) -> float | None:
        """The server's ``Retry-After`` in seconds, if it sent one (and it is a number)."""
        if self.response is None:
            return None
        return parse_retry_after(self.response.headers.get("retry-after"))


class BadRequestError(APIStatusError):
    """400: a parameter has a bad value; ``param`` names it (e.g. ``steering.0.lambda``)."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""


class NotFoundError(APIStatusError):
    """404: unknown model, artifact (prior, control vector) or endpoint."""


class ConflictError(APIStatusError):
    """409: an artifact of that name already exists."""


class PayloadTooLargeError(APIStatusError):
    """413: the body, prompt or corpus is over a server limit."""


class RateLimitError(APIStatusError):
    """429: the server's queue is full; retried automatically, honouring Retry-After."""


class InternalServerError(APIStatusError):
    """5xx: the server failed; retried automatically."""


class ServiceUnavailableError(InternalServerError):
    """503: the server is loading, draining or its engine died; retried automatically."""


STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_class(status: int) -> type[APIStatusError]:
    """The exception class for an HTTP status (unknown 4xx → APIStatusError)."""
    if status in STATUS_ERRORS:
        return STATUS_ERRORS[status]
    if status >= 500:
        return InternalServerError
    return APIStatusError


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds; None when absent or not a number (HTTP dates ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return max(0.0, seconds)


def from_envelope(
    body: Any, status: int, response: httpx.Response | None = None
) -> APIStatusError:
    """Build the exception for an error envelope (or any other body) and status."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or f"HTTP {status}")
        param = err.get("param")
        etype = err.get("type")
        code = err.get("code")
    else:
        message = str(body)[:500] if body not in (None, "") else f"HTTP {status}"
        param = etype = code = None
    return error_class(status)(
        message,
        status=status,
        param=str(param) if param is not None else None,
        type=str(etype) if etype is not None else None,
        code=code,
        response=response,
        body=body,
    )


def from_response(response: httpx.Response) -> APIStatusError:
    """The exception for a non-2xx response (body read already)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return from_envelope(body, response.status_code, response)


def from_stream_error(payload: dict[str, Any], response: httpx.Response | None) -> APIStatusError:
    """The exception for an in-band ``data: {"error": ...}`` frame of a stream."""
    err = payload.get("error")
    code = err.get("code") if isinstance(err, dict) else None
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return from_envelope(payload, status, response)
