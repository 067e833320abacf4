"""One model's worker thread: where all of that model's torch work runs (so the event loop never blocks and models
never fight over one module), with a bounded count of images in flight (beyond it: QueueFullError, answered with
503 + Retry-After) and one micro-batcher per kind of work (service.api.micro_batcher).

It is also where each request's queue wait and compute time are measured, once for everything that reports them:
each run of the model is timed in the model's thread (`ModelClock`), and handed with the waits of the requests it
served, as a service.api.metrics.Execution, to `on_execution` (the app's metrics)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from service.api.cpu_kernels import KernelPolicy, with_kernels
from service.api.metrics import Execution, QueuedRequest
from service.api.micro_batcher import BatchFn, MicroBatcher, QueueFullError, WorkerClosedError, current_endpoint

T = TypeVar("T")
Waiting = tuple[str, int, int]  # a request in a run: (endpoint, images, time.perf_counter_ns() when it was queued)


@dataclass
class ModelClock:
    """When a run of the model started and finished in its thread (time.perf_counter_ns(); 0: not yet)."""

    started_ns: int = 0
    finished_ns: int = 0


def _clocked(clock: ModelClock, fn: Callable[..., T], *args: Any) -> T:
    clock.started_ns = time.perf_counter_ns()
    try:
        return fn(*args)
    finally:
        clock.finished_ns = time.perf_counter_ns()


class ImagesInFlight:
    """A model's bounded count of images in flight (accepted, not yet answered), shared by the local worker and
    the one that hands work to a model process (service.api.model_link.RemoteWorker)."""

    def __init__(self, name: str, capacity: int, on_pending: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.capacity = capacity
        self.pending = 0
        self.closed = False
        self._on_pending = on_pending  # told the count of images in flight each time it changes (a metrics gauge)

    def _admit(self, images: int) -> None:
        if self.closed:
            raise WorkerClosedError("the service is shutting down")
        if self.pending + images > self.capacity and self.pending > 0:
            raise QueueFullError(self.name, self.capacity)
        self.pending += images
        if self._on_pending is not None:
            self._on_pending(self.pending)

    def release(self, images: int) -> None:
        """Images whose work is finished (or dropped) leave the count; only called on the event loop."""
        if images == 0:
            return
        self.pending -= images
        if self._on_pending is not None:
            self._on_pending(self.pending)


class ModelWorker(ImagesInFlight):
    """One model's worker thread, its bounded count of images in flight, and its micro-batchers."""

    def __init__(self, name: str, capacity: int, max_batch: int, max_wait_ms: float,
                 on_batch: Callable[[str, int], None] | None = None, *, threads: int = 1,
                 on_pending: Callable[[int], None] | None = None,
                 large_batch_threads: int | None = None, large_batch: int = 48,
                 small_batch_onednn: bool = True, on_execution: Callable[[Execution], None] | None = None) -> None:
        super().__init__(name, capacity, on_pending)
        self.kernels = KernelPolicy(threads, large_batch_threads or threads, large_batch, small_batch_onednn)
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        # Held from the moment work is handed to the thread until it is done there: so nothing waits in the
        # executor's own queue, where it could no longer be dropped when its request is abandoned.
        self.model_free = asyncio.Lock()
        self.arriving = 0  # requests received for this model and not yet submitted (see Arrival)
        self._on_batch = on_batch
        self._on_execution = on_execution  # told each run of the model, with its requests' waits (metrics)
        self._batchers: dict[Hashable, MicroBatcher] = {}

    @property
    def large_batch(self) -> int:
        return self.kernels.large_batch

    def with_threads(self, fn: Callable[[torch.Tensor], T], batch: torch.Tensor) -> T:
        """fn(batch) with CPU kernels sized to the batch (service.api.cpu_kernels)."""
        return with_kernels(fn, batch, self.kernels)

    def batcher(self, key: Hashable, fn: BatchFn) -> MicroBatcher:
        """The batcher for one kind of work (`key`), made on first use."""
        if key not in self._batchers:
            kind = str(key[0]) if isinstance(key, tuple) else str(key)
            on_batch = functools.partial(self._on_batch, kind) if self._on_batch else None
            self._batchers[key] = MicroBatcher(self, fn, self.max_batch, self.max_wait, on_batch, kind=kind)
        return self._batchers[key]

    async def submit(self, key: Hashable, fn: BatchFn, images: Tensor) -> list[Any]:
        """Micro-batched work: `fn` over a batch that holds `images` (and other requests' images with the same key)."""
        self._admit(int(images.shape[0]))  # released by the batcher when the batch is done
        return await self.batcher(key, fn).submit(images)

    async def run(self, key: tuple, fn: Callable[..., T], *args: Any, images: int = 1) -> T:
        """Unbatched work `fn(*args)` in the model's thread (attacks; `key` names it: its first item is the kind
        in the measurements), counted against the capacity like batched work. A request abandoned while it waits
        for the thread (timeout, client gone) never runs."""
        waiting = [(current_endpoint(), images, time.perf_counter_ns())]
        self._admit(images)
        try:
            await self.model_free.acquire()
        except BaseException:
            self.release(images)
            raise
        try:
            if self.closed:
                raise WorkerClosedError("the service is shutting down")
            work = self._start(images, functools.partial(self.report, str(key[0]), images, waiting), fn, *args)
        except BaseException:
            self.model_free.release()
            self.release(images)
            raise
        return await asyncio.wrap_future(work)

    def _start(self, images: int, report: Callable[[ModelClock], None], fn: Callable[..., T],
               *args: Any) -> concurrent.futures.Future[T]:
        """Hand work to the model's thread (`model_free` held), timed there. When it is really over there (a
        request that times out leaves it running), its images leave the count, the thread is free again, and
        `report` gets its clock."""
        loop = asyncio.get_running_loop()
        clock = ModelClock()
        work = self.executor.submit(_clocked, clock, fn, *args)

        def done(_: object) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._work_done, images, clock, report)

        work.add_done_callback(done)
        return work

    def _work_done(self, images: int, clock: ModelClock, report: Callable[[ModelClock], None]) -> None:
        self.release(images)
        self.model_free.release()
        if clock.started_ns:  # it ran (work cancelled before it started has nothing to report)
            report(clock)

    def report(self, kind: str, images: int, waiting: Sequence[Waiting], clock: ModelClock) -> None:
        """One run of the model, on `images` images, for the `waiting` requests: to `on_execution`."""
        if self._on_execution is None:
            return
        requests = tuple(QueuedRequest(endpoint, count, max(0, clock.started_ns - queued_ns))
                         for endpoint, count, queued_ns in waiting)
        self._on_execution(Execution(kind, images, clock.finished_ns - clock.started_ns, requests))

    async def close(self) -> None:
        """Refuse new work, fail what still waits, and let the running batch finish."""
        self.closed = True
        for batcher in self._batchers.values():
            await batcher.close()
        await asyncio.to_thread(self.executor.shutdown, wait=True)
