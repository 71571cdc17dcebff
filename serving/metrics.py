"""Prometheus metrics of one replica, in a private registry rendered at GET /metrics.

Private (not prometheus_client's global REGISTRY) so nothing else in the Ray worker process leaks into the scrape,
and so several apps in one process would not collide. Each replica answers for itself: scrape replicas (pods)
individually, or sum in PromQL.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "endoflow_request_seconds",
            "Request latency inside the replica, by route and status",
            ["route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "endoflow_request_errors",
            "Requests answered 4xx/5xx, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "endoflow_batch_size",
            "Requests run together in one onnxruntime call",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.reloads = Counter(
            "endoflow_model_reloads", "Model swaps after the reference moved", registry=self.registry
        )
        self.sessions = Gauge("endoflow_stream_sessions", "Open propagation sessions", registry=self.registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.latency.labels(route, str(status)).observe(seconds)
        if status >= 400:
            self.errors.labels(route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
