"""HTTP layer: wire protocol, conversion, routes, errors and the app factory."""

from server.api.app import create_app

__all__ = ["create_app"]
