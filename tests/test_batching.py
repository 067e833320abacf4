"""The micro-batcher, the model worker and its CPU-kernel policy (service.api.micro_batcher, model_worker,
cpu_kernels) on their own: grouping, waiting, capacity, abandoned work and closing, and CPU-kernel sizing;
deterministic, driven by events rather than timings."""


from __future__ import annotations

import asyncio
import time

import pytest
import torch

from service.api.micro_batcher import Arrival, QueueFullError, WorkerClosedError, current_arrival
from service.api.model_worker import ModelWorker


def test_micro_batcher_groups_waiting_requests():
    sizes: list[int] = []

    def work(batch: torch.Tensor) -> list[float]:
        sizes.append(int(batch.shape[0]))
        return batch.flatten(1).sum(1).tolist()

    async def scenario() -> list[list[float]]:
        worker = ModelWorker("m", capacity=100, max_batch=4, max_wait_ms=50)
        try:
            inputs = [torch.full((1, 2), float(i)) for i in range(6)] + [torch.ones(3, 2)]
            return await asyncio.gather(*(worker.submit(("k",), work, x) for x in inputs))
        finally:
            await worker.close()

    out = asyncio.run(scenario())
    assert out[:6] == [[2.0 * i] for i in range(6)] and out[6] == [2.0, 2.0, 2.0]
    assert sizes == [4, 2, 3]  # 4 singles; then 2 singles (the 3-image request would overflow); then it


def test_micro_batcher_waits_only_for_arriving_requests():
    """A lone request runs at once even with a long max wait; with another request announced (received by the
    HTTP layer, still decoding) the batcher waits for it and runs both together."""
    sizes: list[int] = []

    def work(batch: torch.Tensor) -> list[float]:
        sizes.append(int(batch.shape[0]))
        return batch.flatten(1).sum(1).tolist()

    async def scenario() -> tuple[float, float]:
        worker = ModelWorker("m", capacity=100, max_batch=8, max_wait_ms=2000)
        try:
            start = time.perf_counter()
            await worker.submit(("k",), work, torch.ones(1, 2))
            lone = time.perf_counter() - start
            late = Arrival(worker)  # announced, not yet submitted

            async def later() -> list[float]:
                await asyncio.sleep(0.2)
                token = current_arrival.set(late)
                try:
                    return await worker.submit(("k",), work, torch.ones(1, 2))
                finally:
                    current_arrival.reset(token)

            start = time.perf_counter()
            await asyncio.gather(worker.submit(("k",), work, torch.ones(1, 2)), later())
            return lone, time.perf_counter() - start
        finally:
            await worker.close()

    lone, pair = asyncio.run(scenario())
    assert lone < 1.0 and 0.15 < pair < 1.5
    assert sizes == [1, 2]


def test_micro_batcher_waits_for_as_many_requests_as_its_last_batch():
    """Under steady load the clients of the last batch send again: the batcher waits (up to max wait) until it
    holds as many requests as that batch did, instead of running the first few alone. When the load drops, one
    batch waits the whole max wait, and the next lone request runs at once."""
    sizes: list[int] = []

    def work(batch: torch.Tensor) -> list[float]:
        sizes.append(int(batch.shape[0]))
        return batch.flatten(1).sum(1).tolist()

    async def scenario() -> tuple[float, float, float]:
        worker = ModelWorker("m", capacity=100, max_batch=8, max_wait_ms=300)
        one = lambda: worker.submit(("k",), work, torch.ones(1, 2))  # noqa: E731

        async def late() -> list[list[float]]:
            await asyncio.sleep(0.05)
            return await asyncio.gather(one(), one(), one())

        try:
            await asyncio.gather(*(one() for _ in range(4)))
            start = time.perf_counter()
            await asyncio.gather(one(), late())
            steady = time.perf_counter() - start
            start = time.perf_counter()
            await one()
            dropped = time.perf_counter() - start
            start = time.perf_counter()
            await one()
            return steady, dropped, time.perf_counter() - start
        finally:
            await worker.close()

    steady, dropped, lone = asyncio.run(scenario())
    assert sizes == [4, 4, 1, 1]
    assert 0.04 < steady < 0.28 and dropped >= 0.25 and lone < 0.2


