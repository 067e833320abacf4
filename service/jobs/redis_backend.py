"""The Redis backend, on rq: the API enqueues, `fisher-guard worker` processes run the jobs.

Crash recovery is rq's: a running job sits in rq's StartedJobRegistry with a score = its lease expiry, which the
worker's heartbeat pushes forward. When a worker dies (SIGKILL, OOM) the lease runs out, and the next idle worker's
maintenance pass (every `jobs_heartbeat_s`) finds the job abandoned and re-enqueues it while it has retries left
(`Retry(max=jobs_max_attempts - 1)`), else marks it failed (AbandonedJobError). Our worker only shortens rq's
timings (rq's SimpleWorker would wait job_timeout + 60 s and clean up every 10 minutes) and heartbeats from a
thread while the job runs in the main thread; ordinary exceptions are not retried.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import redis
from rq import Queue, Retry, SimpleWorker, get_current_job
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RqStatus
from rq.serializers import JSONSerializer

from service.config import Settings, get_settings
from service.jobs import model_cache
from service.jobs.catalogue import JOB_TYPES
from service.jobs.inputs import unpack
from service.jobs.metrics import JOB_SECONDS, JOBS, serve_metrics
from service.jobs.submit import prepare
from service.jobs.tasks import run_task
from service.jobs.types import (
    OPERATOR,
    Artifact,
    Caller,
    JobCancelled,
    JobFailure,
    JobInfo,
    JobNotFound,
    JobNotReady,
    JobRequest,
    JobSpec,
    JobStatus,
    Progress,
    QueueUnavailable,
    check_deadline,
    check_job_id,
)
from service.observability import job_id

PERFORM = "service.jobs.redis_backend.perform"
PROGRESS_EVERY_S = 0.25
UPLOAD_GRACE_S = 600
_current_worker: str | None = None


def connect(url: str, timeout: float = 5.0) -> redis.Redis:
    """A client that gives up fast when Redis is down (the API answers 503 instead of hanging)."""
    return redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=timeout, retry_on_timeout=False)


def redis_host(url: str) -> str:
    """host:port of a Redis URL, without credentials (for error messages)."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


class Keys:
    """Our Redis keys next to rq's: the job list, staged uploads, artifacts and cancel flags."""

    def __init__(self, prefix: str) -> None:
        self.jobs = f"{prefix}:jobs"
        self.prefix = prefix

    def upload(self, job_id: str) -> str:
        return f"{self.prefix}:upload:{job_id}"

    def artifact(self, job_id: str) -> str:
        return f"{self.prefix}:artifact:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"


def _ts(value: Any) -> float | None:
    return value.timestamp() if value is not None else None


