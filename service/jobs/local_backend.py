"""The in-process backend: jobs run in a thread pool inside the API process, with the same API and behaviour as
the Redis backend, for a laptop with no Redis. Nothing survives a restart of the process."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.config import Settings
from service.jobs import model_cache
from service.jobs.inputs import unpack
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
    check_deadline,
    check_job_id,
)


@dataclass
class _Job:
    spec: JobSpec
    upload: bytes | None
    status: JobStatus = JobStatus.queued
    progress: Progress = field(default_factory=Progress)
    started_at: float | None = None
    ended_at: float | None = None
    attempts: int = 0
    error: JobFailure | None = None
    cancel_requested: bool = False
    summary: dict[str, Any] | None = None
    artifact: Artifact | None = None


class LocalTaskContext:
    """What a task sees in the in-process backend."""

    def __init__(self, job: _Job, settings: Settings, lock: threading.Lock) -> None:
        self.job, self.settings, self._lock = job, settings, lock

    def load_upload(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.job.upload is None:
            raise RuntimeError("the job has no uploaded images")
        return unpack(self.job.upload)

    def progress(self, done: int, total: int) -> None:
        with self._lock:
            self.job.progress = Progress(done=done, total=total)
            if self.job.cancel_requested:
                raise JobCancelled()

    def save_artifact(self, filename: str, media_type: str, data: bytes) -> None:
        with self._lock:
            self.job.artifact = Artifact(filename=filename, media_type=media_type, data=data)


class InProcessJobQueue:
    """JobQueue on a thread pool (settings.jobs_local_threads threads)."""

    backend = "in-process"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        model_cache.configure(settings.model_folders(), settings.device, settings.allow_pickled_detectors)
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.settings.jobs_local_threads, thread_name_prefix="fisher-guard-job")

    def ping(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                if not job.status.finished:
                    job.cancel_requested = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, request: JobRequest, files: list[tuple[str, bytes]] | None = None, caller: Caller = OPERATOR,
               deadline: float | None = None) -> JobInfo:
        spec, upload = prepare(request, files or [], self.settings, caller, deadline)
        job = _Job(spec=spec, upload=upload, progress=Progress(done=0, total=spec.items))
        with self._lock:
            check_deadline(deadline)
            self._purge()
            self._jobs[spec.id] = job
            info = self._info(job)
        self._pool.submit(self._run, job)
        return info

    def discard(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.pop(check_job_id(job_id), None)
            if job is not None:
                job.cancel_requested = True
                if job.status == JobStatus.queued:
                    job.status = JobStatus.cancelled

    def _run(self, job: _Job) -> None:
        with self._lock:
            if job.status != JobStatus.queued:
                return
            job.status, job.started_at, job.attempts = JobStatus.running, time.time(), job.attempts + 1
        ctx = LocalTaskContext(job, self.settings, self._lock)
        try:
            if job.cancel_requested:
                raise JobCancelled()
            summary = run_task(job.spec, ctx)
            status, error = JobStatus.succeeded, None
        except JobCancelled:
            summary, status = None, JobStatus.cancelled
            error = JobFailure(code="cancelled", reason="cancelled on request")
        except Exception as exc:  # the job fails with its reason; the thread goes on
            summary, status = None, JobStatus.failed
            error = JobFailure(code="job_failed", reason=f"{type(exc).__name__}: {exc}")
        with self._lock:
            job.summary, job.status, job.error, job.ended_at, job.upload = summary, status, error, time.time(), None

    def _purge(self) -> None:
        """Forget finished jobs older than the result TTL (call with the lock held)."""
        now = time.time()
        expired = [job_id for job_id, job in self._jobs.items()
                   if job.ended_at is not None and now - job.ended_at > job.spec.result_ttl_s]
        for job_id in expired:
            del self._jobs[job_id]

    def _get(self, job_id: str, caller: Caller) -> _Job:
        self._purge()
        job = self._jobs.get(check_job_id(job_id))
        if job is None or not caller.sees(job.spec.owner):
            raise JobNotFound(f"no job {job_id!r} (unknown, or its results expired)")
        return job

    @staticmethod
    def _info(job: _Job) -> JobInfo:
        spec = job.spec
        return JobInfo(
            id=spec.id, type=spec.type, model=spec.model, dataset=spec.dataset, status=job.status,
            progress=job.progress, created_at=spec.created_at, started_at=job.started_at, ended_at=job.ended_at,
            worker="in-process" if job.started_at else None, attempts=job.attempts, max_attempts=1,
            error=job.error, cancel_requested=job.cancel_requested, items=spec.items,
            item_errors=len(spec.item_errors), has_artifact=job.status == JobStatus.succeeded and bool(job.artifact),
        )

    def status(self, job_id: str, caller: Caller = OPERATOR) -> JobInfo:
        with self._lock:
            return self._info(self._get(job_id, caller))

    def _finished(self, job_id: str, caller: Caller) -> _Job:
        job = self._get(job_id, caller)
        if job.status != JobStatus.succeeded:
            detail = f"job {job_id} is {job.status.value}" + (f": {job.error.reason}" if job.error else "")
            code = {"failed": "job_failed", "cancelled": "job_cancelled"}.get(job.status.value, "job_not_finished")
            raise JobNotReady(detail, code=code)
        return job

    def result(self, job_id: str, caller: Caller = OPERATOR) -> dict:
        with self._lock:
            return dict(self._finished(job_id, caller).summary or {})

    def artifact(self, job_id: str, caller: Caller = OPERATOR) -> Artifact:
        with self._lock:
            job = self._finished(job_id, caller)
            if job.artifact is None:
                raise JobNotFound(f"job {job_id!r} has no artifact", code="no_artifact")
            return job.artifact

    def cancel(self, job_id: str, caller: Caller = OPERATOR) -> JobInfo:
        with self._lock:
            job = self._get(job_id, caller)
            if not job.status.finished:
                job.cancel_requested = True
                if job.status == JobStatus.queued:
                    job.status, job.ended_at, job.upload = JobStatus.cancelled, time.time(), None
                    job.error = JobFailure(code="cancelled", reason="cancelled on request")
            return self._info(job)

    def list(self, limit: int = 50, status: JobStatus | None = None, caller: Caller = OPERATOR) -> list[JobInfo]:
        with self._lock:
            self._purge()
            jobs = sorted(self._jobs.values(), key=lambda j: j.spec.created_at, reverse=True)
            return [self._info(j) for j in jobs
                    if (status is None or j.status == status) and caller.sees(j.spec.owner)][:limit]
