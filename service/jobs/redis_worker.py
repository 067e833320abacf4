"""The Redis workers, on rq (as rq's worker.py): `fisher-guard worker` processes run the jobs that
service.jobs.redis_queue enqueues.

Crash recovery is rq's: a running job sits in rq's StartedJobRegistry with a score = its lease expiry, which the
worker's heartbeat pushes forward. When a worker dies (SIGKILL, OOM) the lease runs out, and the next idle worker's
maintenance pass (every `jobs_heartbeat_s`) finds the job abandoned and re-enqueues it while it has retries left
(`Retry(max=jobs_max_attempts - 1)`), else marks it failed (AbandonedJobError). Our worker only shortens rq's
timings (rq's SimpleWorker would wait job_timeout + 60 s and clean up every 10 minutes) and heartbeats from a
thread while the job runs in the main thread; ordinary exceptions are not retried.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import numpy as np
import redis
from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job
from rq.serializers import JSONSerializer

from service.config import Settings, get_settings
from service.jobs import model_cache
from service.jobs.inputs import unpack
from service.jobs.metrics import JOB_SECONDS, JOBS, serve_metrics
from service.jobs.redis_queue import Keys
from service.jobs.tasks import run_task
from service.jobs.types import (
    JobCancelled,
    JobSpec,
)
from service.observability import job_id

PROGRESS_EVERY_S = 0.25
UPLOAD_GRACE_S = 600
_current_worker: str | None = None


class RedisTaskContext:
    """What a task sees when an rq worker runs it."""

    def __init__(self, job: Job, spec: JobSpec, settings: Settings) -> None:
        self.job, self.spec, self.settings = job, spec, settings
        self.conn = job.connection
        self.keys = Keys(settings.jobs_queue)
        self._last = 0.0

    def cancelled(self) -> bool:
        return bool(self.conn.exists(self.keys.cancel(self.spec.id)))

    def progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == 0 or done >= total or now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            self.job.meta["progress"] = {"done": done, "total": total}
            self.job.save_meta()
            if self.cancelled():
                raise JobCancelled()

    def load_upload(self) -> tuple[np.ndarray, np.ndarray | None]:
        data = self.conn.get(self.keys.upload(self.spec.upload_id))
        if data is None:
            raise RuntimeError("the job's uploaded images expired or were removed before it ran")
        return unpack(data)

    def load_artifact(self, job_id: str) -> tuple[str, bytes]:
        data = self.conn.hgetall(self.keys.artifact(job_id))
        if not data:
            raise RuntimeError(f"the output of shard {job_id} is missing (expired?)")
        return data[b"filename"].decode(), data[b"data"]

    def release_upload(self) -> None:
        """The job is over: its staged upload goes soon (not at once, in case this attempt is re-run); a shard
        leaves it to its parent, which ends last."""
        if self.spec.has_upload and self.spec.parent is None:
            self.conn.expire(self.keys.upload(self.spec.id), UPLOAD_GRACE_S)

    def save_artifact(self, filename: str, media_type: str, data: bytes) -> None:
        key = self.keys.artifact(self.spec.id)
        with self.conn.pipeline() as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping={"filename": filename, "media_type": media_type, "data": data})
            pipe.expire(key, self.spec.result_ttl_s)
            pipe.execute()


def perform(spec_data: dict) -> dict:
    """The function rq runs: one attempt of one job, in a worker process whose models are already loaded."""
    job = get_current_job()
    assert job is not None, "perform() runs inside an rq worker"
    settings = get_settings()
    spec = JobSpec.model_validate(spec_data)
    ctx = RedisTaskContext(job, spec, settings)
    job.meta["attempts"] = int(job.meta.get("attempts", 0)) + 1
    job.meta["worker"] = _current_worker or job.worker_name
    job.meta["started_at"] = time.time()
    job.meta.pop("error", None)
    job.save_meta()
    try:
        if ctx.cancelled():
            raise JobCancelled()
        summary = run_task(spec, ctx)
    except JobCancelled:
        job.meta["cancelled"] = True
        job.meta["error"] = {"code": "cancelled", "reason": "cancelled on request"}
        job.save_meta()
        ctx.release_upload()
        raise
    except Exception as exc:
        if type(exc).__name__ == "JobTimeoutException":
            job.meta["error"] = {"code": "timeout", "reason": f"the job ran longer than {job.timeout} s"}
        else:
            job.meta["error"] = {"code": "job_failed", "reason": f"{type(exc).__name__}: {exc}"}
        job.save_meta()
        ctx.release_upload()
        raise
    ctx.release_upload()
    return summary


class FisherWorker(SimpleWorker):
    """rq's SimpleWorker (no fork: models stay loaded, CUDA-safe) with a short lease, renewed by a heartbeat
    thread while a job runs, and quick maintenance, so abandoned jobs are re-queued within about
    jobs_lease_s + jobs_heartbeat_s seconds. Ordinary exceptions fail the job at once (no retry)."""

    def __init__(self, *args: Any, heartbeat_s: int = 5, lease_s: int = 30, **kwargs: Any) -> None:
        self.heartbeat_s = heartbeat_s
        self.lease_s = lease_s
        kwargs.setdefault("maintenance_interval", heartbeat_s)
        kwargs.setdefault("job_monitoring_interval", heartbeat_s)
        super().__init__(*args, **kwargs)

    @property
    def dequeue_timeout(self) -> int:
        return self.heartbeat_s

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.lease_s

    def perform_job(self, job: Job, queue: Queue, execution: Any) -> bool:
        global _current_worker
        _current_worker = self.name
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception as exc:  # a missed beat is retried; a lost lease means at-least-once
                    self.log.warning("heartbeat for job %s failed: %s", job.id, exc)

        thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        thread.start()
        token = job_id.set(job.id)
        kind = str(job.args[0].get("type", "unknown")) if job.args and isinstance(job.args[0], dict) else "unknown"
        started = time.monotonic()
        ok = False
        try:
            ok = super().perform_job(job, queue, execution)
            return ok
        finally:
            stop.set()
            thread.join()
            JOB_SECONDS.labels(kind).observe(time.monotonic() - started)
            JOBS.labels(kind, "succeeded" if ok else "failed").inc()
            job_id.reset(token)

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """A cancelled job is what its user asked for: one info line, not rq's error with a traceback."""
        if exc_info and isinstance(exc_info[0], type) and issubclass(exc_info[0], JobCancelled):
            self.log.info("job %s cancelled on request", job.id)
            return
        super().handle_exception(job, *exc_info)

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = "",
                           execution: Any = None) -> None:
        if not exc_string.startswith("Job was stuck in intermediate queue"):  # a worker died there: retry
            job.retries_left = 0  # retries are for dead workers only (registry cleanup), not for errors
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry, exc_string=exc_string,
                                   execution=execution)