class RedisJobQueue:
    """JobQueue on Redis + rq."""

    backend = "redis"

    def __init__(self, url: str, settings: Settings) -> None:
        self.settings = settings
        self.url = url
        self.conn = connect(url)
        self.keys = Keys(self.settings.jobs_queue)
        self.queue = Queue(self.settings.jobs_queue, connection=self.conn, serializer=JSONSerializer)

    @contextlib.contextmanager
    def _available(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise QueueUnavailable(f"the job queue (Redis at {redis_host(self.url)}) is unreachable: {exc}") from exc
        except redis.exceptions.OutOfMemoryError as exc:
            # maxmemory with noeviction: Redis refuses writes rather than evict queued jobs
            raise QueueUnavailable(f"the job queue (Redis at {redis_host(self.url)}) is full: it refuses new "
                                   "jobs until some finish and expire (raise its maxmemory)") from exc

    def ping(self) -> None:
        with self._available():
            self.conn.ping()

    def close(self) -> None:
        self.conn.close()

    def submit(self, request: JobRequest, files: list[tuple[str, bytes]] | None = None, caller: Caller = OPERATOR,
               deadline: float | None = None) -> JobInfo:
        spec, upload = prepare(request, files or [], self.settings, caller, deadline)
        ttl = self.settings.jobs_result_ttl_s
        check_deadline(deadline)
        with self._available():
            try:
                if upload is not None:
                    # kept until the job ends (deleted then), at most while a job may wait and run
                    self.conn.set(self.keys.upload(spec.id), upload,
                                  ex=ttl + self.settings.jobs_timeout_s * 2 + 7 * 86400)
                shards = [self._enqueue(shard) for shard in self._shards(spec)]
                spec.shards = [shard.id for shard in shards]
                # a sharded job's parent waits (deferred) until every shard succeeded, then merges their outputs
                job = self._enqueue(spec, depends_on=shards or None)
                self.conn.zadd(self.keys.jobs, {spec.id: spec.created_at})
            except redis.exceptions.OutOfMemoryError:
                self._undo(spec)  # refused, so nothing of it may stay or run (deletes free memory: allowed)
                raise
            return self._info(job)

    def _undo(self, spec: JobSpec) -> None:
        """Remove what a refused submission has written."""
        for each_id in [*(shard.id for shard in self._shards(spec)), spec.id]:
            with contextlib.suppress(NoSuchJobError):
                Job.fetch(each_id, connection=self.conn, serializer=JSONSerializer).delete()
        self.conn.delete(self.keys.upload(spec.id))
        self.conn.zrem(self.keys.jobs, spec.id)

    def _shards(self, spec: JobSpec) -> list[JobSpec]:
        """The shards of a large image job (settings.jobs_shard_size valid images each), or none."""
        size = self.settings.jobs_shard_size
        if not size or not JOB_TYPES[spec.type].shardable or spec.valid_items <= size:
            return []
        return [spec.model_copy(update={"id": f"{spec.id}-{k}", "parent": spec.id, "offset": start,
                                        "count": min(size, spec.valid_items - start)})
                for k, start in enumerate(range(0, spec.valid_items, size))]

    def _enqueue(self, spec: JobSpec, depends_on: list[Job] | None = None) -> Job:
        ttl = self.settings.jobs_result_ttl_s
        retry = Retry(max=spec.max_attempts - 1) if spec.max_attempts > 1 else None
        total = spec.count if spec.count is not None else spec.items
        return self.queue.enqueue(
            PERFORM, spec.model_dump(mode="json"), job_id=spec.id, result_ttl=ttl, failure_ttl=ttl,
            ttl=ttl + 7 * 86400 if depends_on else None, depends_on=depends_on,
            job_timeout=self.settings.jobs_timeout_s, retry=retry, description=f"{spec.type} {spec.model or ''}",
            meta={"attempts": 0, "progress": {"done": 0, "total": total}},
        )

    def _fetch(self, job_id: str, caller: Caller = OPERATOR) -> Job:
        try:
            job = Job.fetch(check_job_id(job_id), connection=self.conn, serializer=JSONSerializer)
        except NoSuchJobError as exc:
            raise JobNotFound(f"no job {job_id!r} (unknown, or its results expired)") from exc
        if not caller.sees(_owner(job)):
            raise JobNotFound(f"no job {job_id!r} (unknown, or its results expired)")
        return job

    def _info(self, job: Job) -> JobInfo:
        spec = JobSpec.model_validate(job.args[0])
        meta = job.meta or {}
        raw = job.get_status(refresh=False)
        status, error = self._status(job, raw, meta, spec)
        progress = Progress(**meta.get("progress", {"done": 0, "total": spec.items}))
        info = JobInfo(
            id=job.id, type=spec.type, model=spec.model, dataset=spec.dataset, status=status, progress=progress,
            created_at=spec.created_at, started_at=meta.get("started_at") or _ts(job.started_at),
            ended_at=_ts(job.ended_at) if status.finished else None, worker=meta.get("worker") or job.worker_name,
            attempts=int(meta.get("attempts", 0)), max_attempts=spec.max_attempts, error=error,
            cancel_requested=bool(self.conn.exists(self.keys.cancel(job.id))), items=spec.items,
            item_errors=len(spec.item_errors),
            has_artifact=status == JobStatus.succeeded and bool(self.conn.exists(self.keys.artifact(job.id))),
        )
        return self._with_shards(info, spec) if spec.shards else info

    def _with_shards(self, info: JobInfo, spec: JobSpec) -> JobInfo:
        """A sharded job as one: progress summed over its shards, workers and attempts from them, and a shard's
        failure or cancellation as the job's (its parent then never runs)."""
        shards = [self._info(s) if s is not None else None
                  for s in Job.fetch_many(spec.shards, connection=self.conn, serializer=JSONSerializer)]
        known = [s for s in shards if s is not None]
        workers = list(dict.fromkeys(s.worker for s in known if s.worker))
        update: dict[str, Any] = {
            "worker": ",".join(workers + ([info.worker] if info.worker and info.worker not in workers else []))
            or None,
            "attempts": max([s.attempts for s in known] + [info.attempts]),
            "started_at": min((s.started_at for s in known if s.started_at), default=info.started_at),
        }
        if not info.status.finished:
            done = sum(s.progress.done for s in known) if info.status == JobStatus.queued else spec.valid_items
            update["progress"] = Progress(done=done, total=spec.valid_items)
            bad = next((s for s in known if s.status in (JobStatus.failed, JobStatus.cancelled)), None)
            if bad is not None or len(known) < len(shards):
                status = bad.status if bad is not None else JobStatus.failed
                error = bad.error if bad is not None else None
                reason = error.reason if error else "a shard's record expired before the job ended"
                update |= {"status": status, "ended_at": bad.ended_at if bad else None,
                           "error": JobFailure(code=error.code if error else "job_failed",
                                               reason=f"shard {bad.id if bad else '?'}: {reason}")}
            elif any(s.status != JobStatus.queued for s in known):
                update["status"] = JobStatus.running
        return info.model_copy(update=update)

    def _status(self, job: Job, raw: Any, meta: dict, spec: JobSpec) -> tuple[JobStatus, JobFailure | None]:
        if raw == RqStatus.FINISHED:
            return JobStatus.succeeded, None
        if raw in (RqStatus.CANCELED, RqStatus.STOPPED) or (raw == RqStatus.FAILED and meta.get("cancelled")):
            return JobStatus.cancelled, JobFailure(code="cancelled", reason="cancelled on request")
        if raw == RqStatus.FAILED:
            if meta.get("error"):
                return JobStatus.failed, JobFailure(**meta["error"])
            result = job.latest_result()
            text = (result.exc_string or "") if result is not None else ""
            attempts = int(meta.get("attempts", 0))
            if "AbandonedJobError" in text or "terminated unexpectedly" in text:
                reason = (f"the worker running the job died (killed, or out of memory) on each of {attempts} "
                          f"attempt(s) (limit {spec.max_attempts}); last worker: {meta.get('worker')}")
                return JobStatus.failed, JobFailure(code="worker_lost", reason=reason)
            if "JobTimeoutException" in text:
                return JobStatus.failed, JobFailure(code="timeout", reason="the job ran longer than "
                                                    f"{self.settings.jobs_timeout_s} s")
            last = text.strip().splitlines()[-1] if text.strip() else "unknown error"
            return JobStatus.failed, JobFailure(code="job_failed", reason=last)
        if raw == RqStatus.STARTED:
            return JobStatus.running, None
        return JobStatus.queued, None

    def status(self, job_id: str, caller: Caller = OPERATOR) -> JobInfo:
        with self._available():
            return self._info(self._fetch(job_id, caller))

    def result(self, job_id: str, caller: Caller = OPERATOR) -> dict:
        with self._available():
            job = self._fetch(job_id, caller)
            info = self._info(job)
            _require_success(info)
            value = job.return_value()
            if value is None:
                raise JobNotFound(f"the result of job {job_id!r} expired")
            return value

    def artifact(self, job_id: str, caller: Caller = OPERATOR) -> Artifact:
        with self._available():
            info = self._info(self._fetch(job_id, caller))
            _require_success(info)
            data = self.conn.hgetall(self.keys.artifact(job_id))
            if not data:
                raise JobNotFound(f"job {job_id!r} has no artifact (or it expired)", code="no_artifact")
            return Artifact(filename=data[b"filename"].decode(), media_type=data[b"media_type"].decode(),
                            data=data[b"data"])

    def cancel(self, job_id: str, caller: Caller = OPERATOR) -> JobInfo:
        with self._available():
            job = self._fetch(job_id, caller)
            info = self._info(job)
            if info.status.finished:
                return info
            ttl = self.settings.jobs_result_ttl_s
            self.conn.set(self.keys.cancel(job_id), 1, ex=ttl)
            spec = JobSpec.model_validate(job.args[0])
            for shard_id in spec.shards:
                self.conn.set(self.keys.cancel(shard_id), 1, ex=ttl)
            for each in [*Job.fetch_many(spec.shards, connection=self.conn, serializer=JSONSerializer), job]:
                if each is not None and each.get_status(refresh=False) in (
                        RqStatus.QUEUED, RqStatus.DEFERRED, RqStatus.SCHEDULED):
                    with contextlib.suppress(InvalidJobOperation):
                        each.cancel()
                        self.conn.expire(each.key, ttl)
            if self._info(self._fetch(job_id)).status == JobStatus.cancelled:
                self.conn.delete(self.keys.upload(job_id))
            return self._info(self._fetch(job_id))

    def discard(self, job_id: str) -> None:
        with self._available():
            job = self._fetch(job_id)
            spec = JobSpec.model_validate(job.args[0])
            for shard_id in spec.shards:
                self.conn.set(self.keys.cancel(shard_id), 1, ex=self.settings.jobs_result_ttl_s)
            self.conn.set(self.keys.cancel(job_id), 1, ex=self.settings.jobs_result_ttl_s)
            for each in [*Job.fetch_many(spec.shards, connection=self.conn, serializer=JSONSerializer), job]:
                if each is not None and each.get_status(refresh=False) != RqStatus.STARTED:
                    each.delete()
            self.conn.zrem(self.keys.jobs, job_id)
            self.conn.delete(self.keys.upload(job_id))

    def list(self, limit: int = 50, status: JobStatus | None = None, caller: Caller = OPERATOR) -> list[JobInfo]:
        with self._available():
            out: list[JobInfo] = []
            start, page = 0, max(limit, 50)
            while len(out) < limit:
                ids = [i.decode() for i in self.conn.zrevrange(self.keys.jobs, start, start + page - 1)]
                if not ids:
                    break
                jobs = Job.fetch_many(ids, connection=self.conn, serializer=JSONSerializer)
                gone = [job_id for job_id, job in zip(ids, jobs, strict=True) if job is None]
                if gone:
                    self.conn.zrem(self.keys.jobs, *gone)
                for job in jobs:
                    if job is not None and caller.sees(_owner(job)):
                        info = self._info(job)
                        if status is None or info.status == status:
                            out.append(info)
                start += page - len(gone) if gone else page
            return out[:limit]


def _owner(job: Job) -> str | None:
    spec = job.args[0] if job.args and isinstance(job.args[0], dict) else {}
    return spec.get("owner")


def _require_success(info: JobInfo) -> None:
    if info.status == JobStatus.succeeded:
        return
    detail = f"job {info.id} is {info.status.value}"
    if info.error:
        detail += f": {info.error.reason}"
    code = {"failed": "job_failed", "cancelled": "job_cancelled"}.get(info.status.value, "job_not_finished")
    raise JobNotReady(detail, code=code)


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
