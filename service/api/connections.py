"""A time limit on request heads, which uvicorn does not have: uvicorn's HTTP protocols, subclassed.

uvicorn closes a keep-alive connection that stays silent for `timeout_keep_alive` after a response, but it starts
no timer when a connection opens, and any byte received cancels its keep-alive timer: a client that connects and
sends nothing, or sends a request head slowly (slowloris), keeps its connection, a file descriptor and a place in
`connections`, for ever. The protocols here start a timer when a connection opens and when a response is complete
and the connection waits for its next request; a complete request head cancels it (from there the application's
request timeout applies), and when it fires the connection is closed. uvicorn has no setting or hook for this, so
the classes subclass its h11 and httptools protocols; they override only the protocol's own methods
(connection_made, data_received, on_response_complete, handle_websocket_upgrade, connection_lost) and read
`cycle` and `transport`, as uvicorn's own `shutdown` does to tell an idle connection.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: uvicorn's "auto" picks h11, so do we
    HttpToolsProtocol = None

logger = logging.getLogger(__name__)


class RequestHeadTimeout:
    """Mixin for a uvicorn HTTP/1.1 protocol class: closes the connection when no complete request head has
    arrived `request_head_timeout` seconds after the connection opened or after the previous response."""

    def __init__(self, *args: Any, request_head_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_head_timeout = request_head_timeout
        self.request_head_timer: asyncio.TimerHandle | None = None

    def _waiting_for_request_head(self) -> bool:
        # uvicorn's own test for an idle connection (its shutdown()): no request yet, or its response is complete.
        # A complete head starts a new cycle, so this turns False as soon as one has arrived.
        return self.cycle is None or self.cycle.response_complete

    def _start_request_head_timer(self) -> None:
        self._cancel_request_head_timer()
        self.request_head_timer = self.loop.call_later(self.request_head_timeout, self._request_head_timed_out)

    def _cancel_request_head_timer(self) -> None:
        if self.request_head_timer is not None:
            self.request_head_timer.cancel()
            self.request_head_timer = None

    def _request_head_timed_out(self) -> None:
        self.request_head_timer = None
        if not self.transport.is_closing():
            logger.debug("closing a connection whose request head did not arrive within %.3g s",
                         self.request_head_timeout)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._start_request_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._waiting_for_request_head():
            self._cancel_request_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the connection is kept open and no pipelined request is running: the next head has its time limit
        if not self.transport.is_closing() and self._waiting_for_request_head():
            self._start_request_head_timer()

    def handle_websocket_upgrade(self, *args: Any) -> None:
        self._cancel_request_head_timer()  # the connection leaves this protocol
        super().handle_websocket_upgrade(*args)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_request_head_timer()
        super().connection_lost(exc)


class H11HeadTimeoutProtocol(RequestHeadTimeout, H11Protocol):
    """uvicorn's h11 protocol with the request-head timeout."""


if HttpToolsProtocol is not None:

    class HttpToolsHeadTimeoutProtocol(RequestHeadTimeout, HttpToolsProtocol):
        """uvicorn's httptools protocol with the request-head timeout."""

else:  # pragma: no cover
    HttpToolsHeadTimeoutProtocol = None


def http_protocol(request_head_timeout_s: float, http: str = "auto") -> Callable[..., asyncio.Protocol]:
    """uvicorn's `http` argument: its "h11" or "httptools" protocol ("auto": httptools when it is installed, as
    uvicorn chooses) with the request-head timeout. A partial of a module-level class, so that it pickles into
    uvicorn's worker processes."""
    if http == "auto":
        http = "h11" if HttpToolsHeadTimeoutProtocol is None else "httptools"
    protocols = {"h11": H11HeadTimeoutProtocol, "httptools": HttpToolsHeadTimeoutProtocol}
    protocol = protocols.get(http)
    if protocol is None:
        raise ValueError(f"no HTTP protocol {http!r} (installed: {[k for k, v in protocols.items() if v]})")
    return functools.partial(protocol, request_head_timeout=request_head_timeout_s)
