"""The FastAPI app factory.

`create_app(settings)` mounts the routers named in `service.api.routers.ROUTER_MODULES`; its lifespan loads
every registered model (and its detector) once, in the background, warms each up in its worker thread, and
then turns readiness on. What other routers can use on `app.state`:

- `settings`: the Settings; `metrics`: service.api.metrics.Metrics (its `registry` is what /metrics shows);
- `models`: dict name -> service.api.runtime.ServedModel (a service.serving.ModelBundle with its `.worker`);
  `ready`: bool;
- dependencies in service.api.dependencies (`require_ready`, `served_model`, `lookup_model`, `decode_*`) and
  service.api.security.require_api_key; errors: raise service.api.errors.ProblemError(status, code, detail).

The lifespan also watches each served model's active detector card (every `detector_poll_s` seconds) and swaps a
newly activated detector in without a restart (service.serving.refresh_detector).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

import torch
from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from service.api.errors import Problem, V2Error, error_content, install_error_handlers
from service.api.metrics import Metrics
from service.api.micro_batcher import Arrival
from service.api.middleware import RequestContextMiddleware
from service.api.model_link import ModelLink, RemoteWorker
from service.api.routers import ROUTER_MODULES
from service.api.runtime import discover_cards, load_served_model, local_worker, watch_detectors
from service.api.security import accepted_keys, require_api_key
from service.config import Settings, get_settings
from service.observability import configure_logging

log = logging.getLogger(__name__)

VERSION = "0.1.0"
DESCRIPTION = """Screen images for adversarial attacks with the Fisher information of the input
(Zhao et al., AAAI 2019). Every error is an RFC 9457 problem document (`application/problem+json`) with a
machine-readable `code`. When API keys are configured, every endpoint but health needs one
(`Authorization: Bearer <key>` or `X-API-Key: <key>`)."""
COMMON_ERRORS = {"413": "Payload Too Large", "500": "Internal Server Error", "504": "Gateway Timeout"}


def router_modules() -> list[ModuleType]:
    return [importlib.import_module(f"service.api.routers.{name}") for name in ROUTER_MODULES]


async def load_models(app: FastAPI) -> None:
    """Load every model with its detector, then mark the app ready: each warmed up in its own worker thread, or,
    with a model process (setting model_process_socket), once the model process answers (this process then keeps
    a copy of each on the CPU for what it answers itself, and hands all model work to the model process)."""
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    try:
        torch.set_num_threads(settings.api_torch_threads)
        cards = await asyncio.to_thread(discover_cards, settings)
        if not cards:
            raise ValueError(f"no model cards found in {settings.models_dir}")
        link = app.state.model_link
        if link is not None:
            await link.start()
            await link.wait_connected()
            missing = [card.name for card, _ in cards if card.name not in link.models]
            if missing:
                raise ValueError(f"the model process serves no model {', '.join(missing)}")
        loop = asyncio.get_running_loop()
        for card, path in cards:
            callbacks = {"on_batch": lambda kind, size, name=card.name: metrics.observe_batch(name, kind, size),
                         "on_pending": metrics.in_flight.labels(card.name).set,
                         "on_execution": functools.partial(metrics.observe_execution, card.name)}
            metrics.in_flight.labels(card.name).set(0)
            if link is not None:
                remote = RemoteWorker(link, card.name, settings.queue_capacity, **callbacks)
                app.state.workers.append(remote)
                served = await asyncio.to_thread(load_served_model, path, settings, remote)
            else:
                worker = local_worker(settings, card.name, **callbacks)
                app.state.workers.append(worker)
                served = await loop.run_in_executor(worker.executor, load_served_model, path, settings, worker)
            app.state.models[served.name] = served
            app.state.known_models.add(served.name)
        # Everything loaded so far (torch, the models, the forests) lives as long as the process: out of the
        # cyclic collector's sight, a full collection takes ~0 ms instead of ~200 ms, a stall that every
        # request in flight would wait out (it set the p99 latency at concurrency 32: bench/bench_api.py).
        gc.collect()
        gc.freeze()
        app.state.ready = True
        metrics.ready.set(1)
        if link is not None:  # readiness goes with the model process from now on
            link.on_state = lambda up: metrics.ready.set(int(up))
        log.info("ready: %s", ", ".join(app.state.models))
    except Exception as exc:  # reported by /health/ready; the process stays up to say why
        app.state.load_error = str(exc)
        log.exception("loading the models failed")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    modules: list[ModuleType] = app.state.router_modules
    app.state.metrics.processes.set(1)
    app.state.metrics.ready.set(0)
    loader = asyncio.create_task(load_models(app), name="load-models")
    poll_s = app.state.settings.detector_poll_s
    watcher = asyncio.create_task(watch_detectors(app.state.models, poll_s), name="watch-detectors") \
        if poll_s > 0 else None
    for module in modules:
        if hasattr(module, "on_startup"):
            await module.on_startup(app)
    try:
        yield
    finally:
        app.state.ready = False
        for task in (loader, watcher):
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for module in reversed(modules):
            if hasattr(module, "on_shutdown"):
                await module.on_shutdown(app)
        for worker in app.state.workers:
            await worker.close()
        if app.state.model_link is not None:
            await app.state.model_link.close()
        app.state.metrics.process_exit()


def arrival_announcer(app: FastAPI) -> Callable[[dict], Arrival | None]:
    """For a request to a `micro_batched` endpoint of a served model, its Arrival at that model's batcher."""
    patterns: list[re.Pattern] = []

    def announce(scope: dict) -> Arrival | None:
        if not patterns:  # the routers are all included by the first request
            routes = [route for module in app.state.router_modules for name in ("router", "public_router")
                      for route in getattr(getattr(module, name, None), "routes", [])]
            patterns.extend(route.path_regex for route in routes
                            if getattr(getattr(route, "endpoint", None), "micro_batched", False))
        if scope.get("method") != "POST":
            return None
        for pattern in patterns:
            match = pattern.match(scope.get("path", ""))
            if match:
                params = match.groupdict()
                served = app.state.models.get(params.get("model") or params.get("model_name"))
                return Arrival(served.worker) if served is not None else None
        return None

    return announce


