"""The queue interface the API and the CLI talk to, and the choice of backend (Redis when configured)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from service.config import Settings
from service.jobs.types import OPERATOR, Artifact, Caller, JobInfo, JobRequest, JobStatus, QueueUnavailable


@runtime_checkable
class JobQueue(Protocol):
    """Submit jobs and follow them; both backends behave the same (tests/test_jobs.py runs both).

    Every id is checked (`check_job_id`) before a backend sees it, and a job the caller may not see is
    answered as unknown (JobNotFound), so that ids of other keys' jobs cannot be probed."""

    backend: str

    def submit(self, request: JobRequest, files: list[tuple[str, bytes]] | None = None, caller: Caller = OPERATOR,
               deadline: float | None = None) -> JobInfo:
        """Validate (JobInputError on bad input) and enqueue, owned by the caller; returns the queued job.
        Past `deadline` (time.monotonic()) the checks stop with SubmissionTimeout and nothing is enqueued."""
        ...

    def status(self, job_id: str, caller: Caller = OPERATOR) -> JobInfo:
        """The job's status (JobNotFound when unknown, expired or not the caller's)."""
        ...

    def result(self, job_id: str, caller: Caller = OPERATOR) -> dict:
        """The JSON summary of a succeeded job (JobNotReady otherwise)."""
        ...

    def artifact(self, job_id: str, caller: Caller = OPERATOR) -> Artifact:
        """The downloadable file of a succeeded job (JobNotReady / JobNotFound otherwise)."""
        ...

    def cancel(self, job_id: str, caller: Caller = OPERATOR) -> JobInfo:
        """Cancel a queued job at once, or ask a running one to stop at its next progress step."""
        ...

    def discard(self, job_id: str) -> None:
        """Remove a job that its submitter never heard of (its submission timed out): cancelled and forgotten."""
        ...

    def list(self, limit: int = 50, status: JobStatus | None = None, caller: Caller = OPERATOR) -> list[JobInfo]:
        """Recent jobs the caller may see, newest first."""
        ...

    def ping(self) -> None:
        """QueueUnavailable when the backend cannot be reached."""
        ...

    def close(self) -> None:
        ...


def get_job_queue(settings: Settings) -> JobQueue:
    """Redis backend when settings.redis_url is set, else the in-process backend."""
    if settings.redis_url:
        from service.jobs.redis_queue import RedisJobQueue

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

    submit = status = result = artifact = cancel = discard = list = ping = _refuse

    def close(self) -> None:
        return None
