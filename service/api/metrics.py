"""Prometheus metrics of one app (their own registry, so that several apps can live in one process).

With several uvicorn worker processes (`fisher-guard serve --workers N`), each process writes its values to the
directory named by PROMETHEUS_MULTIPROC_DIR (prometheus_client's multi-process mode, chosen when the variable is
set before prometheus_client is imported: `serve` sets it) and `/metrics` answers with the sum over all of them,
whichever process takes the scrape. Gauges say how they combine: images in flight and processes add up over
the live processes, readiness is the minimum (1 only when every live process is ready).

Queue wait and compute time are measured in one place, the model's worker (service.api.model_worker): each run
of the model on a batch is an `Execution`, which `observe_execution` turns into the two histograms and, for the
Open Inference Protocol's inference work, into that model's `InferenceStatistics` (the v2 statistics extension).
Those statistics are the answering process's own. The process and platform collectors (`process_*`,
`python_info`) describe this process; in multi-process mode, where a scrape may land on any worker, only
`python_info` is shown.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import (
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
OIP_WORK = "infer"  # the kind of work of Open Inference Protocol inference: what its statistics count
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


@dataclass(frozen=True)
class QueuedRequest:
    """A request whose images were in a model's run: its endpoint (route path), images, and its wait in the queue
    (from entering the model's queue until the model started on the batch that held it), in nanoseconds."""

    endpoint: str
    images: int
    queue_ns: int


@dataclass(frozen=True)
class Execution:
    """One run of a model on a batch: the kind of work, the batch's images, the model's time on it (measured in the
    model's thread, nanoseconds) and the requests whose images it held."""

    kind: str
    images: int
    compute_ns: int
    requests: tuple[QueuedRequest, ...]
    runs: int = 1  # model runs it counts: 0 for a share of a run that another request's report counts (model process)


@dataclass
class Duration:
    """A count and a cumulative duration (nanoseconds): Triton's `StatisticDuration`."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class InferenceStatistics:
    """One model's Open Inference Protocol inference requests, as the v2 statistics extension reports them: what
    this service measures, nothing else (no cache, no input/output conversion times).

    `success` / `fail`: requests answered / refused or failed, with their durations from the routing of the request
    to its answer; `queue` / `compute_infer`: per request, its wait for the model and its batch's compute time;
    `inference_count`: images inferred; `execution_count`: model runs (batches); `batches`: runs by batch size."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)

    def record_request(self, ok: bool, duration_ns: int) -> None:
        (self.success if ok else self.fail).add(duration_ns)

    def record_execution(self, execution: Execution) -> None:
        self.execution_count += execution.runs
        self.inference_count += sum(r.images for r in execution.requests)
        self.last_inference_ms = int(time.time() * 1000)
        for request in execution.requests:
            self.queue.add(request.queue_ns)
            self.compute_infer.add(execution.compute_ns)
        if execution.runs:
            self.batches.setdefault(execution.images, Duration()).add(execution.compute_ns, execution.runs)

    def as_triton(self, name: str, version: str) -> dict[str, Any]:
        """The `model_stats` entry of Triton's statistics extension (field names as Triton's)."""
        return {
            "name": name, "version": version, "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {"success": self.success.as_json(), "fail": self.fail.as_json(),
                                "queue": self.queue.as_json(), "compute_infer": self.compute_infer.as_json()},
            "batch_stats": [{"batch_size": size, "compute_infer": self.batches[size].as_json()}
                            for size in sorted(self.batches)],
        }


class Metrics:
    """Request counts and latencies per endpoint and model, queue wait and compute time per request, micro-batch
    sizes, images screened, verdicts, process metrics; and each model's v2 inference statistics."""

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
        self.queue_wait = Histogram("fisher_guard_queue_wait_seconds", "Time each request waited for its model, from "
                                    "entering the model's queue until the model started on its batch; by model and "
                                    "endpoint.", ["model", "endpoint"], buckets=WAIT_BUCKETS, registry=self.registry)
        self.compute = Histogram("fisher_guard_compute_seconds", "Model time of the batch that held each request "
                                 "(its forward pass, spectra, detector or attack); by model and endpoint.",
                                 ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.statistics: dict[str, InferenceStatistics] = {}  # model name -> its v2 inference statistics

    def model_statistics(self, model: str) -> InferenceStatistics:
        """The v2 inference statistics of one model (made on first use)."""
        return self.statistics.setdefault(model, InferenceStatistics())

    def observe_execution(self, model: str, execution: Execution) -> None:
        """One run of `model`: each request's queue wait and compute time, and the model's v2 statistics when it
        was Open Inference Protocol inference. Called on the event loop."""
        compute_s = execution.compute_ns / 1e9
        for request in execution.requests:
            self.queue_wait.labels(model, request.endpoint).observe(request.queue_ns / 1e9)
            self.compute.labels(model, request.endpoint).observe(compute_s)
        if execution.kind == OIP_WORK:
            self.model_statistics(model).record_execution(execution)

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
        combined.register(PLATFORM_COLLECTOR)
        return generate_latest(combined)

    def process_exit(self) -> None:
        """Drop this process's live gauges from the shared directory (its counters stay: they are totals)."""
        if multiprocess_dir() is not None:
            mark_process_dead(os.getpid())
