"""Long jobs over HTTP: submit (202 + status URL), follow, fetch the result and artifact, cancel, list.

The router knows only the JobQueue interface (service.jobs): Redis or in-process is the settings' choice. When the
queue cannot be reached the job endpoints answer 503 with the reason; the other endpoints are unaffected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from service.api.errors import ProblemError, problem_responses
from service.api.json_body import OffLoopJSONRoute
from service.api.middleware import request_deadline
from service.api.security import accepted_keys, key_matches, presented_key
from service.config import Settings
from service.jobs import JobError, JobInfo, JobQueue, JobRequest, JobStatus, get_job_queue
from service.jobs.catalogue import public_types
from service.jobs.queue import UnavailableJobQueue
from service.jobs.types import Caller, key_id

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=OffLoopJSONRoute)
_discarding: set[asyncio.Future] = set()
SUBMIT_MARGIN = 0.1  # a submission's checks stop this share of the request timeout (at most 2 s) before it

SUBMIT_DESCRIPTION = f"""Submit a long job. Types: {"; ".join(f"`{k}`: {v}" for k, v in public_types().items())}

Send either `application/json` (a JobRequest: `type`, `model`, `dataset` such as `mnist:test`, `limit`, `params`)
or `multipart/form-data` with the same fields as form fields (`params` as a JSON string) and the images as one or
more `files` (.npz with an `images` array and optional `labels`, .npy, a .zip of PNG/JPEG files, or PNG/JPEG files).
Bad input is refused here (4xx) where it can be checked; a bad item inside a good archive is listed in the job's
result and the other items go on. Answers 202 with the job and its URLs (`Location`: the status URL)."""


class JobView(JobInfo):
    """A job with the URLs to follow it."""

    status_url: str
    result_url: str
    artifact_url: str | None = None


class JobList(BaseModel):
    jobs: list[JobView]


class JobResult(BaseModel):
    job: JobView
    summary: dict[str, Any] = Field(description="The job type's JSON summary (counts, metrics, per-item errors).")


def view(info: JobInfo) -> JobView:
    base = f"/v1/jobs/{info.id}"
    return JobView(**info.model_dump(), status_url=base, result_url=f"{base}/result",
                   artifact_url=f"{base}/artifact" if info.has_artifact else None)


def api_job_queue(settings: Settings) -> JobQueue:
    """The settings' queue; with several API processes and no Redis, none: the in-process backend keeps a job in
    the process that took it, so another process would answer its status with 404 (the job would look lost)."""
    if not settings.redis_url and settings.workers > 1:
        reason = (f"jobs need Redis when the API runs {settings.workers} worker processes (the in-process backend "
                  "keeps a job in one process): set FISHER_GUARD_REDIS_URL, or serve with one worker")
        log.warning("job endpoints unavailable: %s", reason)
        return UnavailableJobQueue(reason)
    return get_job_queue(settings)


def job_queue(request: Request) -> JobQueue:
    queue = getattr(request.app.state, "job_queue", None)
    if queue is None:
        queue = request.app.state.job_queue = api_job_queue(request.app.state.settings)
    return queue


QueueDep = Annotated[JobQueue, Depends(job_queue)]


async def job_caller(request: Request) -> Caller:
    """Whose jobs a request may see: with API keys, its key's own (all of them with an admin key); without keys
    there is no identity, and every job is everyone's."""
    settings: Settings = request.app.state.settings
    if not accepted_keys(settings):
        return Caller()
    key = presented_key(request) or ""  # require_api_key has already refused a request without a valid key
    return Caller(key_id=key_id(key), admin=key_matches(key, settings.admin_api_keys))


CallerDep = Annotated[Caller, Depends(job_caller)]


async def on_startup(app: Any) -> None:
    app.state.job_queue = api_job_queue(app.state.settings)


async def on_shutdown(app: Any) -> None:
    queue = getattr(app.state, "job_queue", None)
    if queue is not None:
        await asyncio.to_thread(queue.close)


def problem(exc: JobError) -> ProblemError:
    headers = {"Retry-After": "5"} if exc.status == 503 else None
    return ProblemError(exc.status, exc.code, exc.detail, headers=headers, **exc.extra)


async def call(fn: Any, *args: Any) -> Any:
    """A queue call off the event loop, its errors as problem documents."""
    try:
        return await asyncio.to_thread(fn, *args)
    except JobError as exc:
        raise problem(exc) from exc


def submit_deadline() -> float | None:
    """When a submission's checks must stop: ahead of the request's timeout, so that its answer is ours."""
    deadline = request_deadline.get()
    if deadline is None:
        return None
    return deadline - min(2.0, SUBMIT_MARGIN * max(deadline - time.monotonic(), 0.0))


