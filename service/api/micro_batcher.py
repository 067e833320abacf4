"""Dynamic micro-batching: concurrent requests for one model are joined into one forward/Jacobian batch.

Each model has one `ModelWorker` (service.api.model_worker): a single worker thread where all of that model's
torch work runs (so the event loop never blocks and models never fight over one module), a count of images in
flight bounded by
`capacity` (beyond it: `QueueFullError`, which the API answers with 503 + Retry-After), and one
`MicroBatcher` per kind of work (screen, spectrum with given k/method, ...). A batcher takes the first waiting
request, then keeps adding waiting requests until `max_batch` images or `max_wait` seconds, runs the joined
batch in the worker thread, and hands each request its rows. While a batch runs, new requests queue up and
form the next batch, so batches grow with the load; `max_batch = 1` turns batching off.

The wait for more requests is only spent while other requests for the model are still arriving (received by
the HTTP layer, being decoded: `Arrival`), or while the batch holds fewer requests than the last one did (under
steady load the clients answered by the last batch send again; without this wait, the few requests that came in
while a large batch ran would run as a small batch of their own); a lone request runs at once, so batching costs
no latency at low load.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from service.api.model_worker import ModelWorker

log = logging.getLogger(__name__)

BatchFn = Callable[[Tensor], list[Any]]  # (N, ...) images -> N per-image results


class QueueFullError(RuntimeError):
    """The model's queue is at capacity; retry after `retry_after` seconds."""

    def __init__(self, model: str, capacity: int, retry_after: int = 1, message: str | None = None) -> None:
        super().__init__(message or f"model {model!r} has {capacity} images waiting already; retry in {retry_after} s")
        self.retry_after = retry_after


class WorkerClosedError(RuntimeError):
    """The service is shutting down and takes no new work."""


class Arrival:
    """A request on its way to a model's batcher: counted in `worker.arriving` until it is submitted or ends."""

    def __init__(self, worker: ModelWorker) -> None:
        self.worker = worker
        self.open = True
        worker.arriving += 1

    def close(self) -> None:
        if self.open:
            self.open = False
            self.worker.arriving -= 1


current_arrival: ContextVar[Arrival | None] = ContextVar("current_arrival", default=None)
# the ASGI scope of the request being handled (set by the middleware): its route names the endpoint in metrics
current_scope: ContextVar[dict[str, Any] | None] = ContextVar("current_scope", default=None)


def current_endpoint() -> str:
    """The route path of the request being handled (e.g. "/v1/models/{model}/screen"), or "-" outside one."""
    scope = current_scope.get()
    return getattr(scope.get("route") if scope else None, "path", "-")


def micro_batched(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """Marks an endpoint whose work a model's micro-batcher groups: the app counts its requests as arriving
    while they are read and decoded (`Arrival`), so that a batch waits for them."""
    endpoint.micro_batched = True  # type: ignore[attr-defined]
    return endpoint


@dataclass
class _Item:
    images: Tensor
    future: asyncio.Future
    counted: bool = True  # its images are in the worker's count and not yet handed to the model
    endpoint: str = field(default_factory=current_endpoint)
    queued_ns: int = field(default_factory=time.perf_counter_ns)  # when it entered the model's queue

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


class MicroBatcher:
    """Joins waiting requests of one kind into batches of up to `max_batch` images, waiting up to `max_wait` s."""

    def __init__(self, worker: ModelWorker, fn: BatchFn, max_batch: int, max_wait: float,
                 on_batch: Callable[[int], None] | None = None, *, kind: str = "batch") -> None:
        self.worker = worker
        self.fn = fn
        self.kind = kind  # the kind of work, in the worker's measurements
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait)
        self.on_batch = on_batch
        self._items: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._held: list[_Item] = []  # taken from the queue for the next batch, not yet handed to the model
        self._expected = 1  # requests in the last batch: under steady load, about as many come again

    async def submit(self, images: Tensor) -> list[Any]:
        """The per-image results for `images`, computed in a batch with whatever else is waiting."""
        future = asyncio.get_running_loop().create_future()
        item = _Item(images, future)
        # a request abandoned (timeout, client gone) before its batch starts frees its place in the queue at once
        future.add_done_callback(lambda done: self._drop(item) if done.cancelled() else None)
        self._items.append(item)
        arrival = current_arrival.get()
        if arrival is not None and arrival.worker is self.worker:
            arrival.close()
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"batcher-{self.worker.name}")
        return await future

    async def _next(self, timeout: float | None) -> _Item | None:
        """The next waiting item, or None when `timeout` (seconds) passes first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self._skip_abandoned()
        while not self._items:
            self._wakeup.clear()
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return None
        return self._items.popleft()

    def _skip_abandoned(self) -> None:
        """Requests abandoned while they waited (already dropped from the count) leave the queue's head."""
        while self._items and self._items[0].future.done():
            self._items.popleft()

    def _drop(self, item: _Item) -> None:
        """An item that will not run: its images leave the worker's count (once)."""
        if item.counted:
            item.counted = False
            self.worker.release(item.size)

    async def _collect(self) -> None:
        """Fill `_held` with the next batch's items."""
        first = await self._next(None)
        assert first is not None
        items, size = self._held, first.size
        items.append(first)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            self._skip_abandoned()
            if self._items:
                item = self._items[0]
                if size + item.size > self.max_batch:
                    break  # it starts the next batch
                items.append(self._items.popleft())
                size += item.size
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or (self.worker.arriving <= 0 and len(items) >= self._expected):
                break  # nobody else is on the way, and as many requests as in the last batch: run now
            item = await self._next(remaining)
            if item is None:
                break
            self._items.appendleft(item)  # size checked at the top of the loop
        self._expected = len(items)

    async def _run(self) -> None:
        while True:
            await self._collect()
            await self.worker.model_free.acquire()  # released when the batch is done (`ModelWorker._start`)
            # the last moment before the model starts: requests that timed out or whose client left are dropped
            items, self._held = [it for it in self._held if not it.future.done()], []
            try:
                if self.worker.closed:
                    raise WorkerClosedError("the service is shutting down")
                if not items:
                    self.worker.model_free.release()
                    continue
                batch = items[0].images if len(items) == 1 else torch.cat([it.images for it in items])
                if self.on_batch is not None:
                    self.on_batch(int(batch.shape[0]))
                size = int(batch.shape[0])
                waiting = [(it.endpoint, it.size, it.queued_ns) for it in items]
                report = functools.partial(self.worker.report, self.kind, size, waiting)
                work = self.worker._start(size, report, self.worker.with_threads, self.fn, batch)
            except Exception as exc:  # nothing reached the model: the thread is free, the items get the error
                self.worker.model_free.release()
                self._fail(items, exc)
                continue
            for it in items:
                it.counted = False  # the images leave the count when the batch is done (`ModelWorker._start`)
            try:
                results = await asyncio.wrap_future(work)
            except asyncio.CancelledError:  # closing while the batch runs: it finishes, nobody waits for it
                self._fail(items, WorkerClosedError("the service is shutting down"))
                raise
            except Exception as exc:  # every waiting request gets the error (e.g. a ValueError from the engine)
                self._fail(items, exc)
                continue
            start = 0
            for it in items:
                if not it.future.done():
                    it.future.set_result(results[start:start + it.size])
                start += it.size

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail([*self._held, *self._items], WorkerClosedError("the service is shutting down"))
        self._held = []
        self._items.clear()

    def _fail(self, items: list[_Item], exc: BaseException) -> None:
        for item in items:
            self._drop(item)
            if not item.future.done():
                item.future.set_exception(exc)


