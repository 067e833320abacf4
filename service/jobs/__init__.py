"""Long jobs: a queue interface with a Redis (rq) backend and an in-process backend, workers, task functions."""

from service.jobs.queue import JobQueue, get_job_queue
from service.jobs.types import (
    JOB_TYPES,
    Artifact,
    JobError,
    JobInfo,
    JobInputError,
    JobNotFound,
    JobNotReady,
    JobRequest,
    JobStatus,
    QueueUnavailable,
)

__all__ = ["JOB_TYPES", "Artifact", "JobError", "JobInfo", "JobInputError", "JobNotFound", "JobNotReady", "JobQueue",
           "JobRequest", "JobStatus", "QueueUnavailable", "get_job_queue"]
