"""Prometheus metrics at ``GET /metrics`` (text exposition format).

Each app owns its :class:`CollectorRegistry`, so several apps in one process (tests)
never share or collide on series. The engine reports through the
:class:`~server.engine.observer.EngineObserver` hooks on its own thread; the running
and waiting gauges are read from the engine when scraped, so they are exact and drop
back to 0 as soon as the server is idle. ``steerserve_requests_waiting`` is the gauge
the Kubernetes autoscaler scales on (deploy/).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from server.engine.observer import EngineObserver
from server.engine.types import FinishReason, GenerationRequest

router = APIRouter()

# Seconds. Token latencies on a CPU toy model are ~1 ms, on a loaded GPU ~10-100 ms.
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                  0.4, 0.5, 0.75, 1.0, 2.5)
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
                    120.0, 300.0, 600.0)


class ServerMetrics(EngineObserver):
    """All series of one app; also the engine's observer."""

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.running = Gauge(
            "steerserve_requests_running", "Requests decoding in the batch now.", registry=r
        )
        self.running.set_function(lambda: float(running()))
        self.waiting = Gauge(
            "steerserve_requests_waiting",
            "Requests queued for a batch slot (the autoscaling signal).",
            registry=r,
        )
        self.waiting.set_function(lambda: float(waiting()))
        self.ttft = Histogram(
            "steerserve_time_to_first_token_seconds",
            "From submission to the first generated token.",
            buckets=_REQUEST_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "steerserve_inter_token_latency_seconds",
            "Between consecutive generated tokens of one request.",
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "steerserve_e2e_request_latency_seconds",
            "From submission to the end of the request (any finish reason).",
            buckets=_REQUEST_BUCKETS, registry=r,
        )
        self.queue = Histogram(
            "steerserve_request_queue_time_seconds",
            "From submission to admission into the batch (prefill).",
            buckets=_REQUEST_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            "steerserve_prompt_tokens", "Prompt tokens of admitted requests.", registry=r
        )
        self.generation_tokens = Counter(
            "steerserve_generation_tokens", "Generated tokens.", registry=r
        )
        self.finished = Counter(
            "steerserve_requests_finished",
            "Finished requests by finish reason (stop, length, abort, timeout, error).",
            ["finish_reason"], registry=r,
        )
        for reason in ("stop", "length", "abort", "timeout", "error"):
            self.finished.labels(reason)
        self.cancelled = Counter(
            "steerserve_requests_cancelled",
            "Requests dropped because the client disconnected.",
            registry=r,
        )
        self.processor = Counter(
            "steerserve_steering_processor_requests",
            "Admitted requests using a steering processor, by processor type.",
            ["type"], registry=r,
        )
        self.model_load = Gauge(
            "steerserve_model_load_seconds", "Time it took to load the model.", registry=r
        )

    # --------------------------------------------------------- engine observer
    def on_admitted(self, request: GenerationRequest, queue_s: float) -> None:
        self.queue.observe(queue_s)
        self.prompt_tokens.inc(len(request.prompt_ids))
        for type_name in {e.type for e in request.steering}:
            self.processor.labels(type_name).inc()

    def on_token(self, request: GenerationRequest, first: bool, elapsed_s: float) -> None:
        self.generation_tokens.inc()
        (self.ttft if first else self.itl).observe(elapsed_s)

    def on_finish(
        self,
        request: GenerationRequest,
        reason: FinishReason,
        prompt_tokens: int,
        completion_tokens: int,
        e2e_s: float,
        cancelled: bool,
    ) -> None:
        self.finished.labels(reason).inc()
        self.e2e.observe(e2e_s)
        if cancelled:
            self.cancelled.inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


@router.get("/metrics", response_class=Response, responses={200: {"content": {
    CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this server's metrics."""
    m: ServerMetrics = request.app.state.metrics
    return Response(m.exposition(), media_type=CONTENT_TYPE_LATEST)
