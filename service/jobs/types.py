"""What a job is: its request, its spec (what a worker runs), its status as clients see it, and the errors."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class JobError(Exception):
    """Base of the queue's errors; `status` is the HTTP status the API answers with."""

    status = 500
    code = "job_error"

    def __init__(self, detail: str, *, code: str | None = None, status: int | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.code
        self.status = status or self.status
        self.extra = extra or {}


class JobInputError(JobError):
    """Bad job input found at submission (unknown type or model, bad archive, limits, invalid images)."""

    status = 422
    code = "invalid_job"


class JobNotFound(JobError):
    status = 404
    code = "job_not_found"


class JobNotReady(JobError):
    """The job has no result (yet): queued, running, failed or cancelled."""

    status = 409
    code = "job_not_finished"


class QueueUnavailable(JobError):
    """The queue backend (Redis) cannot be reached."""

    status = 503
    code = "queue_unavailable"


JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def check_job_id(job_id: str) -> str:
    """`job_id` when it can name a job (letters, digits, '_' and '-'), else JobNotFound: a backend never sees
    another id (rq refuses such ids with a ValueError)."""
    if not JOB_ID.fullmatch(job_id):
        shown = job_id if len(job_id) <= 64 else job_id[:64] + "..."
        raise JobNotFound(f"no job {shown!r}: job ids are 1-128 letters, digits, '_' or '-'")
    return job_id


def key_id(api_key: str) -> str:
    """A stable, non-secret id of an API key (what a job records as its owner; the key itself is never stored)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Caller:
    """Who asks the queue. A job records its submitter's key id; a caller sees only the jobs it submitted, unless
    it is an admin (an admin key, the CLI on the server, or an API without keys, where there is no identity)."""

    key_id: str | None = None
    admin: bool = True

    def sees(self, owner: str | None) -> bool:
        return self.admin or (self.key_id is not None and owner == self.key_id)


OPERATOR = Caller()  # the CLI and the server's own code: every job


class SubmissionTimeout(JobError):
    """Checking a submission took longer than its deadline: nothing was enqueued."""

    status = 504
    code = "timeout"


def check_deadline(deadline: float | None) -> None:
    """SubmissionTimeout once time.monotonic() is past `deadline` (None: no deadline)."""
    if deadline is not None and time.monotonic() > deadline:
        raise SubmissionTimeout("checking the submission took longer than the request timeout, so nothing was "
                                "queued: send fewer or smaller files per job")


class JobCancelled(Exception):
    """Raised inside a task when its job was cancelled; the job ends `cancelled`."""


class JobRequest(BaseModel):
    """A submission: job type, model, where the images come from, and the type's parameters."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    type: str = Field(description="The job type (service.jobs.catalogue: screen, least-norm, attack, "
                      "train-detector, evaluate).")
    model: str | None = Field(None, description="Registry name of the model (default: the settings' first model).")
    dataset: str | None = Field(None, description="Server-side images instead of uploads: 'mnist:test', "
                                "'mnist:val', 'mnist:train'.")
    limit: int | None = Field(None, ge=1, description="Use only the first N images of the dataset or upload.")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters of the job type.")


def one_of(value: str, known: Iterable[str], what: str) -> str:
    """`value` when it is one of `known`, else a ValueError that lists them (a pydantic validation error)."""
    names = list(known)
    if value not in names:
        raise ValueError(f"unknown {what} {value!r} (known: {', '.join(names)})")
    return value


class ItemError(BaseModel):
    """One image of a batch that could not be used, and why."""

    index: int
    name: str
    reason: str


class JobSpec(BaseModel):
    """What a worker needs to run a job; stored with the job (JSON)."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    type: str
    model: str | None = None
    dataset: str | None = None
    limit: int | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    has_upload: bool = False
    items: int = 0
    item_names: list[str] = Field(default_factory=list)
    item_errors: list[ItemError] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)
    owner: str | None = Field(None, description="Key id of the API key that submitted the job (None: no keys).")
    result_ttl_s: int = 86400
    max_attempts: int = 1
    # sharding (Redis backend): a shard runs valid items [offset, offset + count) of its parent's images and
    # reads the parent's upload; the parent lists its shards and, once they are done, merges their outputs
    parent: str | None = None
    offset: int = 0
    count: int | None = None
    shards: list[str] = Field(default_factory=list)

    @property
    def valid_items(self) -> int:
        return self.items - len(self.item_errors)

    @property
    def upload_id(self) -> str:
        return self.parent or self.id


class Progress(BaseModel):
    done: int = 0
    total: int = 0


class JobFailure(BaseModel):
    code: str
    reason: str


class JobInfo(BaseModel):
    """A job as clients see it."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    type: str
    model: str | None = None
    dataset: str | None = None
    status: JobStatus
    progress: Progress = Field(default_factory=Progress)
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    worker: str | None = None
    attempts: int = 0
    max_attempts: int = 1
    error: JobFailure | None = None
    cancel_requested: bool = False
    items: int = 0
    item_errors: int = 0
    has_artifact: bool = False


class Artifact(BaseModel):
    """A job's downloadable file."""

    filename: str
    media_type: str
    data: bytes
