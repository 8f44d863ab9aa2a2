"""Prometheus metrics of one app, in its own registry (two apps in one process never share counts)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LABELS = ("adapter", "alias")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServeMetrics:
    """Requests, errors, latency and tokens per adapter and alias (alias "" for direct requests)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("tunelab_requests", "Completion requests served", LABELS, registry=reg)
        self.errors = Counter(
            "tunelab_errors", "Completion requests that failed", (*LABELS, "code"), registry=reg
        )
        self.latency = Histogram(
            "tunelab_request_latency_seconds",
            "Request latency",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.tokens_in = Counter("tunelab_prompt_tokens", "Prompt tokens read", LABELS, registry=reg)
        self.tokens_out = Counter(
            "tunelab_completion_tokens", "Completion tokens generated", LABELS, registry=reg
        )
        self.queue_depth = Gauge("tunelab_queue_depth", "Requests waiting for the worker", registry=reg)

    def observe(
        self,
        adapter: str,
        alias: str | None,
        latency_s: float,
        *,
        error_status: int | None = None,
        tokens: tuple[int, int] = (0, 0),
    ) -> None:
        labels = {"adapter": adapter, "alias": alias or ""}
        self.requests.labels(**labels).inc()
        self.latency.labels(**labels).observe(latency_s)
        if error_status is not None:
            self.errors.labels(**labels, code=str(error_status)).inc()
        self.tokens_in.labels(**labels).inc(tokens[0])
        self.tokens_out.labels(**labels).inc(tokens[1])

    def render(self) -> bytes:
        return generate_latest(self.registry)