class QuietMaintenance(logging.Filter):
    """Drop rq's 'cleaning registries' lines: our maintenance runs every heartbeat, not every 10 minutes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "cleaning" not in record.getMessage()


def run_worker(settings: Settings, name: str | None = None, burst: bool = False, log_level: str = "INFO") -> bool:
    """Run one worker until stopped (or, with burst, until the queue is empty). When Redis goes away (a restart,
    a network blip), rq's worker quits; it is started again once Redis answers, waiting 1, 2, 4, ... seconds
    (at most settings.jobs_reconnect_max_s) between tries, so that a short outage never ends the process."""
    logging.getLogger("rq.worker").addFilter(QuietMaintenance())
    serve_metrics(settings.worker_metrics_port)
    if not settings.redis_url:
        raise ValueError("a worker needs FISHER_GUARD_REDIS_URL (the in-process backend runs jobs in the API)")
    model_cache.configure(settings.model_folders(), settings.device, settings.allow_pickled_detectors)
    conn = redis.Redis.from_url(settings.redis_url)
    queue = Queue(settings.jobs_queue, connection=conn, serializer=JSONSerializer)
    worked, wait = False, 1.0
    while True:
        worker = FisherWorker([queue], name=name, connection=conn, serializer=JSONSerializer,
                              heartbeat_s=settings.jobs_heartbeat_s, lease_s=settings.jobs_lease_s,
                              worker_ttl=max(settings.jobs_lease_s, 20))
        started = time.monotonic()
        try:
            worked |= worker.work(burst=burst, logging_level=log_level, with_scheduler=False)
            reason = "rq's worker loop ended"
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # raised by its teardown while Redis is down
            reason = f"Redis is unreachable ({exc})"
        except ValueError as exc:  # rq: a worker of this name is still registered (its key expires with its ttl)
            reason = str(exc)
        if burst or worker._shutdown_requested_date is not None:
            return worked
        if time.monotonic() - started > 60:
            wait = 1.0  # it ran a while: this is a new outage
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # rq's handlers expect a worker loop; none runs now
        logging.getLogger(__name__).warning("worker stopped (%s); starting again in %.0f s", reason, wait)
        time.sleep(wait)
        wait = min(wait * 2, float(settings.jobs_reconnect_max_s))
