"""`fisher-guard serve`: the HTTP API under uvicorn (settings from FISHER_GUARD_* variables, flags override)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable (see service.api.metrics)
SOCKET_ENV = "FISHER_GUARD_MODEL_PROCESS_SOCKET"  # the setting model_process_socket, read by every API process
MODEL_PROCESS_RESTART_S = 1.0  # pause before a model process that exited is started again (doubling while it
MODEL_PROCESS_MAX_PAUSE_S = 30.0  # keeps dying within 30 s of its start, up to this)

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the HTTP API (uvicorn)",
                       description="Serve the HTTP API with uvicorn. Models load once per worker process; the "
                       "process answers /health/live at once and /health/ready after the models are warmed up. "
                       "SIGTERM / Ctrl-C stop taking connections and finish the requests in flight.")
    p.add_argument("--host", default=None, help="address to bind (default: FISHER_GUARD_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: FISHER_GUARD_PORT, 8000)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: FISHER_GUARD_WORKERS, 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: FISHER_GUARD_API_TORCH_THREADS, 1)")
    p.add_argument("--model-process", action="store_true", default=None,
                   help="run the models in one model process that every worker process hands its work to (batched "
                        "together); it is restarted when it dies (default: FISHER_GUARD_MODEL_PROCESS)")
    p.set_defaults(handler=serve)
    m = sub.add_parser("model-process", help="serve the models to API processes over a Unix socket",
                       description="Load every model and its detector, then answer the work of API processes on a "
                       "Unix socket (`serve --model-process` starts and restarts one itself; run it apart, e.g. as a "
                       "sidecar, and set FISHER_GUARD_MODEL_PROCESS_SOCKET for the API). Stops on SIGTERM.")
    m.add_argument("--socket", type=Path, default=None,
                   help="the socket's path (default: FISHER_GUARD_MODEL_PROCESS_SOCKET)")
    m.set_defaults(handler=model_process)


@contextlib.contextmanager
def shared_metrics(workers: int, configured: str | None) -> Iterator[str | None]:
    """With several worker processes, a directory for prometheus_client's multi-process mode, exported as
    PROMETHEUS_MULTIPROC_DIR before uvicorn starts the workers (they inherit it and import prometheus_client
    after it is set). Stale values of an earlier run are removed; at exit the variable is restored and a
    temporary directory removed."""
    if workers <= 1:
        yield None
        return
    previous = os.environ.get(MULTIPROCESS_ENV)
    chosen = configured or previous
    temporary = chosen is None
    path = Path(tempfile.mkdtemp(prefix="fisher-guard-metrics-") if temporary else chosen)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROCESS_ENV] = str(path)
    try:
        yield str(path)
    finally:
        if previous is None:
            os.environ.pop(MULTIPROCESS_ENV, None)
        else:
            os.environ[MULTIPROCESS_ENV] = previous
        if temporary:
            shutil.rmtree(path, ignore_errors=True)


class ModelProcessSupervisor(threading.Thread):
    """Runs `fisher-guard model-process` on a socket in a private temporary folder, and starts it again when it
    exits, until `stop` (SIGTERM). It runs in its own session, so Ctrl-C reaches the API processes only, and it is
    stopped after they have finished their requests."""

    def __init__(self) -> None:
        super().__init__(name="model-process-supervisor", daemon=True)
        self.folder = Path(tempfile.mkdtemp(prefix="fisher-guard-model-"))
        self.socket = self.folder / "model.sock"
        self.stopping = threading.Event()
        self.process: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def run(self) -> None:
        pause = MODEL_PROCESS_RESTART_S
        while not self.stopping.is_set():
            started = time.monotonic()
            with self.lock:
                if self.stopping.is_set():
                    break
                try:  # its own session: a signal to the terminal's process group (Ctrl-C) does not reach it
                    self.process = subprocess.Popen([sys.executable, "-m", "service.cli", "model-process",
                                                     "--socket", str(self.socket)], start_new_session=True)
                except OSError as exc:
                    log.error("could not start the model process: %s", exc)
                    self.process = None
            code = self.process.wait() if self.process is not None else None
            if self.stopping.is_set():
                break
            # one that dies at once is retried less and less often, one that ran a while at once
            pause = min(2 * pause, MODEL_PROCESS_MAX_PAUSE_S) if time.monotonic() - started < 30 \
                else MODEL_PROCESS_RESTART_S
            log.warning("the model process exited with status %s: starting it again in %.0f s", code, pause)
            self.stopping.wait(pause)

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
            process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.join(timeout=5)
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def model_process_for_workers(enabled: bool) -> Iterator[None]:
    """With `enabled`, a supervised model process for the API processes, its socket exported to them in
    FISHER_GUARD_MODEL_PROCESS_SOCKET; stopped (and the variable restored) at exit."""
    if not enabled:
        yield
        return
    supervisor = ModelProcessSupervisor()
    previous = os.environ.get(SOCKET_ENV)
    os.environ[SOCKET_ENV] = str(supervisor.socket)
    supervisor.start()
    try:
        yield
    finally:
        supervisor.stop()
        if previous is None:
            os.environ.pop(SOCKET_ENV, None)
        else:
            os.environ[SOCKET_ENV] = previous


def model_process(args: argparse.Namespace) -> int:
    import asyncio

    from service.api.model_process import serve_models
    from service.config import get_settings
    from service.observability import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    socket = args.socket or settings.model_process_socket
    if socket is None:
        raise SystemExit("model-process: give --socket PATH or set FISHER_GUARD_MODEL_PROCESS_SOCKET")
    asyncio.run(serve_models(settings, Path(socket)))
    return 0


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.connections import http_protocol
    from service.config import get_settings
    from service.observability import configure_logging

    # read by every worker process's app at start-up
    if args.threads:
        os.environ["FISHER_GUARD_API_TORCH_THREADS"] = str(args.threads)
    if args.workers:  # the apps need the count too: the in-process job backend serves one process only
        os.environ["FISHER_GUARD_WORKERS"] = str(args.workers)
    if args.model_process:
        os.environ["FISHER_GUARD_MODEL_PROCESS"] = "true"
    get_settings.cache_clear()
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    workers = settings.workers
    with shared_metrics(workers, settings.metrics_multiproc_dir), \
            model_process_for_workers(settings.model_process and not settings.model_process_socket):
        get_settings.cache_clear()  # with one worker the app runs in this process: it reads the socket's variable
        uvicorn.run(
            "service.api.app:serve_app",
            factory=True,
            host=args.host or settings.host,
            port=args.port or settings.port,
            workers=workers,
            timeout_worker_healthcheck=settings.worker_healthcheck_timeout_s,
            log_config=None,  # keep our JSON logging
            log_level=settings.log_level.lower(),
            access_log=False,  # the API logs one line per request itself, with its request id
            timeout_graceful_shutdown=int(settings.request_timeout_s) + 1,
            timeout_keep_alive=settings.keep_alive_timeout_s,  # typed int, used as a float (call_later)
            http=http_protocol(settings.request_head_timeout_s),  # uvicorn's "auto" choice, with a head timeout
        )
    return 0
