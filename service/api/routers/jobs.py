"""Long jobs over HTTP: submit (202 + status URL), follow, fetch the result and artifact, cancel, list.

The router knows only the JobQueue interface (service.jobs): Redis or in-process is the settings' choice. When the
queue cannot be reached the job endpoints answer 503 with the reason; the other endpoints are unaffected.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from service.api.errors import ProblemError, problem_responses
from service.config import Settings
from service.jobs import JOB_TYPES, JobError, JobInfo, JobQueue, JobRequest, JobStatus, get_job_queue
from service.jobs.queue import UnavailableJobQueue

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

SUBMIT_DESCRIPTION = f"""Submit a long job. Types: {"; ".join(f"`{k}`: {v}" for k, v in JOB_TYPES.items())}

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


async def on_startup(app: Any) -> None:
    app.state.job_queue = api_job_queue(app.state.settings)


async def on_shutdown(app: Any) -> None:
    queue = getattr(app.state, "job_queue", None)
    if queue is not None:
        await asyncio.to_thread(queue.close)


async def call(fn: Any, *args: Any) -> Any:
    """A queue call off the event loop, its errors as problem documents."""
    try:
        return await asyncio.to_thread(fn, *args)
    except JobError as exc:
        headers = {"Retry-After": "5"} if exc.status == 503 else None
        raise ProblemError(exc.status, exc.code, exc.detail, headers=headers, **exc.extra) from exc


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
async def submit(request: Request, response: Response, queue: QueueDep) -> JobView:
    job_request, files = await read_submission(request)
    info = view(await call(queue.submit, job_request, files))
    response.headers["Location"] = info.status_url
    return info


@router.get("", response_model=JobList, responses=problem_responses(401, 503), summary="Recent jobs, newest first.")
async def list_jobs(queue: QueueDep, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                    status: JobStatus | None = None) -> JobList:
    return JobList(jobs=[view(i) for i in await call(queue.list, limit, status)])


@router.get("/{job_id}", response_model=JobView, responses=problem_responses(401, 404, 503),
            summary="A job's status, progress, timestamps, worker and error.")
async def job_status(job_id: str, queue: QueueDep) -> JobView:
    return view(await call(queue.status, job_id))


@router.get("/{job_id}/result", response_model=JobResult, responses=problem_responses(401, 404, 409, 503),
            summary="The JSON summary of a succeeded job (409 while queued or running, or when it failed).")
async def job_result(job_id: str, queue: QueueDep) -> JobResult:
    summary = await call(queue.result, job_id)
    return JobResult(job=view(await call(queue.status, job_id)), summary=summary)


@router.get("/{job_id}/artifact", response_class=Response, responses={
    200: {"description": "The artifact file (CSV, .npz, JSON or zip).",
          "content": {"text/csv": {}, "application/x-npz": {}, "application/zip": {}, "application/json": {}}},
    **problem_responses(401, 404, 409, 503)}, summary="Download a succeeded job's artifact.")
async def job_artifact(job_id: str, queue: QueueDep) -> Response:
    artifact = await call(queue.artifact, job_id)
    return Response(artifact.data, media_type=artifact.media_type,
                    headers={"Content-Disposition": f'attachment; filename="{artifact.filename}"'})


@router.delete("/{job_id}", status_code=202, response_model=JobView, responses=problem_responses(401, 404, 503),
               summary="Cancel a job: at once when queued, at its next progress step when running.")
async def cancel_job(job_id: str, queue: QueueDep) -> JobView:
    return view(await call(queue.cancel, job_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobView, responses=problem_responses(401, 404, 503),
             summary="Cancel a job (same as DELETE /v1/jobs/{job_id}).")
async def cancel_job_post(job_id: str, queue: QueueDep) -> JobView:
    return view(await call(queue.cancel, job_id))
