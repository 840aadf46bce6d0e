"""API-key authentication (``STEER_API_KEY``) as ASGI middleware.

With one or more keys configured, every ``/v1/*`` call (and ``/health``/``/metrics``
unless exempt, which they are by default) needs ``Authorization: Bearer <key>`` — what
the ``openai`` client sends for ``api_key``. Keys are compared with
``hmac.compare_digest`` against every configured key, so the time taken does not tell
which key, or how much of one, matched. Failures are a 401 in the error envelope.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Sequence
from typing import Any

from server.api.errors import APIError

_PROTECTED_EXACT = ("/health", "/metrics")


def is_protected(path: str, exempt: Collection[str] = ()) -> bool:
    """Whether API keys guard ``path``: ``/v1/*``, ``/health`` and ``/metrics``, minus
    ``exempt`` (the middleware and the OpenAPI schema's 401s both ask here)."""
    if path in exempt:
        return False
    return path.startswith("/v1/") or path == "/v1" or path in _PROTECTED_EXACT


class APIKeyAuth:
    """Reject unauthenticated requests to protected paths with 401."""

    def __init__(self, app: Any, keys: Sequence[str], exempt: Sequence[str] = ()) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.exempt = frozenset(exempt)

    def protected(self, path: str) -> bool:
        """``/v1/*``, ``/health`` and ``/metrics``, minus the exempt paths."""
        return is_protected(path, self.exempt)

    def authorized(self, header: bytes | None) -> bool:
        """True when ``header`` is ``Bearer <one of the keys>`` (constant time per key)."""
        if not header:
            return False
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        ok = False
        for key in self.keys:  # no early exit: every key is compared
            ok |= hmac.compare_digest(token, key)
        return ok

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.keys or not self.protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), None)
        if not self.authorized(header):
            message = ("missing API key: send 'Authorization: Bearer <key>'" if not header
                       else "invalid API key")
            err = APIError(401, message, code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
