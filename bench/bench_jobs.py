"""Throughput of screening jobs through Redis and `fisher-guard worker` processes: LeNet-5 on the 1000-image MNIST
test split, CPU.

Starts its own redis-server on a free port and real workers, then measures the end-to-end time (submit ->
succeeded, as a client sees it) of screening the 1000 images:
  - as one job, on one worker with 1 and with 2 torch threads;
  - as one job on two workers with 1 thread each, not sharded (one worker does it all) and sharded into 4 shards
    of 250 (FISHER_GUARD_JOBS_SHARD_SIZE, the default) that the two workers share;
  - as two jobs of 500 (uploaded .npz) on two workers;
  - and, for reference, the same engine calls without any queue, in this process, 1 and 2 threads.
Prints a Markdown table and writes it to bench/results/jobs-cpu.md.

    .venv/bin/python bench/bench_jobs.py                  # models/ must hold lenet5 and its detector
    .venv/bin/python bench/bench_jobs.py --repeats 5 --models-dir /path/to/models
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.config import Settings, get_settings  # noqa: E402
from service.data.mnist import load_mnist  # noqa: E402
from service.jobs.redis_queue import RedisJobQueue  # noqa: E402
from service.jobs.types import JobRequest, JobStatus  # noqa: E402

RESULTS = REPO / "bench" / "results" / "jobs-cpu.md"
FISHER_GUARD = Path(sys.executable).with_name("fisher-guard")


@dataclass
class Row:
    setup: str
    jobs: str
    end_to_end_s: list[float]

    def line(self) -> str:
        e2e = statistics.median(self.end_to_end_s)
        return f"| {self.setup} | {self.jobs} | {e2e:.2f} | {1000 / e2e:.0f} |"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis() -> tuple[subprocess.Popen, str]:
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_workers(url: str, queue: str, count: int, threads: int, models_dir: Path | None) -> list[subprocess.Popen]:
    env = {**os.environ, "FISHER_GUARD_REDIS_URL": url, "FISHER_GUARD_JOBS_QUEUE": queue,
           "FISHER_GUARD_DEVICE": "cpu"}
    if models_dir is not None:
        env["FISHER_GUARD_MODELS_DIR"] = str(models_dir)
    return [subprocess.Popen([str(FISHER_GUARD), "worker", "--name", f"{queue}-{i}", "--threads", str(threads),
                              "--preload", "lenet5", "--log-level", "WARNING"], env=env, start_new_session=True)
            for i in range(count)]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)


def wait_workers(queue: RedisJobQueue, count: int, timeout: float = 180) -> None:
    from rq import Worker

    deadline = time.monotonic() + timeout
    while len(Worker.all(queue=queue.queue)) < count:
        if time.monotonic() > deadline:
            sys.exit(f"workers did not start in {timeout} s")
        time.sleep(0.2)


def run_jobs(queue: RedisJobQueue, submissions: list[tuple[JobRequest, list]]) -> float:
    """Submit all, wait for all: end-to-end seconds."""
    start = time.perf_counter()
    ids = [queue.submit(request, files).id for request, files in submissions]
    pending = set(ids)
    while pending:
        for job_id in list(pending):
            info = queue.status(job_id)
            if info.status.finished:
                if info.status != JobStatus.succeeded:
                    sys.exit(f"job {job_id} {info.status.value}: {info.error}")
                pending.discard(job_id)
        time.sleep(0.01)
    return time.perf_counter() - start


def npz_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    return buffer.getvalue()


def engine_only(images: np.ndarray, repeats: int, threads: int) -> Row:
    """The same screening without the queue: the task's engine calls in this process."""
    import torch

    from service import serving
    from service.jobs import model_cache

    torch.set_num_threads(threads)
    model = model_cache.get_bundle("lenet5")
    size = Settings().jobs_batch_size
    serving.screen(model, torch.from_numpy(images[:64]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for first in range(0, len(images), size):
            serving.screen(model, torch.from_numpy(images[first:first + size]))
        times.append(time.perf_counter() - start)
    return Row(f"engine only, no queue ({threads} thread{'s' if threads > 1 else ''}, this process)", "-", times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models-dir", type=Path, default=None)
    args = parser.parse_args()
    if args.models_dir is not None:  # the submitting side checks the model and detector too
        os.environ["FISHER_GUARD_MODELS_DIR"] = str(args.models_dir)
        get_settings.cache_clear()

    images, labels = load_mnist("test")
    halves = [(images[:500].numpy(), labels[:500].numpy()), (images[500:].numpy(), labels[500:].numpy())]
    one_job = [(JobRequest(type="screen", model="lenet5", dataset="mnist:test"), [])]
    two_jobs = [(JobRequest(type="screen", model="lenet5"), [(f"half{i}.npz", npz_bytes(*h))])
                for i, h in enumerate(halves)]
    redis_proc, url = start_redis()
    rows: list[Row] = []
    plans = (  # workers, torch threads each, [(setup, jobs, shard size, submissions)]
        (1, 1, [("1 worker x 1 thread", "1 x 1000", 0, one_job)]),
        (1, 2, [("1 worker x 2 threads", "1 x 1000", 0, one_job)]),
        (2, 1, [("2 workers x 1 thread, not sharded", "1 x 1000", 0, one_job),
                ("2 workers x 1 thread, sharded (250)", "1 x 1000", 250, one_job),
                ("2 workers x 1 thread", "2 x 500 (.npz uploads)", 0, two_jobs)]),
    )
    try:
        for number, (workers, threads, setups) in enumerate(plans):
            name = f"bench-{number}"
            procs = start_workers(url, name, workers, threads, args.models_dir)
            try:
                for setup, jobs, shard_size, submissions in setups:
                    queue = RedisJobQueue(url, Settings(redis_url=url, jobs_queue=name, jobs_shard_size=shard_size))
                    wait_workers(queue, workers)
                    warm_up = [(JobRequest(type="screen", model="lenet5", dataset="mnist:test", limit=64), [])]
                    run_jobs(queue, warm_up * workers)  # first calls on each worker
                    rows.append(Row(setup, jobs, [run_jobs(queue, submissions) for _ in range(args.repeats)]))
                    print(rows[-1].line(), flush=True)
                    queue.close()
            finally:
                stop(procs)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)

    import torch

    for threads in (1, 2):
        rows.append(engine_only(images.numpy(), args.repeats, threads))
        print(rows[-1].line(), flush=True)
    load = os.getloadavg()
    header = (f"Screening the 1000-image MNIST test split with LeNet-5 as jobs (Redis + `fisher-guard worker`), CPU "
              f"({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch {torch.__version__}, "
              f"median of {args.repeats} runs. Load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
              f"(other work on the machine slows every row alike).\n\n"
              "End-to-end: submit -> succeeded, as a client polling the status sees it (includes staging the "
              "uploads, queueing, and for sharded jobs the merge). The engine-only rows run the same engine calls "
              "with no queue, for reference.\n\n"
              "Command: `.venv/bin/python bench/bench_jobs.py" + (f" --repeats {args.repeats}" if args.repeats != 3
                                                                   else "") + "`\n\n")
    table = ("| setup | jobs | end-to-end s | images/s |\n|---|---|---|---|\n" + "\n".join(r.line() for r in rows)
             + "\n")
    print("\n" + table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(f"# Jobs benchmark (CPU)\n\n{header}{table}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
