"""Prometheus metrics of the service and its engine."""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from generator_service.inference.engine import Engine


class Metrics:
    """Prometheus metrics in a registry of their own (several apps may live in one process)."""

    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("reidgen_http_requests_total", "HTTP requests", ["method", "endpoint", "status"],
                                registry=r)
        self.latency = Histogram("reidgen_http_request_duration_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.errors = Counter("reidgen_http_errors_total", "error responses by code", ["endpoint", "code"], registry=r)
        self.batch_images = Histogram("reidgen_engine_batch_images", "images generated per model call", ["op"],
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_requests = Histogram("reidgen_engine_batch_requests", "requests merged per model call", ["op"],
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_seconds = Histogram("reidgen_engine_batch_duration_seconds", "model call duration", ["op"],
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        queue_depth = Gauge("reidgen_engine_queue_depth", "requests waiting for the batcher", registry=r)
        queue_depth.set_function(engine.queue_depth)
        ready = Gauge("reidgen_engine_ready", "1 when the models are loaded and warmed up", registry=r)
        ready.set_function(lambda: float(engine.ready))
        engine.add_observer(self.observe_batch)

    def observe_batch(self, op: str, model: str, images: int, requests: int, seconds: float) -> None:
        self.batch_images.labels(op).observe(images)
        self.batch_requests.labels(op).observe(requests)
        self.batch_seconds.labels(op).observe(seconds)


def endpoint_label(request_or_scope: Any, known: frozenset[str]) -> str:
    """The metrics label of a path: a known endpoint, or 'other' (bounded label cardinality)."""
    path = request_or_scope["path"] if isinstance(request_or_scope, dict) else request_or_scope.url.path
    if path.startswith("/v1/jobs/") and "/v1/jobs/{job_id}" in known:
        return "/v1/jobs/{job_id}"
    return path if path in known else "other"
