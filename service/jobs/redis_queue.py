"""The Redis job queue, on rq: what the API and the CLI talk to (as rq's queue.py). The workers that run the jobs
are service.jobs.redis_worker; crash recovery is described there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RqStatus
from rq.serializers import JSONSerializer

from service.config import Settings
from service.jobs.catalogue import JOB_TYPES
from service.jobs.submit import prepare
from service.jobs.types import (
    OPERATOR,
    Artifact,
    Caller,
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

PERFORM = "service.jobs.redis_worker.perform"  # what a worker runs for each job


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


