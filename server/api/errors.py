"""The error envelope ``{"error": {"message", "type", "param", "code"}}`` and its handlers.

Every failure the API reports goes through :class:`APIError`, so clients see one shape
whatever went wrong: validation (400), auth (401), unknown artifact (404), name taken
(409), too large (413), queue full (429, with ``Retry-After``), not ready (503).
"""

from __future__ import annotations

import errno
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from processors.base import ParamError

log = logging.getLogger("steerserve.api")

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    507: "insufficient_storage",
}


# Error messages echo client values (a bad key, a bad string); a client must not be able
# to make the server write megabytes back, or forge lines in a log that records them.
MAX_MESSAGE_CHARS = 1000
MAX_PARAM_CHARS = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def clip(text: str, limit: int) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``) and at most ``limit``
    characters (the middle elided): safe to log or echo, however hostile the input."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    if len(text) > limit:
        keep = limit - 5
        text = f"{text[: keep // 2 + keep % 2]} ... {text[len(text) - keep // 2:]}"
    return text


class ErrorBody(BaseModel):
    """The inner object of the error envelope."""

    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """The error envelope every non-2xx JSON response uses."""

    error: ErrorBody


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` documenting ``codes`` with the envelope model."""
    return {code: {"model": ErrorResponse} for code in codes}


class APIError(Exception):
    """An error to send to the client in the envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: int | str | None = None,
        headers: dict[str, str] | None = None,
        type: str | None = None,
    ) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = None if param is None else clip(param, MAX_PARAM_CHARS)
        self.code = code if code is not None else status
        self.headers = headers or {}
        self.type = type or ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        """The JSON envelope (:class:`ErrorResponse`)."""
        body = ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=body).model_dump()

    def response(self) -> JSONResponse:
        """As a JSON response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def from_param_error(cls, err: ParamError) -> APIError:
        """Map a processor's ParamError to an envelope (its status decides 400/404/413)."""
        return cls(err.status, err.message, param=err.param or None)


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
def artifact_or_404(reg: Any, name: str, what: str) -> Any:
    """``reg[name]`` from an ``ArtifactRegistry``, or a 404 naming ``name`` that says
    whether the artifact is unknown or was skipped as corrupt (``what``: "prior", ...)."""
    if name in reg.corrupt:
        raise APIError(
            404, f"{what} '{name}' is corrupt on disk and was skipped: {reg.corrupt[name]}",
            param="name",
        )
    if name not in reg:
        raise APIError(404, f"unknown {what} '{name}'", param="name")
    return reg[name]


_TYPE_LOCS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _param_from_loc(loc: tuple[Any, ...]) -> str:
    """('body', 'steering', 0, 'type') → 'steering.0.type'; drops union-member tags."""
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        s = str(item)
        if "[" in s or s in _TYPE_LOCS or s.startswith("function-"):
            continue
        parts.append(s)
    return ".".join(parts) or "body"


def validation_error(exc: RequestValidationError | ValidationError) -> APIError:
    """Turn FastAPI's 422 (or a pydantic error of a model validated by hand) into our
    400, naming the first offending field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    param = _param_from_loc(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {msg}", param="body")
    if first.get("type") == "missing":
        return APIError(400, f"'{param}' is required", param=param)
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field '{param}'", param=param)
    shown = repr(first.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return APIError(400, f"invalid value for '{param}': {msg} (got {shown})", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type to the envelope."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(ParamError)
    async def _param_error(_: Request, exc: ParamError) -> JSONResponse:
        return APIError.from_param_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint"
        headers = dict(exc.headers or {})
        return APIError(exc.status_code, message, headers=headers).response()

    @app.exception_handler(OSError)
    async def _os_error(_: Request, exc: OSError) -> JSONResponse:
        # A full disk or quota while storing an artifact (the store leaves no partial
        # file behind) is the server's condition, not the request's: 507, retryable.
        if exc.errno in _NO_SPACE:
            log.error("out of storage: %s", exc)
            return APIError(507, f"insufficient storage: {exc.strerror or exc}").response()
        log.exception("unhandled OS error")
        return APIError(500, f"internal server error: {type(exc).__name__}").response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal server error: {type(exc).__name__}").response()
