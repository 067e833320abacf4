"""Prometheus metrics of one app (their own registry, so that several apps can live in one process).

With several uvicorn worker processes (`fisher-guard serve --workers N`), each process writes its values to the
directory named by PROMETHEUS_MULTIPROC_DIR (prometheus_client's multi-process mode, chosen when the variable is
set before prometheus_client is imported: `serve` sets it) and `/metrics` answers with the sum over all of them,
whichever process takes the scrape. Gauges say how they combine: images in flight and processes add up over
the live processes, readiness is the minimum (1 only when every live process is ready).
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The directory the processes share their metrics in, or None in single-process mode."""
    return os.environ.get(MULTIPROCESS_ENV) or None


def drop_dead_processes(directory: str) -> list[int]:
    """Drop the live gauges of processes that died without shutting down (a killed worker, which uvicorn
    replaces): they would count as live forever. Returns their pids."""
    pids = {path.stem.rsplit("_", 1)[-1] for path in Path(directory).glob("gauge_live*_*.db")}
    dead = {int(pid) for pid in pids if pid.isdigit() and not _alive(int(pid))}
    for pid in dead:
        mark_process_dead(pid, directory)
    return sorted(dead)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


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
                               ["model"], registry=self.registry, multiprocess_mode="livesum")
        self.ready = Gauge("fisher_guard_ready", "1 once every model is loaded and warmed up (in every process).",
                           registry=self.registry, multiprocess_mode="livemin")
        self.processes = Gauge("fisher_guard_processes", "API processes serving (uvicorn workers).",
                               registry=self.registry, multiprocess_mode="livesum")

    def observe_batch(self, model: str, kind: str, size: int) -> None:
        self.batch_size.labels(model, kind).observe(size)

    def exposition(self) -> bytes:
        """The Prometheus text format: this app's registry, or the sum over every process in multi-process mode."""
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        drop_dead_processes(directory)
        combined = CollectorRegistry()
        MultiProcessCollector(combined)
        return generate_latest(combined)

    def process_exit(self) -> None:
        """Drop this process's live gauges from the shared directory (its counters stay: they are totals)."""
        if multiprocess_dir() is not None:
            mark_process_dead(os.getpid())
