"""The link from an API process to the model process (`fisher-guard serve --model-process`).

One model process (per device) runs every model, with the micro-batchers of service.api.model_worker; several API
processes turn their HTTP clients around in parallel and hand it their work, so that requests from all of them are
batched together. Each API process holds one Unix-socket connection to it:

- messages are length-prefixed JSON frames (`FRAME`): a work request names the model and the work key
  (service.api.runtime.ServedModel.work: the key says all there is to the work, no function crosses), the
  answer holds the per-image results (plain values) and how the model's run of them went (for the metrics);
- the images never go through the socket: the API process writes them into its own shared-memory arena
  (`ImageArena`, a file in /dev/shm mapped by both processes, unlinked once both have it) and sends where they
  lie; the model process copies them out once. A block stays taken until the model process has answered for it,
  even when the request was abandoned, so it is never rewritten before that copy.

When the model process dies, every request in flight and every new one gets ModelUnavailableError (503 with
Retry-After), readiness turns off, and the link connects again as soon as the model process is back (the serve
command restarts it). `RemoteWorker` gives the API the interface of a local ModelWorker over the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.api.metrics import Execution, QueuedRequest
from service.api.micro_batcher import QueueFullError, WorkerClosedError, current_arrival, current_endpoint
from service.api.model_worker import ImagesInFlight

log = logging.getLogger(__name__)

FRAME = struct.Struct("!I")  # each message: its length in bytes (big-endian uint32), then that much UTF-8 JSON
MAX_FRAME = 1 << 30
BLOCK = 4096  # the arena's unit of allocation
RECONNECT_S = 0.5  # between attempts to reach the model process
DTYPES = {"float32": torch.float32, "float64": torch.float64, "uint8": torch.uint8}


class ModelUnavailableError(RuntimeError):
    """The model process is down (restarting) or cannot be reached; retry after `retry_after` seconds."""

    retry_after = 1


def encode_frame(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()
    return FRAME.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at the end of the stream."""
    try:
        head = await reader.readexactly(FRAME.size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    (size,) = FRAME.unpack(head)
    if size > MAX_FRAME:
        raise ConnectionError(f"a frame of {size} bytes is over the link's limit of {MAX_FRAME}")
    try:
        message = json.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    if not isinstance(message, dict):
        raise ValueError(f"a frame holds {type(message).__name__}, not a JSON object")
    return message


def error_document(exc: BaseException) -> dict[str, Any]:
    """An exception of the model's work as the answer carries it (`raise_error` raises it again on the other side)."""
    if isinstance(exc, QueueFullError):
        return {"kind": "overloaded", "message": str(exc), "retry_after": exc.retry_after}
    if isinstance(exc, WorkerClosedError):
        return {"kind": "closed", "message": str(exc)}
    if isinstance(exc, ValueError):
        return {"kind": "invalid", "message": str(exc)}
    if isinstance(exc, asyncio.CancelledError):
        return {"kind": "cancelled", "message": "the request was abandoned"}
    return {"kind": "internal", "message": f"{type(exc).__name__}: {exc}"}


def raise_error(document: dict[str, Any]) -> None:
    kind, message = document.get("kind"), str(document.get("message", ""))
    if kind == "overloaded":
        raise QueueFullError("", 0, int(document.get("retry_after", 1)), message)
    if kind in ("closed", "cancelled"):
        raise ModelUnavailableError(f"the model process dropped the work: {message}")
    if kind == "invalid":
        raise ValueError(message)
    raise RuntimeError(f"the model process failed: {message}")


class ImageArena:
    """A shared-memory file, mapped, in which one API process lays out request images for the model process.

    Allocation is first-fit over BLOCK-sized blocks with free extents merged on release; `take` gives None when the
    arena is full (the API answers 503, like a full queue). The creating process unlinks the file at close."""

    def __init__(self, path: Path, size: int, create: bool) -> None:
        self.path, self.size = Path(path), size
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size < size:
                raise ValueError(f"arena {path} is smaller than the {size} bytes announced")
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.owner = create
        self.free: list[tuple[int, int]] = [(0, size // BLOCK)]  # (first block, blocks), sorted

    @classmethod
    def create(cls, size: int) -> ImageArena:
        folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        fd, name = tempfile.mkstemp(prefix="fisher-guard-arena-", dir=folder)
        os.close(fd)
        os.unlink(name)
        return cls(Path(name), size, create=True)

    def take(self, nbytes: int) -> int | None:
        """The byte offset of `nbytes` free bytes, now taken; None when no run of free blocks is long enough."""
        need = max(1, -(-nbytes // BLOCK))
        for i, (first, count) in enumerate(self.free):
            if count >= need:
                self.free[i] = (first + need, count - need)
                if count == need:
                    del self.free[i]
                return first * BLOCK
        return None

    def give_back(self, offset: int, nbytes: int) -> None:
        """Return what `take(nbytes)` gave at `offset`; neighbouring free runs merge."""
        first, count = offset // BLOCK, max(1, -(-nbytes // BLOCK))
        runs = sorted([*self.free, (first, count)])
        merged: list[tuple[int, int]] = []
        for start, length in runs:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self.free = merged

    def write(self, offset: int, images: Tensor) -> dict[str, Any]:
        """Copy `images` to `offset`; returns where they lie, as the request says it."""
        array = np.ascontiguousarray(images.detach().cpu().numpy())
        self.map[offset:offset + array.nbytes] = array.tobytes()
        return {"offset": offset, "shape": list(array.shape), "dtype": str(array.dtype)}

    def read(self, where: dict[str, Any]) -> Tensor:
        """The images a request describes, as a tensor over the shared memory (no copy); checked against the arena."""
        dtype = DTYPES.get(str(where.get("dtype")))
        shape = where.get("shape")
        offset = where.get("offset")
        if dtype is None or not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape) \
                or type(offset) is not int or offset < 0:
            raise ValueError(f"the request's images are described as {where!r}")
        count = int(np.prod(shape)) if shape else 1
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if offset + nbytes > self.size:
            raise ValueError(f"the request's images ({nbytes} bytes at {offset}) lie outside the arena")
        return torch.frombuffer(self.map, dtype=dtype, count=count, offset=offset).view(shape)

    def unlink(self) -> None:
        """Remove the file (the mappings stay): once the model process has mapped it, nothing needs its name."""
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a tensor over it still alive: the mapping goes with the process
            self.map.close()
        self.unlink()


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


@dataclass
class _Call:
    future: asyncio.Future
    offset: int
    nbytes: int


@dataclass
class ModelLink:
    """One API process's connection to the model process: work requests out, answers in, reconnecting after a
    loss. `models` is what the model process said it serves ({name: {"sha256", "device", "detector_id"}});
    `error`, why it serves none (its models failed to load); `on_state` is told True / False as the link comes up
    and goes down (the readiness gauge)."""

    socket_path: str
    arena_bytes: int
    arena: ImageArena | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    on_state: Callable[[bool], None] | None = None
    _writer: asyncio.StreamWriter | None = None
    _calls: dict[int, _Call] = field(default_factory=dict)
    _next_id: int = 0
    _task: asyncio.Task | None = None
    _answered: asyncio.Event = field(default_factory=asyncio.Event)  # connected once, or told why it cannot be

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def start(self) -> None:
        """Keep the link up in the background (connect, read answers, connect again)."""
        self._task = asyncio.create_task(self._keep_up(), name="model-link")

    async def wait_connected(self) -> None:
        """Until the model process has answered once; ValueError with its reason when it has no models."""
        await self._answered.wait()
        if self.error is not None:
            raise ValueError(f"the model process could not load its models: {self.error}")

    async def _keep_up(self) -> None:
        announced = False
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.socket_path)
            except OSError as exc:
                if not announced:
                    log.info("waiting for the model process at %s: %s", self.socket_path, exc)
                    announced = True
                await asyncio.sleep(RECONNECT_S)
                continue
            try:
                # a fresh arena per connection: nothing of the last one is in flight (`_lost`), and its file goes as
                # soon as the model process has mapped it, so a killed API process leaves none behind in /dev/shm
                self.arena = ImageArena.create(self.arena_bytes)
                writer.write(encode_frame({"hello": {"arena": str(self.arena.path), "size": self.arena.size,
                                                     "pid": os.getpid()}}))
                welcome = await read_frame(reader)
                self.arena.unlink()
                if welcome and welcome.get("error"):
                    self.error = str(welcome["error"])
                    self._answered.set()
                    raise ConnectionError(f"the model process has no models: {self.error}")
                if not welcome or not isinstance(welcome.get("models"), dict):
                    raise ConnectionError(f"the model process answered {welcome!r} to hello")
                self.models, self.error = welcome["models"], None
                self._writer = writer
                self._answered.set()
                if self.on_state is not None:
                    self.on_state(True)
                announced = False
                log.info("connected to the model process (pid %s) at %s", welcome.get("pid"), self.socket_path)
                while (message := await read_frame(reader)) is not None:
                    self._answer(message)
            except Exception as exc:  # noqa: BLE001 - whatever broke the link, it is rebuilt
                log.warning("the link to the model process failed: %s", exc)
            finally:
                self._lost(writer)
            await asyncio.sleep(RECONNECT_S)

    def _lost(self, writer: asyncio.StreamWriter) -> None:
        """The model process is gone: every call in flight fails, its blocks are free again."""
        if self._writer is writer:
            log.warning("lost the model process: %d requests in flight answered 503", len(self._calls))
            if self.on_state is not None:
                self.on_state(False)
        self._writer = None
        writer.close()
        calls, self._calls = self._calls, {}
        for call in calls.values():
            if not call.future.done():
                call.future.set_exception(ModelUnavailableError("the model process stopped; it is restarting"))
        if self.arena is not None:
            self.arena.close()
            self.arena = None

    def _release(self, call: _Call) -> None:
        if self.arena is not None:
            self.arena.give_back(call.offset, call.nbytes)

    def _answer(self, message: dict[str, Any]) -> None:
        call_id = message.get("id")
        call = self._calls.pop(call_id, None) if type(call_id) is int else None
        if call is None:
            return
        self._release(call)  # the model process is done with the images
        if not call.future.done():
            call.future.set_result(message)

    def tell(self, message: dict[str, Any]) -> None:
        """A message that needs no answer (arrivals); dropped while the model process is not reachable."""
        if self._writer is not None:
            self._writer.write(encode_frame(message))

    async def call(self, model: str, key: tuple, images: Tensor, batched: bool, arriving: int = 0) -> dict[str, Any]:
        """Hand one request's work to the model process (with the count of this process's requests for the model
        still arriving); its answer message (results or error, execution)."""
        nbytes = images.numel() * images.element_size()
        if nbytes > self.arena_bytes:
            raise ValueError(f"the request's images ({nbytes} bytes) are larger than the shared memory for requests "
                             f"in flight to the model process ({self.arena_bytes} bytes: model_process_arena_mb)")
        if self._writer is None or self.arena is None:
            raise ModelUnavailableError("the model process is not reachable; it is starting or restarting")
        offset = self.arena.take(nbytes)
        if offset is None:
            raise QueueFullError(model, 0, message=f"the shared memory for requests in flight to the model process "
                                 f"({self.arena.size} bytes) is full; retry in 1 s")
        where = self.arena.write(offset, images)
        self._next_id += 1
        call_id = self._next_id
        call = _Call(asyncio.get_running_loop().create_future(), offset, nbytes)
        self._calls[call_id] = call
        writer = self._writer
        writer.write(encode_frame({"id": call_id, "model": model, "key": list(key), "batched": batched,
                                   "images": where, "arriving": arriving}))
        try:
            return await asyncio.shield(call.future)
        except asyncio.CancelledError:  # abandoned: the model process drops it if it has not started it
            call.future.add_done_callback(_retrieved)  # its answer or its loss concerns nobody now
            if self._writer is writer and call_id in self._calls:
                writer.write(encode_frame({"cancel": call_id}))
            raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.arena is not None:
            self.arena.close()


class RemoteWorker(ImagesInFlight):
    """A model's worker in the model process, seen from an API process: the ModelWorker interface that the routers
    use (submit, run, the count of images in flight), over the link. The micro-batching happens in the model
    process, across all API processes; the answers' execution reports feed this process's metrics."""

    def __init__(self, link: ModelLink, name: str, capacity: int,
                 on_batch: Callable[[str, int], None] | None = None,
                 on_pending: Callable[[int], None] | None = None,
                 on_execution: Callable[[Execution], None] | None = None) -> None:
        super().__init__(name, capacity, on_pending)
        self.link = link
        self._arriving = 0
        self._on_batch, self._on_execution = on_batch, on_execution

    @property
    def arriving(self) -> int:
        """Requests for this model received by this process and not yet handed over (service.api.micro_batcher's
        Arrival counts them). The model process, whose batchers wait for arriving requests of every API process,
        is told each rise and each return to 0 (a request refused before it was handed over); each work request
        carries the count after its own arrival ended."""
        return self._arriving

    @arriving.setter
    def arriving(self, count: int) -> None:
        told = count > self._arriving or (count == 0 and self._arriving > 0)
        self._arriving = count
        if told:
            self.link.tell({"arriving": {self.name: count}})

    @property
    def device(self) -> str | None:
        return (self.link.models.get(self.name) or {}).get("device")

    async def _call(self, key: tuple, images: Tensor, batched: bool) -> list[Any]:
        n = int(images.shape[0])
        endpoint = current_endpoint()
        arrival = current_arrival.get()
        if arrival is not None and arrival.worker is self and arrival.open:
            arrival.open = False  # it has arrived: the work request below says so, with the count still arriving
            self._arriving -= 1
        try:
            self._admit(n)
            try:
                answer = await self.link.call(self.name, key, images, batched, self._arriving)
            finally:
                self.release(n)
        except (QueueFullError, ValueError, ModelUnavailableError, WorkerClosedError):
            self.link.tell({"arriving": {self.name: self._arriving}})  # it may never have been sent in a request
            raise
        self._report(answer.get("execution"), endpoint, n)
        if "error" in answer:
            raise_error(answer["error"])
        return answer["results"]

    def _report(self, execution: dict[str, Any] | None, endpoint: str, images: int) -> None:
        """This request's share of the model's run: its queue wait and the run's compute time; the run itself
        (batch size, execution count) is counted by the request that came first in it, in whichever process."""
        if not execution:
            return
        first = bool(execution.get("first"))
        if first and self._on_batch is not None:
            self._on_batch(str(execution["kind"]), int(execution["images"]))
        if self._on_execution is not None:
            self._on_execution(Execution(str(execution["kind"]), int(execution["images"]),
                                         int(execution["compute_ns"]),
                                         (QueuedRequest(endpoint, images, int(execution["queue_ns"])),),
                                         runs=int(first)))

    async def submit(self, key: Hashable, fn: Callable[[Tensor], list[Any]], images: Tensor) -> list[Any]:
        """Micro-batched work (`fn` is what `key` names; only the key is sent)."""
        return await self._call(tuple(key), images, batched=True)  # type: ignore[arg-type]

    async def run(self, key: tuple, fn: Callable[[Tensor], Any], batch: Tensor, *, images: int) -> Any:
        """Unbatched work (attacks, the paper's slow spectrum) on `batch` (`images` of them)."""
        return await self._call(key, batch, batched=False)

    async def close(self) -> None:
        self.closed = True
