"""`fisher-guard serve`: the HTTP API under uvicorn (settings from FISHER_GUARD_* variables, flags override)."""

from __future__ import annotations

import argparse
import os


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


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.config import get_settings
    from service.observability import configure_logging

    if args.threads:  # read by every worker process's app at start-up
        os.environ["FISHER_GUARD_API_TORCH_THREADS"] = str(args.threads)
        get_settings.cache_clear()
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        "service.api.app:serve_app",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers or settings.workers,
        log_config=None,  # keep our JSON logging
        log_level=settings.log_level.lower(),
        access_log=False,  # the API logs one line per request itself, with its request id
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 1,
    )
    return 0
