"""Prometheus metrics of one app (their own registry, so that several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Request counts and latencies per endpoint and model, micro-batch sizes, images screened, verdicts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fisher_guard_requests_total", "HTTP requests by endpoint, model, method and status.",
                                ["endpoint", "model", "method", "status"], registry=self.registry)
        self.latency = Histogram("fisher_guard_request_duration_seconds", "HTTP request latency by endpoint and model.",
                                 ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("fisher_guard_batch_size_images", "Images per micro-batch run, by model and work.",
                                    ["model", "kind"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.request_images = Histogram("fisher_guard_request_images", "Images per request, by endpoint.",
                                        ["endpoint"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.screened = Counter("fisher_guard_images_screened_total", "Images screened, by model.", ["model"],
                                registry=self.registry)
        self.adversarial = Counter("fisher_guard_adversarial_verdicts_total", "Images judged adversarial, by model.",
                                   ["model"], registry=self.registry)
        self.in_flight = Gauge("fisher_guard_images_in_flight", "Images accepted and not yet answered, by model.",
                               ["model"], registry=self.registry)
        self.ready = Gauge("fisher_guard_ready", "1 once every model is loaded and warmed up.", registry=self.registry)

    def observe_batch(self, model: str, kind: str, size: int) -> None:
        self.batch_size.labels(model, kind).observe(size)
