"""Prometheus metrics of a worker process, served on `worker_metrics_port` when it is set."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

JOBS = Counter("fisher_guard_worker_jobs_total", "Jobs a worker finished, by type and outcome", ["type", "outcome"])
JOB_SECONDS = Histogram("fisher_guard_worker_job_seconds", "Wall time of a job on a worker", ["type"],
                        buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))


def serve_metrics(port: int | None) -> None:
    """Start the metrics HTTP server in a daemon thread (no-op when port is None)."""
    if port:
        start_http_server(port)
