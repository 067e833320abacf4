"""The queue interface the API and the CLI talk to, and the choice of backend (Redis when configured)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from service.config import Settings, get_settings
from service.jobs.types import Artifact, JobInfo, JobRequest, JobStatus, QueueUnavailable


@runtime_checkable
class JobQueue(Protocol):
    """Submit jobs and follow them; both backends behave the same (tests/test_jobs.py runs both)."""

    backend: str

    def submit(self, request: JobRequest, files: list[tuple[str, bytes]] | None = None) -> JobInfo:
        """Validate (JobInputError on bad input) and enqueue; returns the queued job."""
        ...

    def status(self, job_id: str) -> JobInfo:
        """The job's status (JobNotFound when unknown or expired)."""
        ...

    def result(self, job_id: str) -> dict:
        """The JSON summary of a succeeded job (JobNotReady otherwise)."""
        ...

    def artifact(self, job_id: str) -> Artifact:
        """The downloadable file of a succeeded job (JobNotReady / JobNotFound otherwise)."""
        ...

    def cancel(self, job_id: str) -> JobInfo:
        """Cancel a queued job at once, or ask a running one to stop at its next progress step."""
        ...

    def list(self, limit: int = 50, status: JobStatus | None = None) -> list[JobInfo]:
        """Recent jobs, newest first."""
        ...

    def ping(self) -> None:
        """QueueUnavailable when the backend cannot be reached."""
        ...

    def close(self) -> None:
        ...


def get_job_queue(settings: Settings | None = None) -> JobQueue:
    """Redis backend when settings.redis_url is set, else the in-process backend."""
    settings = settings or get_settings()
    if settings.redis_url:
        from service.jobs.redis_backend import RedisJobQueue

        return RedisJobQueue(settings.redis_url, settings)
    from service.jobs.local_backend import InProcessJobQueue

    return InProcessJobQueue(settings)


class UnavailableJobQueue:
    """A JobQueue that answers every call with QueueUnavailable(reason): for a configuration that cannot run
    jobs correctly (the API's job endpoints then answer 503 with the reason; nothing is accepted to be lost)."""

    backend = "unavailable"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _refuse(self, *_: object, **__: object) -> Any:
        raise QueueUnavailable(self.reason)

    submit = status = result = artifact = cancel = list = ping = _refuse

    def close(self) -> None:
        return None
