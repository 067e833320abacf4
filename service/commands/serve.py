"""`fisher-guard serve`: the HTTP API under uvicorn (settings from FISHER_GUARD_* variables, flags override)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable (see service.api.metrics)


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
    p.set_defaults(handler=serve)


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
    get_settings.cache_clear()
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    workers = settings.workers
    with shared_metrics(workers, settings.metrics_multiproc_dir):
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
