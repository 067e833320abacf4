"""RFC 9457 problem details for every error: `application/problem+json` with a machine-readable `code`.

Raise `ProblemError(status, code, detail)` anywhere in a request; the handlers here turn it, validation errors,
unknown routes, bad image inputs and any unexpected exception into a problem document (never a stack trace).
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


def problem_response(path: str | None, status: int, code: str, detail: str,
                     headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The JSON response of a problem; on Open Inference Protocol paths it also carries `error` (their field)."""
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
    if path is not None and path.startswith("/v2/"):
        body["error"] = detail
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