async def submit_job(queue: JobQueue, job_request: JobRequest, files: list[tuple[str, bytes]],
                     caller: Caller) -> JobInfo:
    """Submit in a thread. If the request is cancelled meanwhile (timeout, client gone), a job that the thread
    still creates is discarded: the client never got its id, so it must not exist."""
    work = asyncio.ensure_future(asyncio.to_thread(queue.submit, job_request, files, caller, submit_deadline()))

    def discard_orphan(done: asyncio.Future) -> None:
        if not done.cancelled() and done.exception() is None:
            info: JobInfo = done.result()
            log.warning("submission of job %s was abandoned by its request; discarding the job", info.id)
            task = asyncio.ensure_future(asyncio.to_thread(queue.discard, info.id))
            _discarding.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(_discarding.discard)

    try:
        return await asyncio.shield(work)
    except JobError as exc:
        raise problem(exc) from exc
    except asyncio.CancelledError:
        work.add_done_callback(discard_orphan)
        raise


async def read_submission(request: Request) -> tuple[JobRequest, list[tuple[str, bytes]]]:
    """A JobRequest and the uploaded files from a JSON or multipart body."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    files: list[tuple[str, bytes]] = []
    try:
        if media == "application/json":
            try:
                data = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ProblemError(400, "invalid_json", "the request body is not valid JSON") from exc
            return JobRequest.model_validate(data), files
        if media != "multipart/form-data":
            raise ProblemError(415, "unsupported_media_type", "POST /v1/jobs takes application/json or "
                               f"multipart/form-data, not {media or 'a body without a type'}")
        settings = request.app.state.settings
        form = await request.form(max_files=settings.jobs_max_items, max_fields=100)
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or f"file{len(files)}", await value.read()))
            elif key == "params":
                try:
                    fields["params"] = json.loads(value or "{}")
                except json.JSONDecodeError as exc:
                    raise ProblemError(400, "invalid_json", "the 'params' form field is not valid JSON") from exc
            elif value != "":
                fields[key] = value
        return JobRequest.model_validate(fields), files
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise ProblemError(422, "validation_error", f"{where}: {first['msg']}") from exc


@router.post("", status_code=202, response_model=JobView, summary="Submit a job (202: queued).",
             description=SUBMIT_DESCRIPTION, responses=problem_responses(400, 401, 413, 415, 422, 503),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": JobRequest.model_json_schema()},
                 "multipart/form-data": {"schema": {"type": "object", "required": ["type"], "properties": {
                     "type": {"type": "string"}, "model": {"type": "string"}, "dataset": {"type": "string"},
                     "limit": {"type": "integer"}, "params": {"type": "string", "description": "JSON object"},
                     "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
async def submit(request: Request, response: Response, queue: QueueDep, caller: CallerDep) -> JobView:
    job_request, files = await read_submission(request)
    info = view(await submit_job(queue, job_request, files, caller))
    response.headers["Location"] = info.status_url
    return info


@router.get("", response_model=JobList, responses=problem_responses(401, 503), summary="Recent jobs, newest first.")
async def list_jobs(queue: QueueDep, caller: CallerDep, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                    status: JobStatus | None = None) -> JobList:
    return JobList(jobs=[view(i) for i in await call(queue.list, limit, status, caller)])


@router.get("/{job_id}", response_model=JobView, responses=problem_responses(401, 404, 503),
            summary="A job's status, progress, timestamps, worker and error.")
async def job_status(job_id: str, queue: QueueDep, caller: CallerDep) -> JobView:
    return view(await call(queue.status, job_id, caller))


@router.get("/{job_id}/result", response_model=JobResult, responses=problem_responses(401, 404, 409, 503),
            summary="The JSON summary of a succeeded job (409 while queued or running, or when it failed).")
async def job_result(job_id: str, queue: QueueDep, caller: CallerDep) -> JobResult:
    summary = await call(queue.result, job_id, caller)
    return JobResult(job=view(await call(queue.status, job_id, caller)), summary=summary)


@router.get("/{job_id}/artifact", response_class=Response, responses={
    200: {"description": "The artifact file (CSV, .npz, JSON or zip).",
          "content": {"text/csv": {}, "application/x-npz": {}, "application/zip": {}, "application/json": {}}},
    **problem_responses(401, 404, 409, 503)}, summary="Download a succeeded job's artifact.")
async def job_artifact(job_id: str, queue: QueueDep, caller: CallerDep) -> Response:
    artifact = await call(queue.artifact, job_id, caller)
    return Response(artifact.data, media_type=artifact.media_type,
                    headers={"Content-Disposition": f'attachment; filename="{artifact.filename}"'})


@router.delete("/{job_id}", status_code=202, response_model=JobView, responses=problem_responses(401, 404, 503),
               summary="Cancel a job: at once when queued, at its next progress step when running.")
async def cancel_job(job_id: str, queue: QueueDep, caller: CallerDep) -> JobView:
    return view(await call(queue.cancel, job_id, caller))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobView, responses=problem_responses(401, 404, 503),
             summary="Cancel a job (same as DELETE /v1/jobs/{job_id}).")
async def cancel_job_post(job_id: str, queue: QueueDep, caller: CallerDep) -> JobView:
    return view(await call(queue.cancel, job_id, caller))
