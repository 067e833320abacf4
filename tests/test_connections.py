"""Idle and slow connections, over real sockets: a client that connects and sends nothing, or sends a request head
slowly (slowloris), and an idle keep-alive connection are closed by the server after their timeouts, while
prompt requests, and a slow body after a complete head, are answered. Against a real `fisher-guard serve`
process (uvicorn's "auto" protocol, httptools here) and against in-process uvicorn servers with each protocol
(h11, httptools) of service.api.connections. The bounds are generous: only that a close happens is asserted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pickle
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from test_e2e import MODEL, free_port, start_server, stop_server
from uvicorn.server import ServerState

from service.api import connections

TIMEOUT_S = 1  # both timeouts of the servers under test
BOUND_S = 15.0  # a close must come within this (a busy machine is slow, the servers' timers are 1 s)


async def echo_app(scope, receive, send) -> None:
    """Reads the whole body and answers with its length."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = str(len(body)).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})


@contextlib.contextmanager
def in_process_server(http: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    config = uvicorn.Config(echo_app, host="127.0.0.1", port=port, lifespan="off", log_config=None,
                            timeout_keep_alive=TIMEOUT_S, http=connections.http_protocol(TIMEOUT_S, http))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.05)
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module", params=["serve", "h11", "httptools"])
def address(request, tmp_path_factory) -> Iterator[tuple[str, int]]:
    """(host, port) of a server whose keep-alive and request-head timeouts are 1 s."""
    if request.param != "serve":
        with in_process_server(request.param) as address:
            yield address
        return
    log = tmp_path_factory.mktemp("connections") / "server.log"
    base, process = start_server(request.getfixturevalue("api_models_dir"), log,
                                 FISHER_GUARD_KEEP_ALIVE_TIMEOUT_S=str(TIMEOUT_S),
                                 FISHER_GUARD_REQUEST_HEAD_TIMEOUT_S=str(TIMEOUT_S))
    host, port = base.removeprefix("http://").split(":")
    yield host, int(port)
    stop_server(process)


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=BOUND_S)
    sock.settimeout(BOUND_S)  # no recv in these tests can hang past the bound
    return sock


def get(host: str) -> bytes:
    return f"GET /health/live HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection instead of answering (got {data!r})"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection in the middle of a response"
        body += chunk
    return int(lines[0].split()[1]), body


def closed_by_server(sock: socket.socket, trickle: bytes = b"") -> bool:
    """Waits (up to BOUND_S) for the server to close the connection, sending a byte of `trickle` every 0.2 s
    meanwhile (a slowloris client); True when it closed."""
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.2)
        try:
            if readable:
                if sock.recv(65536) == b"":
                    return True
                raise AssertionError("the server sent data to a client whose request head is incomplete")
            if trickle:
                sock.sendall(trickle[:1])
                trickle = trickle[1:]
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def test_a_silent_connection_is_closed(address):
    with connect(address) as sock:
        assert closed_by_server(sock), "a connection that sent nothing was not closed"


def test_a_slow_partial_head_is_closed(address):
    """Connects, sends part of a request head, then one more header byte every 0.2 s: each byte would cancel
    uvicorn's keep-alive timer, the request-head timer closes the connection anyway."""
    with connect(address) as sock:
        sock.sendall(f"GET /health/live HTTP/1.1\r\nHost: {address[0]}\r\n".encode())
        assert closed_by_server(sock, trickle=b"X-Slow: " + b"a" * 400), "a slowloris client was not disconnected"


def test_an_idle_keep_alive_connection_is_closed_after_a_response(address):
    with connect(address) as sock:
        sock.sendall(get(address[0]))
        assert read_response(sock)[0] == 200
        assert closed_by_server(sock), "an idle keep-alive connection was not closed"


def test_a_slow_partial_head_after_a_response_is_closed(address):
    """Any byte cancels uvicorn's keep-alive timer; the next request's head has its own time limit."""
    with connect(address) as sock:
        sock.sendall(get(address[0]))
        assert read_response(sock)[0] == 200
        sock.sendall(b"GET /health/live HTTP/1.1\r\n")
        assert closed_by_server(sock, trickle=b"X-Slow: " + b"a" * 400), "a slowloris client was not disconnected"


def test_prompt_requests_are_answered(address):
    """A request sent at once on a fresh connection, then another on the same keep-alive connection: both are
    answered, and so is a request on a second connection (the servers go on working)."""
    with connect(address) as sock:
        sock.sendall(get(address[0]))
        assert read_response(sock)[0] == 200
        sock.sendall(get(address[0]))
        assert read_response(sock)[0] == 200
    with connect(address) as sock:
        sock.sendall(get(address[0]))
        assert read_response(sock)[0] == 200


def test_a_slow_body_after_a_complete_head_is_not_cut(address):
    """The request-head timer stops at a complete head: a body sent over more than twice the timeout (and a
    response that then takes its time) is still answered."""
    body = json.dumps({"tensor": [[[[0.0] * 28] * 28]]}).encode()
    head = (f"POST /v1/models/{MODEL}/screen HTTP/1.1\r\nHost: {address[0]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with connect(address) as sock:
        sock.sendall(head)
        pieces = 4
        size = -(-len(body) // pieces)
        for i in range(pieces):
            time.sleep(2.5 * TIMEOUT_S / pieces)
            sock.sendall(body[i * size:(i + 1) * size])
        status, answer = read_response(sock)
        assert status == 200, answer[:500]


def test_the_settings_reach_uvicorn(monkeypatch):
    """`serve` passes the keep-alive timeout and a protocol with the request-head timeout (uvicorn's "auto"
    choice, httptools when installed); the protocol pickles (uvicorn's worker processes get it so) and uvicorn
    builds connections from it."""
    from service.commands import serve as serve_command
    from service.config import get_settings

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs, app=app))
    monkeypatch.setattr("service.observability.configure_logging", lambda *args: None)
    monkeypatch.setenv("FISHER_GUARD_KEEP_ALIVE_TIMEOUT_S", "2.5")
    monkeypatch.setenv("FISHER_GUARD_REQUEST_HEAD_TIMEOUT_S", "7")
    monkeypatch.delenv("FISHER_GUARD_WORKERS", raising=False)
    try:
        assert serve_command.serve(argparse.Namespace(host=None, port=None, workers=None, threads=None,
                                                       model_process=None)) == 0
    finally:
        get_settings.cache_clear()
    assert seen["timeout_keep_alive"] == 2.5
    config = uvicorn.Config(echo_app, http=pickle.loads(pickle.dumps(seen["http"])), lifespan="off")
    config.load()
    loop = asyncio.new_event_loop()
    try:
        protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    finally:
        loop.close()
    expected = connections.HttpToolsHeadTimeoutProtocol or connections.H11HeadTimeoutProtocol
    assert type(protocol) is expected and protocol.request_head_timeout == 7
    assert connections.http_protocol(3, "h11").func is connections.H11HeadTimeoutProtocol
    with pytest.raises(ValueError):
        connections.http_protocol(3, "zttp")
