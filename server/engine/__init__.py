"""The batched steering engine: scheduler, batch state, runner, sampler, detokenizer."""

from server.engine.scheduler import (
    Engine,
    EngineConfig,
    EngineUnavailableError,
    QueueFullError,
)
from server.engine.types import (
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    RequestHandle,
    SamplingParams,
    TokenEvent,
)

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineUnavailableError",
    "ErrorEvent",
    "FinishEvent",
    "GenerationRequest",
    "QueueFullError",
    "RequestHandle",
    "SamplingParams",
    "TokenEvent",
]
