"""steerserve Python SDK: sync and async clients, steering builders, sweeps and a CLI.

Installs and imports without torch (only httpx and pydantic); pandas, matplotlib and
tqdm are used when installed.

>>> from clients import SteerClient, Ngram                     # doctest: +SKIP
>>> client = SteerClient()                                      # $STEER_BASE_URL
>>> result = client.sweep(["In the beginning"], steering=[Ngram(prior="kjv", lam=0)],
...                       lambdas=[0, 0.05, 0.1, 0.2], max_tokens=32, temperature=0)
>>> print(result.summary())
"""

from clients._base import DEFAULT_BASE_URL, ENV_API_KEY, ENV_BASE_URL, __version__
from clients.client import AsyncSteerClient, SteerClient
from clients.exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    SteerError,
)
from clients.steering import (
    Control,
    Fusion,
    LogitBias,
    Margin,
    Ngram,
    SteeringLike,
    contrast_pairs,
)
from clients.streaming import AsyncStream, Stream
from clients.sweep import SweepResult, SweepRow, distinct_n, token_overlap
from clients.types import (
    ControlVector,
    ControlVectorList,
    CorpusList,
    Deleted,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    ModelList,
    Prior,
    PriorList,
    StreamEvent,
    SweepPoint,
    SweepResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    "DEFAULT_BASE_URL", "ENV_API_KEY", "ENV_BASE_URL", "__version__",
    "SteerClient", "AsyncSteerClient", "Stream", "AsyncStream",
    "SteerError", "APIConnectionError", "APITimeoutError", "APIStatusError",
    "BadRequestError", "AuthenticationError", "NotFoundError", "ConflictError",
    "PayloadTooLargeError", "RateLimitError", "InternalServerError", "ServiceUnavailableError",
    "Ngram", "Control", "Fusion", "Margin", "LogitBias", "SteeringLike", "contrast_pairs",
    "SweepResult", "SweepRow", "token_overlap", "distinct_n",
    "GenerateRequest", "GenerateResponse", "StreamEvent", "Usage", "TokenLogprob",
    "TopLogprob", "SweepPoint",
    "SweepResponse", "Prior", "PriorList", "CorpusList", "ControlVector",
    "ControlVectorList", "Deleted", "ModelCard", "ModelList", "Health",
]
