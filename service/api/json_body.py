"""JSON request bodies parsed off the event loop when they are large, and refused cleanly when nested too deeply.

FastAPI parses a JSON body with `await request.json()` on the event loop: an 8 MB tensor body held every other
request (and /health/live) for about 1.7 s. Routers built with `route_class=OffLoopJSONRoute` hand FastAPI a
request whose `json()` parses bodies over `INLINE_BYTES` in a worker thread; small bodies stay inline, where a hop
to a thread would cost more than the parse. Python's parser raises RecursionError on very deep documents; that is
a 400 here, not a 500.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.api.errors import ProblemError

INLINE_BYTES = 65536  # bodies this small are parsed on the event loop: cheaper than a hop to a thread


def parse_json(body: bytes) -> Any:
    """The JSON document in `body` (json.JSONDecodeError / UnicodeDecodeError as json.loads raises them)."""
    try:
        return json.loads(body)
    except RecursionError as exc:
        raise ProblemError(400, "invalid_json", "the JSON body is nested too deeply to parse") from exc


class OffLoopJSONRequest(Request):
    """A request whose JSON body is parsed in a thread when it is large."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = parse_json(body) if len(body) <= INLINE_BYTES else await asyncio.to_thread(parse_json, body)
        return self._json


class OffLoopJSONRoute(APIRoute):
    """An APIRoute whose endpoint (and FastAPI's body parsing) sees an OffLoopJSONRequest."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return handle
