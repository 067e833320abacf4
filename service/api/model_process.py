"""The model process: every served model, each with its worker thread and micro-batchers (service.api.model_worker),
answering the work of several API processes over a Unix socket (the protocol: service.api.model_link).

Requests from all connected API processes meet in the same batchers, so they are batched together. Each request's
images are read from its API process's shared-memory arena and copied once into this process (so an abandoned
request's block can be reused at once, whatever its batch is doing); the answer holds the results and, for the
metrics, the request's queue wait and its run's compute time (`ExecutionReports`). It listens only once every
model is loaded and warmed up, so a connected API process is a ready one. It stops on SIGTERM (not SIGINT: Ctrl-C
reaches the whole process group, and `serve` stops it after the API processes) or when its parent is gone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from service.api.metrics import Execution
from service.api.micro_batcher import current_scope
from service.api.model_link import ImageArena, encode_frame, error_document, read_frame
from service.api.runtime import ServedModel, discover_cards, load_served_model, local_worker, watch_detectors
from service.config import Settings

log = logging.getLogger(__name__)

PARENT_POLL_S = 1.0
KEPT_REPORTS = 4096  # execution reports waiting for their answer (a bound: reports of abandoned requests age out)


def model_threads(settings: Settings) -> int:
    """The model process's torch threads: model_process_torch_threads, else api_torch_threads_large_batch capped at
    the cores the API processes leave (cores - workers, at least 1)."""
    if settings.model_process_torch_threads:
        return settings.model_process_torch_threads
    return max(1, min(settings.api_torch_threads_large_batch, (os.cpu_count() or 1) - settings.workers))


class ExecutionReports:
    """Each request's share of the model's runs, by the token its work was submitted under (`current_scope`'s route
    path in this process), until its answer takes it; the first request of a run counts the run itself."""

    def __init__(self) -> None:
        self.reports: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def record(self, execution: Execution) -> None:
        for i, request in enumerate(execution.requests):
            self.reports[request.endpoint] = {"kind": execution.kind, "images": execution.images,
                                              "compute_ns": execution.compute_ns, "queue_ns": request.queue_ns,
                                              "first": i == 0}
        while len(self.reports) > KEPT_REPORTS:
            self.reports.popitem(last=False)

    def take(self, token: str) -> dict[str, Any] | None:
        return self.reports.pop(token, None)


class ModelProcess:
    """The models and the connections of the API processes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self.reports = ExecutionReports()
        self.connections = itertools.count(1)
        self.arrivals: dict[int, dict[str, int]] = {}  # per connection: its requests still arriving, by model
        self.load_error: str | None = None  # why there are no models: every API process is told, and says so

    async def load(self) -> None:
        """Every model with its detector, warmed up in its own worker thread (as the API's own lifespan does), on
        `model_threads` torch threads."""
        settings = self.settings
        threads = model_threads(settings)
        settings = settings.model_copy(update={"api_torch_threads": threads,
                                                "api_torch_threads_large_batch": threads})
        torch.set_num_threads(threads)
        cards = await asyncio.to_thread(discover_cards, settings)
        if not cards:
            raise ValueError(f"no model cards found in {settings.models_dir}")
        loop = asyncio.get_running_loop()
        for card, path in cards:
            worker = local_worker(settings, card.name, on_execution=self.reports.record)
            served = await loop.run_in_executor(worker.executor, load_served_model, path, settings, worker)
            self.models[served.name] = served
        gc.collect()
        gc.freeze()  # see service.api.app.load_models

    def welcome(self) -> dict[str, Any]:
        if self.load_error is not None:
            return {"pid": os.getpid(), "error": self.load_error}
        return {"pid": os.getpid(), "models": {
            name: {"sha256": model.sha256, "device": str(model.device), "detector_id": model.detector_state.id}
            for name, model in self.models.items()}}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One API process: hello (its arena), then work requests and cancellations until it goes."""
        connection = next(self.connections)
        arena: ImageArena | None = None
        tasks: dict[Any, asyncio.Task] = {}
        arriving = self.arrivals[connection] = {}
        try:
            hello = (await read_frame(reader) or {}).get("hello")
            if not isinstance(hello, dict):
                return
            if self.load_error is None:
                arena = ImageArena(Path(str(hello["arena"])), int(hello["size"]), create=False)
            writer.write(encode_frame(self.welcome()))
            if arena is None:
                return
            log.info("API process %s connected (connection %d)", hello.get("pid"), connection)
            while (message := await read_frame(reader)) is not None:
                if "arriving" in message:
                    self.arrive(arriving, message["arriving"] if "id" not in message else
                                {str(message.get("model")): message["arriving"]})
                    if "id" not in message:
                        continue
                if "cancel" in message:
                    task = tasks.get(message["cancel"])
                    if task is not None:
                        task.cancel()
                    continue
                call_id = message.get("id")
                if type(call_id) is not int:
                    raise ValueError(f"a work request without an integer id: {call_id!r}")
                task = asyncio.create_task(self.work(f"{connection}/{call_id}", message, arena, writer))
                tasks[call_id] = task
                task.add_done_callback(lambda done, call_id=call_id: self.finished(done, call_id, tasks, writer))
        except Exception as exc:  # noqa: BLE001 - a connection that breaks its protocol is closed, nothing else
            log.warning("connection %d from an API process failed: %s", connection, exc)
        finally:
            for task in list(tasks.values()):
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            writer.close()
            if arena is not None:
                arena.close()
            self.arrive(arriving, dict.fromkeys(arriving, 0))
            del self.arrivals[connection]
            log.info("API process of connection %d is gone", connection)

    @staticmethod
    def finished(task: asyncio.Task, call_id: int, tasks: dict[Any, asyncio.Task],
                 writer: asyncio.StreamWriter) -> None:
        """A request's task is over. One cancelled before it ever ran (its cancellation came in the same read) has
        written no answer: it gets one here, so that its API process frees the request's block."""
        tasks.pop(call_id, None)
        if task.cancelled() and not writer.is_closing():
            writer.write(encode_frame({"id": call_id, "error": error_document(asyncio.CancelledError())}))

    def arrive(self, counts: dict[str, int], update: dict[str, Any]) -> None:
        """One API process's counts of requests still arriving, by model (`update`: new counts); each model's
        worker waits for the sum over every API process (service.api.micro_batcher)."""
        for name, count in update.items():
            model = self.models.get(name)
            if model is None or type(count) is not int or count < 0:
                continue
            model.worker.arriving += count - counts.get(name, 0)
            counts[name] = count

    async def work(self, token: str, message: dict[str, Any], arena: ImageArena,
                   writer: asyncio.StreamWriter) -> None:
        """One request: its work through the model's batchers (or alone), then its answer."""
        current_scope.set({"route": SimpleNamespace(path=token)})  # this task's own context: the report's token
        answer: dict[str, Any] = {"id": message.get("id")}
        try:
            model = self.models.get(str(message.get("model")))
            if model is None:
                raise ValueError(f"the model process serves no model {message.get('model')!r}")
            key = tuple(message["key"])
            images = arena.read(message["images"]).clone()
            if message.get("batched"):
                answer["results"] = await model.worker.submit(key, model.work(key), images)
            else:
                answer["results"] = await model.worker.run(key, model.work(key), images, images=int(images.shape[0]))
        except asyncio.CancelledError as exc:
            answer["error"] = error_document(exc)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the request that caused it
            answer["error"] = error_document(exc)
        execution = self.reports.take(token)
        if execution is not None:
            answer["execution"] = execution
        try:
            frame = encode_frame(answer)
        except (TypeError, ValueError) as exc:  # results that are not JSON: a bug, answered as one
            frame = encode_frame({"id": answer["id"], "error": error_document(RuntimeError(
                f"the results could not be sent: {exc}"))})
        if not writer.is_closing():
            writer.write(frame)

    async def close(self) -> None:
        for model in self.models.values():
            await model.worker.close()


