"""Hooks the engine calls on its thread so that the server can keep metrics.

The engine does not import Prometheus: it calls an :class:`EngineObserver` whose
methods do nothing by default; ``server.api.metrics`` implements them. Every hook runs
on the engine thread between steps and must be cheap and never raise.
"""

from __future__ import annotations

from server.engine.types import FinishReason, GenerationRequest


class EngineObserver:
    """No-op base; override what you need. Times are seconds."""

    def on_admitted(self, request: GenerationRequest, queue_s: float) -> None:
        """A request left the queue and was prefilled after waiting ``queue_s``."""

    def on_token(self, request: GenerationRequest, first: bool, elapsed_s: float) -> None:
        """A token was emitted: ``elapsed_s`` is the time since submission for the first
        token (time to first token), else since the row's previous token."""

    def on_finish(
        self,
        request: GenerationRequest,
        reason: FinishReason,
        prompt_tokens: int,
        completion_tokens: int,
        e2e_s: float,
        cancelled: bool,
    ) -> None:
        """The request ended; ``cancelled`` = its client went away (disconnect)."""