def test_micro_batcher_capacity():
    """Work beyond the capacity is refused while the model is busy; the count of images in flight, as reported to
    `on_pending` (the metrics gauge), rises on admission and falls when the work ends, refused work not counted."""
    reported: list[int] = []

    async def scenario() -> None:
        worker = ModelWorker("m", capacity=2, max_batch=1, max_wait_ms=0, on_pending=reported.append)
        try:
            slow = asyncio.ensure_future(worker.run(("sleep",), time.sleep, 0.3, images=2))
            await asyncio.sleep(0.05)
            with pytest.raises(QueueFullError):
                await worker.submit(("k",), lambda b: b.tolist(), torch.zeros(1, 1))
            await slow
            await asyncio.sleep(0.05)  # the release comes back to the loop from the worker thread
            assert await worker.submit(("k",), lambda b: b.tolist(), torch.zeros(1, 1)) == [[0.0]]
        finally:
            await worker.close()

    asyncio.run(scenario())
    assert reported == [2, 0, 1, 0]


def test_abandoned_work_failures_and_closing_never_jam_the_model():
    """The model's thread is handed work only when free (`model_free`): requests abandoned while they wait leave
    the count at once and never run; an error before the model starts fails its batch only; closing answers
    everything still waiting. Afterwards nothing is counted and the thread is free."""
    ran: list[int] = []
    hiccups = [RuntimeError("metrics backend hiccup")]

    def on_batch(kind: str, size: int) -> None:
        if hiccups:
            raise hiccups.pop()

    def record(batch: torch.Tensor) -> list[int]:
        ran.append(int(batch.shape[0]))
        return [0] * int(batch.shape[0])

    async def scenario() -> None:
        worker = ModelWorker("m", capacity=8, max_batch=8, max_wait_ms=0, on_batch=on_batch)
        with pytest.raises(RuntimeError, match="hiccup"):  # fails its own batch ...
            await worker.submit(("k",), record, torch.zeros(1, 1))
        assert await worker.submit(("k",), record, torch.zeros(1, 1)) == [0]  # ... and only that one
        attack = asyncio.ensure_future(worker.run(("sleep",), time.sleep, 0.3, images=1))
        await asyncio.sleep(0.05)
        abandoned = [asyncio.ensure_future(worker.submit(("k",), record, torch.zeros(1, 1))) for _ in range(3)]
        await asyncio.sleep(0.05)
        for task in abandoned:
            task.cancel()
        await asyncio.sleep(0)
        assert worker.pending == 1  # only the attack: the abandoned images left the count at once
        await attack
        await asyncio.sleep(0.05)
        assert ran == [1] and worker.pending == 0 and not worker.model_free.locked()  # they never ran
        busy = asyncio.ensure_future(worker.run(("sleep",), time.sleep, 0.2, images=1))
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(worker.run(("sleep",), time.sleep, 0, images=1)),
                   asyncio.ensure_future(worker.submit(("k",), record, torch.zeros(1, 1)))]
        await asyncio.sleep(0.05)
        await worker.close()
        await busy  # the work in the thread finishes
        for task in waiting:
            with pytest.raises(WorkerClosedError):
                await task
        assert worker.pending == 0 and not worker.model_free.locked()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_model_worker_sizes_torch_threads_to_the_batch():
    import torch

    from service.api.model_worker import ModelWorker

    before = torch.get_num_threads()
    worker = ModelWorker("m", capacity=8, max_batch=8, max_wait_ms=1, threads=1, large_batch_threads=2,
                         large_batch=4, small_batch_onednn=False)
    onednn = torch.backends.mkldnn.enabled
    try:
        assert worker.with_threads(lambda b: torch.get_num_threads(), torch.zeros(1, 3)) == 1
        assert worker.with_threads(lambda b: torch.get_num_threads(), torch.zeros(4, 3)) == 2
        assert worker.with_threads(lambda b: b.shape[0], torch.zeros(5, 3)) == 5  # fn's answer comes back
        assert worker.with_threads(lambda b: torch.backends.mkldnn.enabled, torch.zeros(1, 3)) is False
        assert worker.with_threads(lambda b: torch.backends.mkldnn.enabled, torch.zeros(4, 3)) is True
        assert torch.backends.mkldnn.enabled == onednn  # restored after each call
    finally:
        worker.executor.shutdown()
        torch.set_num_threads(before)