async def serve_models(settings: Settings, socket_path: Path) -> None:
    """Load the models, then answer API processes on `socket_path` until SIGTERM or the parent process is gone. When
    the models fail to load, it stays up and tells every API process why (so their readiness says it) instead of
    exiting into a restart loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    parent = os.getppid()

    async def watch_parent() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(PARENT_POLL_S)
        log.warning("the process that started the model process is gone: stopping")
        stop.set()

    background = [asyncio.create_task(watch_parent())]
    await refuse_a_taken_socket(socket_path)
    process = ModelProcess(settings)
    loading = asyncio.create_task(process.load())
    await asyncio.wait([loading, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():
        loading.cancel()
        return
    if loading.exception() is not None:
        process.load_error = f"{type(loading.exception()).__name__}: {loading.exception()}"
        log.error("the model process could not load its models: %s", process.load_error)
    socket_path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(process.handle, socket_path)
    os.chmod(socket_path, 0o600)
    log.info("model process %d ready on %s: %s", os.getpid(), socket_path, ", ".join(process.models) or "no models")
    if settings.detector_poll_s > 0 and process.models:
        background.append(asyncio.create_task(watch_detectors(process.models, settings.detector_poll_s)))
    try:
        await stop.wait()
    finally:
        server.close()
        for task in background:
            task.cancel()
        await process.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()


async def refuse_a_taken_socket(socket_path: Path) -> None:
    """SystemExit when another model process answers on `socket_path` (a stale socket file is taken over)."""
    try:
        _, writer = await asyncio.open_unix_connection(socket_path)
    except OSError:
        return
    writer.close()
    raise SystemExit(f"model-process: another model process is serving on {socket_path}")
