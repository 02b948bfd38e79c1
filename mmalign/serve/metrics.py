"""Prometheus metrics of the service (prometheus-client), in a registry of its own per app:
requests by route and status, request latency by route, and the size of each encoded batch.

Example:
    >>> metrics = ServiceMetrics()
    >>> metrics.observe("/search", 200, 0.012)
    >>> b'mmalign_requests_total{route="/search",status="200"} 1.0' in metrics.exposition()
    True
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Latency histogram buckets (seconds): a millisecond to a few seconds."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""Batch-size histogram buckets (samples per forward pass)."""


class ServiceMetrics:
    """The counters and histograms of one app (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mmalign_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mmalign_request_seconds",
            "Time to answer a request, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mmalign_batch_size",
            "Samples encoded per forward pass (dynamic batching)",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (the body of ``/metrics``)."""
        return generate_latest(self.registry)