def binary_file_fields(schema: dict[str, Any]) -> None:
    """Mark the files of every multipart body as `type: string, format: binary`, in place.

    FastAPI's OpenAPI 3.1 schema gives an UploadFile `contentMediaType: application/octet-stream`, which generated
    clients (openapi-python-client) read as a plain `str` field: they send the file's name, not its bytes, and the
    server answers 422. `format: binary` is what every generator and swagger-ui understand as a file."""
    components = schema.get("components", {}).get("schemas", {})

    def mark(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and "contentMediaType" in node:
                node.pop("contentMediaType")
                node["format"] = "binary"
            for value in node.values():
                mark(value)
        elif isinstance(node, list):
            for value in node:
                mark(value)

    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            content = operation.get("requestBody", {}).get("content", {}) if isinstance(operation, dict) else {}
            body = content.get("multipart/form-data", {}).get("schema", {})
            ref = body.get("$ref", "")
            mark(components.get(ref.rsplit("/", 1)[-1]) if ref.startswith("#/components/schemas/") else body)


def problem_openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI schema with error responses as application/problem+json (on /v2: the protocol's JSON errors),
    and the errors any endpoint can give."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    binary_file_fields(schema)
    for path, path_item in schema.get("paths", {}).items():
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            for status, description in COMMON_ERRORS.items():
                responses.setdefault(status, {"description": description})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = error_content(path)  # problem+json; the protocol's errors on /v2
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (Problem, V2Error):
        components.setdefault(model.__name__, model.model_json_schema(ref_template="#/components/schemas/{model}"))
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app with its own settings, metrics registry and model workers (models load in its lifespan)."""
    settings = settings or get_settings()
    # /docs and /redoc are served by the web router from packaged assets (no CDN): FastAPI's own pages are off
    app = FastAPI(title="fisher-guard", version=VERSION, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.models = {}
    app.state.workers = []
    app.state.model_link = ModelLink(settings.model_process_socket, settings.model_process_arena_mb << 20) \
        if settings.model_process_socket else None
    app.state.known_models = set()
    app.state.ready = False
    app.state.load_error = None
    app.state.router_modules = router_modules()
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, max_body=settings.max_payload_bytes,
                       max_job_body=int(settings.jobs_max_upload_mb * 1024 * 1024) + 64 * 1024,
                       timeout=settings.request_timeout_s, metrics=app.state.metrics,
                       known_models=app.state.known_models, announce=arrival_announcer(app))
    # Without keys configured there is nothing to check, and the schema shows no security scheme; leaving the
    # dependency out also spares every request its three dependency solves (~4% more screens/s at concurrency 32).
    auth = [Depends(require_api_key)] if accepted_keys(settings) else []
    for module in app.state.router_modules:
        if hasattr(module, "public_router"):
            app.include_router(module.public_router)
        if hasattr(module, "router"):
            app.include_router(module.router, dependencies=auth)
    app.openapi = lambda: problem_openapi(app)  # type: ignore[method-assign]
    return app


def serve_app() -> FastAPI:
    """The app as `fisher-guard serve` runs it (uvicorn factory, once per worker process): JSON logging set up
    in this process first, so that every worker logs its requests with their ids."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # the API logs each request itself, with its id
    return create_app(settings)
