"""One pure-ASGI middleware for what every request needs: request id, body size limit, timeout, metrics, access log.

Pure ASGI (not BaseHTTPMiddleware) keeps the per-request cost to a few microseconds.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import ProblemError, problem_response
from service.api.metrics import Metrics
from service.api.micro_batcher import Arrival, current_arrival, current_scope
from service.observability import request_id

log = logging.getLogger("service.api.access")
REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNMATCHED = "unmatched"
Announce = Callable[[Scope], Arrival | None]  # a request's arrival at its model's batcher, or None


# when the current request times out (time.monotonic()): work in threads can stop before it instead of after
request_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_deadline", default=None)
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer (metrics, log)


class RequestContextMiddleware:
    """X-Request-ID (taken from the client when well-formed, else made), request body limit (413), request
    timeout (504 when no answer has started), request count and latency by route and model, one log line.

    A request whose client disconnects before its answer starts is cancelled (status 499 in metrics and log):
    its images leave the model's queue instead of being computed for nobody, which under overload is what
    clients that time out and retry would otherwise cause. Job submissions are left to finish."""

    def __init__(self, app: ASGIApp, *, max_body: int, timeout: float, metrics: Metrics,
                 known_models: set[str], announce: Announce, max_job_body: int | None = None) -> None:
        self.app = app
        self.announce = announce  # counts a request to a micro-batched endpoint as arriving at its model
        self.max_body = max_body
        self.max_job_body = max_job_body or max_body  # job submissions carry archives: their own limit
        self.timeout = timeout
        self.metrics = metrics
        self.known_models = known_models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID_OK.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        deadline_token = request_deadline.set(time.monotonic() + self.timeout)
        status = {"code": 500, "started": False, "gone": False}
        path = scope.get("path", "")
        max_body = self.max_job_body if path.startswith("/v1/jobs") else self.max_body
        arrival = self.announce(scope)
        arrival_token = current_arrival.set(arrival)
        scope_token = current_scope.set(scope)  # the model worker's measurements read the route from it

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(message)

        received = 0
        body_read = asyncio.Event()

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    raise ProblemError(413, "payload_too_large", f"the request body is over the limit of "
                                       f"{max_body} bytes")
                if not message.get("more_body", False):
                    body_read.set()
            elif message["type"] == "http.disconnect" and not body_read.is_set():
                status["gone"] = True  # the client left mid-body: whatever the app answers, nobody reads it
            return message

        async def run_app() -> None:
            """The app; for a POST outside /v1/jobs, cancelled when the client disconnects before the answer."""
            if scope.get("method") != "POST" or path.startswith("/v1/jobs"):
                await self.app(scope, limited_receive, send_with_id)
                return
            app = asyncio.ensure_future(self.app(scope, limited_receive, send_with_id))

            async def watch() -> None:
                await body_read.wait()  # the app has the whole body: what comes next can only be the end
                if (await receive())["type"] == "http.disconnect" and not status["started"]:
                    status["gone"] = True
                    app.cancel()

            watcher = asyncio.ensure_future(watch())
            try:
                await app
            except asyncio.CancelledError:
                if not status["gone"]:
                    raise
            finally:
                watcher.cancel()

        try:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > max_body:
                response = problem_response(path, 413, "payload_too_large", f"the request body ({int(length)} "
                                            f"bytes) is over the limit of {max_body} bytes")
                await response(scope, receive, send_with_id)
            else:
                try:
                    async with asyncio.timeout(self.timeout):
                        await run_app()
                    if status["gone"]:
                        status["code"] = CLIENT_CLOSED
                except TimeoutError:
                    if status["started"]:
                        raise
                    response = problem_response(path, 504, "timeout", f"the request took longer than the limit "
                                                f"of {self.timeout:g} s")
                    await response(scope, receive, send_with_id)
        except Exception:  # the last line of defence: a problem document, never a stack trace
            if status["started"]:
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            response = problem_response(path, 500, "internal_error", "an unexpected error occurred; quote the "
                                        "request_id when reporting it")
            await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            endpoint = getattr(route, "path", UNMATCHED)
            params = scope.get("path_params") or {}
            model = params.get("model") or params.get("model_name") or "-"
            if model not in self.known_models:
                model = "-"  # unknown names would blow up the label set
            self.metrics.requests.labels(endpoint, model, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.latency.labels(endpoint, model).observe(elapsed)
            log.info("%s %s %s %.1f ms", scope.get("method"), path, status["code"], elapsed * 1000.0,
                     extra={"status": status["code"], "duration_ms": round(elapsed * 1000.0, 2)})
            request_id.reset(token)
            request_deadline.reset(deadline_token)
            current_arrival.reset(arrival_token)
            current_scope.reset(scope_token)
            if arrival is not None:
                arrival.close()
