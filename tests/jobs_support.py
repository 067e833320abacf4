"""What the job test modules share: a seeded model folder, real `fisher-guard worker` processes on real Redis
queues, queues of both backends, and helpers (their fixtures reach the modules through `pytest_plugins`).

Timings are shortened by settings: heartbeat 1 s, lease 3 s, batches of 50 images with a debug sleep per batch
(FISHER_GUARD_JOBS_DEBUG_DELAY_S) so that running jobs can be watched, cancelled and killed mid-way.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from service.config import Settings, get_settings
from service.jobs import model_cache
from service.jobs.local_backend import InProcessJobQueue
from service.jobs.redis_queue import RedisJobQueue
from service.jobs.types import (
    JobInfo,
)

HEARTBEAT_S, LEASE_S, BATCH, DELAY_S = 1, 3, 50, 0.15
FISHER_GUARD = Path(sys.executable).with_name("fisher-guard")


# ----------------------------------------------------------------------------------------------- fixtures



@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Iterator[Path]:
    """A model folder with a seeded LeNet-5 and a small detector for it (logistic regression on random features:
    fast to make; what is tested is the plumbing, not detection quality). The process settings point at it."""
    from sklearn.linear_model import LogisticRegression

    from service.detect.detector import Detector
    from service.detect.files import detector_path, save_detector
    from service.zoo.architectures import LeNet5
    from service.zoo.cards import ModelCard
    from service.zoo.registry import sha256_file

    folder = tmp_path_factory.mktemp("job-models")
    torch.manual_seed(3)
    torch.save(LeNet5().state_dict(), folder / "lenet5.pt")
    sha = sha256_file(folder / "lenet5.pt")
    ModelCard(name="lenet5", architecture="lenet5", activation="relu", weights="lenet5.pt", sha256=sha,
              input_shape=[1, 28, 28], mean=[0.1307], std=[0.3081], class_names=[str(i) for i in range(10)],
              num_classes=10).write(folder / "lenet5.json")
    rng = np.random.default_rng(0)
    features = rng.normal(-3, 1, size=(200, 20))
    labels = (features[:, 0] > -3).astype(int)
    save_detector(Detector(LogisticRegression().fit(features, labels), "plain", 20, 0.5,
                           {"model": {"name": "lenet5", "sha256": sha}}), detector_path(folder, "lenet5"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run (FISHER_GUARD_JOBS_WORKER_THREADS): much faster on busy cores
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FISHER_GUARD_MODELS_DIR", str(folder))
        mp.delenv("FISHER_GUARD_REDIS_URL", raising=False)
        get_settings.cache_clear()
        model_cache.configure([folder], "cpu")
        yield folder
    get_settings.cache_clear()
    model_cache.configure(get_settings().model_folders(), "auto")
    torch.set_num_threads(threads)


class Workers:
    """Real `fisher-guard worker` subprocesses on one queue; each in its own session, killed by pid only."""

    def __init__(self, url: str, queue: str, models: Path, log_dir: Path, delay_s: float = DELAY_S) -> None:
        self.url, self.queue, self.log_dir = url, queue, log_dir
        self.env = {**os.environ, "FISHER_GUARD_REDIS_URL": url, "FISHER_GUARD_MODELS_DIR": str(models),
                    "FISHER_GUARD_JOBS_QUEUE": queue, "FISHER_GUARD_JOBS_HEARTBEAT_S": str(HEARTBEAT_S),
                    "FISHER_GUARD_JOBS_LEASE_S": str(LEASE_S), "FISHER_GUARD_JOBS_BATCH_SIZE": str(BATCH),
                    "FISHER_GUARD_JOBS_DEBUG": "true", "FISHER_GUARD_JOBS_DEBUG_DELAY_S": str(delay_s),
                    "FISHER_GUARD_DEVICE": "cpu"}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, preload: bool = True) -> None:
        cmd = [str(FISHER_GUARD), "worker", "--name", name, "--threads", "1"] + (["--preload", "lenet5"] if preload
                                                                                  else [])
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait_ready(self, *names: str, timeout: float = 60) -> None:
        """Until each worker is registered with rq on our queue."""
        from rq import Queue, Worker

        conn = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            live = {w.name for w in Worker.all(queue=Queue(self.queue, connection=conn))}
            if set(names) <= live:
                return
            for name in names:
                if self.procs[name].poll() is not None:
                    raise AssertionError(f"worker {name} exited: {self.log(name)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"workers {set(names) - live} did not start in {timeout} s")
            time.sleep(0.1)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text()[-3000:]

    def kill(self, name: str) -> None:
        os.kill(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)


def queue_settings(**overrides) -> Settings:
    base = {"jobs_batch_size": BATCH, "jobs_debug": True, "jobs_debug_delay_s": DELAY_S, "jobs_local_threads": 2,
            "jobs_max_items": 64, "jobs_max_attempts": 2, "jobs_heartbeat_s": HEARTBEAT_S, "jobs_lease_s": LEASE_S,
            "jobs_shard_size": 0}  # no sharding unless a test asks for it
    return Settings(**{**base, **overrides})


class Pool:
    """The module's worker processes, all started at once (their start-up dominates the run time): two serve the
    behavioural tests' queue, four the crash tests' queue (a crash test kills one, the poison job two more)."""

    def __init__(self, url: str, models: Path, log_dir: Path) -> None:
        self.behaviour = Workers(url, f"fg-test-{uuid.uuid4().hex[:8]}", models, log_dir)
        self.crash = Workers(url, f"fg-crash-{uuid.uuid4().hex[:8]}", models, log_dir, delay_s=0.3)
        for name in ("w1", "w2"):
            self.behaviour.start(name)
        for name in ("c1", "c2", "c3", "c4"):
            self.crash.start(name, preload=False)  # they load the model at their first job: less start-up CPU

    def stop(self) -> None:
        self.behaviour.stop()
        self.crash.stop()


@pytest.fixture(scope="module")
def pool(redis_url, models_dir, tmp_path_factory) -> Iterator[Pool]:
    workers = Pool(redis_url, models_dir, tmp_path_factory.mktemp("workers"))
    try:
        yield workers
    finally:
        workers.stop()


@pytest.fixture(scope="module", params=["redis", "in-process"])
def make_queue(request, models_dir) -> Iterator[Callable[..., object]]:
    """A factory of queues of one backend (settings overridable); for Redis, two workers serve the queue."""
    made: list = []
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        workers = request.getfixturevalue("pool").behaviour
        workers.wait_ready("w1", "w2")

        def factory(**overrides):
            queue = RedisJobQueue(url, queue_settings(redis_url=url, jobs_queue=workers.queue, **overrides))
            made.append(queue)
            return queue
    else:
        def factory(**overrides):
            queue = InProcessJobQueue(queue_settings(**overrides))
            made.append(queue)
            return queue
    yield factory
    for queue in made:
        queue.close()


@pytest.fixture
def queue(make_queue):
    return make_queue()


def wait_for(queue, job_id: str, until: Callable[[JobInfo], bool] = lambda i: i.status.finished,
             timeout: float = 60, seen: list | None = None) -> JobInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = queue.status(job_id)
        if seen is not None:
            seen.append(info)
        if until(info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {info.status.value} after {timeout} s: {info}")
        time.sleep(0.05)


def csv_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode())))






def sample_images() -> tuple[np.ndarray, np.ndarray]:
    from service.data.mnist import load_mnist

    images, labels = load_mnist("test")
    return images[:8].numpy(), labels[:8].numpy()




