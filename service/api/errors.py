"""RFC 9457 problem details for every error: `application/problem+json` with a machine-readable `code`.

Raise `ProblemError(status, code, detail)` anywhere in a request; the handlers here turn it, validation errors,
unknown routes, bad image inputs and any unexpected exception into a problem document (never a stack trace).
On the Open Inference Protocol paths (/v2) the same errors take that protocol's form instead: `application/json`
with the message in `error`, which is what Triton's and KServe's clients read and show (`V2Error`).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.data.images import ImageInputError
from service.observability import request_id

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"

# status of each image-input problem; anything not listed is 422
INPUT_ERROR_STATUS = {
    "unsupported_format": 415,
    "image_too_large": 413,
    "batch_too_large": 413,
    "invalid_base64": 400,
}

STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 408: "request_timeout", 409: "conflict", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "validation_error", 429: "too_many_requests", 500: "internal_error",
    503: "service_unavailable", 504: "timeout",
}


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str = Field(description="URI naming the kind of problem: urn:fisher-guard:problem:<code>.")
    title: str = Field(description="The HTTP status phrase.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="One sentence saying what was wrong.")
    code: str = Field(description="Machine-readable problem code, e.g. 'corrupt_image', 'unknown_model'.")
    instance: str | None = Field(None, description="The request path.")
    request_id: str | None = Field(None, description="The X-Request-ID of the request, to quote in support requests.")
    errors: list[dict[str, Any]] | None = Field(None, description="Validation errors: location, message, type.")


class ProblemError(StarletteHTTPException):
    """Raise to answer with a problem document: status, machine-readable code, one-sentence detail.

    A Starlette HTTPException, so that FastAPI passes it through even from inside body parsing."""

    def __init__(self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.status = status
        self.code = code
        self.extra = extra


class V2Error(BaseModel):
    """An error on the Open Inference Protocol paths: the protocol's `error` message, with the problem's code."""

    error: str = Field(description="One sentence saying what was wrong (what tritonclient and KServe's client show).")
    code: str = Field(description="Machine-readable problem code, e.g. 'invalid_binary_data', 'unknown_model'.")
    status: int = Field(description="The HTTP status code.")
    request_id: str | None = Field(None, description="The X-Request-ID of the request, to quote in support requests.")
    errors: list[dict[str, Any]] | None = Field(None, description="Validation errors: location, message, type.")


def is_v2_path(path: str | None) -> bool:
    """A path of the Open Inference Protocol v2, whose errors are `V2Error` documents."""
    return path is not None and (path == "/v2" or path.startswith("/v2/"))


def error_content(path: str) -> dict[str, Any]:
    """The OpenAPI `content` of an error response on `path` (app.problem_openapi)."""
    if is_v2_path(path):
        return {"application/json": {"schema": {"$ref": "#/components/schemas/V2Error"}}}
    return {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}


def problem_response(path: str | None, status: int, code: str, detail: str,
                     headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The JSON response of a problem: a problem document, or a `V2Error` on Open Inference Protocol paths."""
    if is_v2_path(path):
        v2: dict[str, Any] = {"error": detail, "code": code, "status": status, "request_id": request_id.get(),
                              **{k: v for k, v in extra.items() if v is not None}}
        return JSONResponse(v2, status_code=status, headers=headers)
    body: dict[str, Any] = {
        "type": f"urn:fisher-guard:problem:{code}",
        "title": HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error",
        "status": status,
        "detail": detail,
        "code": code,
        "instance": path,
        "request_id": request_id.get(),
        **{k: v for k, v in extra.items() if v is not None},
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _clean_errors(errors: list[Any]) -> list[dict[str, Any]]:
    """Validation errors without the offending input (it may be a huge array) or unserialisable context."""
    return [{"loc": [str(part) for part in err.get("loc", ())], "msg": str(err.get("msg", "")),
             "type": str(err.get("type", ""))} for err in errors]


def _validation_detail(errors: list[dict[str, Any]]) -> str:
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(part for part in first["loc"] if part != "body") or "request"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


async def _problem_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(request.url.path, exc.status, exc.code, exc.detail, exc.headers, **exc.extra)


async def _input_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageInputError)
    return problem_response(request.url.path, INPUT_ERROR_STATUS.get(exc.code, 422), exc.code, exc.message)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _clean_errors(list(exc.errors()))
    if any(err["type"] == "json_invalid" for err in errors):
        return problem_response(request.url.path, 400, "invalid_json", "the request body is not valid JSON",
                                errors=errors)
    return problem_response(request.url.path, 422, "validation_error", _validation_detail(errors), errors=errors)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    if status == 404 and detail == "Not Found":
        detail = f"no endpoint at {request.url.path}; see /docs for the API"
    if status == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    return problem_response(request.url.path, status, STATUS_CODES.get(status, "http_error"), detail,
                            headers=getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(request.url.path, 500, "internal_error",
                            "an unexpected error occurred; quote the request_id when reporting it")


def install_error_handlers(app: FastAPI) -> None:
    """Problem documents for every error the app can raise."""
    app.add_exception_handler(ProblemError, _problem_error)
    app.add_exception_handler(ImageInputError, _input_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error statuses (the media type is fixed up in app.openapi)."""
    return {status: {"model": Problem, "description": HTTPStatus(status).phrase} for status in statuses}
