"""Long jobs: a queue interface with Redis (rq) and in-process backends, workers, and the catalogue of job types."""

from service.jobs.queue import JobQueue, get_job_queue
from service.jobs.types import (
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

__all__ = ["Artifact", "JobError", "JobInfo", "JobInputError", "JobNotFound", "JobNotReady", "JobQueue",
           "JobRequest", "JobStatus", "QueueUnavailable", "get_job_queue"]
