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

from tunelab.serve.errors import variant_fault

LABELS = ("variant", "alias")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Streaming latencies: from a millisecond (a cached prefix) to minutes (a long prompt on a CPU).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1,
    2.5,
    5,
    7.5,
    10,
    20,
    40,
    80,
)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)


class ServeMetrics:
    """Requests, errors (the variant's, and the clients' apart), latency and tokens per variant (base,
    adapter or backend) and alias (alias "" for direct requests); each variant's up/down state,
    upstream faults by reason, rollbacks by why."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("tunelab_requests", "Completion requests served", LABELS, registry=reg)
        self.errors = Counter(
            "tunelab_errors",
            "Completion requests the variant failed (5xx: its own or its upstream's fault)",
            (*LABELS, "code"),
            registry=reg,
        )
        self.client_errors = Counter(
            "tunelab_client_errors",
            "Completion requests refused with a 4xx (the client's mistake; 429: the queue was full) "
            "or abandoned by the client (499)",
            (*LABELS, "code"),
            registry=reg,
        )
        self.latency = Histogram(
            "tunelab_request_latency_seconds",
            "Request latency",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        # As vLLM's vllm:time_to_first_token_seconds and vllm:inter_token_latency_seconds, for streams.
        self.ttft = Histogram(
            "tunelab_time_to_first_token_seconds",
            "Time from the request's arrival to its first streamed token",
            LABELS,
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "tunelab_inter_token_latency_seconds",
            "Time between consecutive streamed tokens",
            LABELS,
            buckets=ITL_BUCKETS,
            registry=reg,
        )
        self.tokens_in = Counter("tunelab_prompt_tokens", "Prompt tokens read", LABELS, registry=reg)
        self.tokens_out = Counter(
            "tunelab_completion_tokens", "Completion tokens generated", LABELS, registry=reg
        )
        self.queue_depth = Gauge("tunelab_queue_depth", "Requests waiting for the worker", registry=reg)
        self.variant_up = Gauge(
            "tunelab_variant_up", "1 while a variant takes traffic", ("variant",), registry=reg
        )
        self.upstream_errors = Counter(
            "tunelab_upstream_errors",
            "Faults of a backend: connect, timeout, http_5xx or bad_response (a client's 4xx is not one)",
            ("variant", "reason"),
            registry=reg,
        )
        self.rollbacks = Counter(
            "tunelab_rollbacks",
            "Candidates whose alias traffic went back to the baseline, by why (error_rate, latency, feedback)",
            ("alias", "variant", "reason"),
            registry=reg,
        )

    def observe(
        self,
        adapter: str,
        alias: str | None,
        latency_s: float | None,
        *,
        error_status: int | None = None,
        tokens: tuple[int, int] = (0, 0),
    ) -> None:
        labels = {"variant": adapter, "alias": alias or ""}
        self.requests.labels(**labels).inc()
        if latency_s is not None:  # None: answered without any work (a down variant's 503)
            self.latency.labels(**labels).observe(latency_s)
        if error_status is not None:
            counter = self.errors if variant_fault(error_status) else self.client_errors
            counter.labels(**labels, code=str(error_status)).inc()
        self.tokens_in.labels(**labels).inc(tokens[0])
        self.tokens_out.labels(**labels).inc(tokens[1])

    def observe_tokens(self, adapter: str, alias: str | None, started: float, times: list[float]) -> None:
        """A stream's time to first token and each gap between tokens (``times``: arrival of each)."""
        labels = {"variant": adapter, "alias": alias or ""}
        self.ttft.labels(**labels).observe(times[0] - started)
        itl = self.itl.labels(**labels)
        for before, after in zip(times, times[1:]):
            itl.observe(after - before)

    def render(self) -> bytes:
        return generate_latest(self.registry)
