"""Jobs against a real redis-server and real `fisher-guard worker` processes, and the in-process backend
through the same behavioural tests; crash recovery on Redis (fixtures: tests/jobs_support.py)."""

from __future__ import annotations

import io
import shutil
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from jobs_support import (
    BATCH,
    HEARTBEAT_S,
    LEASE_S,
    Workers,
    csv_rows,
    queue_settings,
    sample_images,
    wait_for,
)
from support import free_port, png, zip_of

from service.config import get_settings
from service.jobs import model_cache
from service.jobs.local_backend import InProcessJobQueue
from service.jobs.redis_queue import RedisJobQueue
from service.jobs.types import (
    JobInfo,
    JobInputError,
    JobNotFound,
    JobNotReady,
    JobRequest,
    JobStatus,
    QueueUnavailable,
)

pytest_plugins = ["jobs_support"]  # its fixtures: models_dir, pool, make_queue, queue

# ------------------------------------------------------------------------- behaviour, both backends

def test_submit_progress_result_artifact(queue):
    info = queue.submit(JobRequest(type="screen", model="lenet5", dataset="mnist:test", limit=200))
    assert info.status in (JobStatus.queued, JobStatus.running) and info.items == 200
    seen: list[JobInfo] = []
    final = wait_for(queue, info.id, seen=seen)
    assert final.status == JobStatus.succeeded, final.error
    assert final.progress.done == final.progress.total == 200
    assert any(0 < s.progress.done < 200 and s.status == JobStatus.running for s in seen), "no progress seen"
    assert final.worker and final.attempts == 1 and final.has_artifact
    assert final.created_at <= final.started_at <= final.ended_at
    summary = queue.result(info.id)
    assert summary["screened"] == 200 and 0 <= summary["accuracy"] <= 1 and summary["item_errors"] == []
    artifact = queue.artifact(info.id)
    assert artifact.media_type == "text/csv" and artifact.filename.endswith(".csv")
    rows = csv_rows(artifact.data)
    assert len(rows) == 200 and rows[0]["name"] == "mnist:test[0]" and rows[0]["status"] == "ok"
    # the same engine call as a request: the detector's score of the same images in this process
    from service import serving
    from service.data.mnist import load_mnist

    direct = serving.screen(model_cache.get_bundle("lenet5"), load_mnist("test")[0][:200])
    np.testing.assert_allclose([float(r["score"]) for r in rows], direct.scores, rtol=1e-5, atol=1e-7)
    assert [int(r["prediction"]) for r in rows] == direct.predictions.tolist()


def test_uploads_keep_valid_items_and_report_bad_ones(queue):
    images, labels = sample_images()
    members = {f"digits/{i}.png": png(images[i]) for i in range(3)}
    members["digits/broken.png"] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20
    members["digits/notes.txt"] = b"not an image"
    info = queue.submit(JobRequest(type="screen", model="lenet5"), [("batch.zip", zip_of(members))])
    assert info.items == 5 and info.item_errors == 2
    assert wait_for(queue, info.id).status == JobStatus.succeeded
    summary = queue.result(info.id)
    assert summary["screened"] == 3
    bad = {e["name"]: e["reason"] for e in summary["item_errors"]}
    assert set(bad) == {"batch.zip/digits/broken.png", "batch.zip/digits/notes.txt"}
    assert bad["batch.zip/digits/broken.png"].startswith("corrupt_image")
    assert bad["batch.zip/digits/notes.txt"].startswith("unsupported_format")
    rows = csv_rows(queue.artifact(info.id).data)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error", "error"]  # zip members in name order
    # an .npz with labels through the least-norm search
    buffer = io.BytesIO()
    np.savez(buffer, images=images[:4], labels=labels[:4])
    info = queue.submit(JobRequest(type="least-norm", model="lenet5", params={"attack": "fgm", "tol": 0.01}),
                        [("four.npz", buffer.getvalue())])
    assert wait_for(queue, info.id).status == JobStatus.succeeded
    rows = csv_rows(queue.artifact(info.id).data)
    assert [int(r["label"]) for r in rows] == labels[:4].tolist()
    assert all(float(r["least_norm"]) >= 0 for r in rows if r["found"] == "true")


@pytest.mark.parametrize("request_, files, status, code", [
    ({"type": "nope"}, [], 422, "unknown_job_type"),
    ({"type": "screen", "model": "no-such-model", "dataset": "mnist:test"}, [], 422, "unknown_model"),
    ({"type": "screen", "model": "lenet5", "dataset": "cifar:test"}, [], 422, "unknown_dataset"),
    ({"type": "screen", "model": "lenet5"}, [], 400, "no_input"),
    ({"type": "least-norm", "model": "lenet5", "dataset": "mnist:test", "params": {"attack": "bim"}}, [], 422,
     "invalid_params"),
    ({"type": "attack", "model": "lenet5", "dataset": "mnist:test", "params": {"options": {"nope": 1}}}, [], 422,
     "invalid_params"),
    ({"type": "train-detector", "model": "lenet5", "params": {"feature_set": "geometry"}}, [], 422, "invalid_params"),
    ({"type": "least-norm", "model": "lenet5", "dataset": "mnist:test", "params": {"low": 5, "high": 1}}, [], 422,
     "invalid_params"),
    *[({"type": "evaluate-detector", "model": "lenet5", "params": params}, [], 422, "invalid_params")
      for params in ({"parts": ["heldout", "bogus"]}, {"budgets": [-1]}, {"heldout": ["jsma"]},
                     {"detector": "../lenet5.detector.npz"}, {"images": 0}, {"effort": "double"})],
    ({"type": "evaluate-detector", "model": "lenet5", "params": {"detector": "none.npz"}}, [], 404,
     "unknown_detector"),
    ({"type": "evaluate-detector", "model": "lenet5", "params": {"test_dataset": "cifar:test"}}, [], 422,
     "unknown_dataset"),
    *[({"type": "attack", "model": "lenet5", "dataset": "mnist:test", "params": {"attack": "bim", "options": o}}, [],
       422, "invalid_params")
      for o in ({"steps": 10**9}, {"steps": -3}, {"steps": "abc"}, {"step_size": -3}, {"step_size": float("nan")})],
    ({"type": "attack", "model": "lenet5", "dataset": "mnist:test", "params": {"attack": "opt",
                                                                              "options": {"c": float("nan")}}},
     [], 422, "invalid_params"),
    ({"type": "screen", "model": "lenet5"}, [("x.zip", b"PK\x03\x04 this is not a zip")], 400, "corrupt_archive"),
    ({"type": "screen", "model": "lenet5"}, [("x.zip", "escape")], 400, "unsafe_archive"),
    ({"type": "screen", "model": "lenet5"}, [("x.zip", "absolute")], 400, "unsafe_archive"),
    ({"type": "screen", "model": "lenet5"}, [("x.zip", "many")], 413, "too_many_items"),
    ({"type": "screen", "model": "lenet5"}, [("a.png", b"garbage"), ("b.png", b"")], 422, "invalid_images"),
    ({"type": "screen", "model": "lenet5"}, [("x.npz", "wrong-shape")], 422, "wrong_shape"),
    ({"type": "screen", "model": "lenet5"}, [("x.npz", "no-pixels")], 422, "wrong_shape"),
    ({"type": "screen", "model": "lenet5"}, [("x.npz", "hostile-header")], 400, "corrupt_archive"),
    ({"type": "attack", "model": "lenet5"}, [("x.npz", "label-99")], 422, "invalid_labels"),
])
def test_bad_input_is_refused_at_submission(queue, request_, files, status, code):
    image = png(sample_images()[0][0])
    special = {"escape": zip_of({"ok.png": image, "../../evil.png": image}),
               "absolute": zip_of({"/etc/evil.png": image}),
               "many": zip_of({f"{i}.png": image for i in range(65)})}  # over jobs_max_items = 64
    shapes = {"wrong-shape": (2, 1, 32, 32), "no-pixels": (2, 1, 0, 28)}
    if files and files[0][1] in shapes:
        buffer = io.BytesIO()
        np.savez(buffer, images=np.zeros(shapes[files[0][1]], np.float32))
        files = [("x.npz", buffer.getvalue())]
    labelled = io.BytesIO()
    np.savez(labelled, images=np.zeros((2, 1, 28, 28), np.float32), labels=np.array([0, 99]))
    special["label-99"] = labelled.getvalue()
    special["hostile-header"] = zip_of({"images.npy": b"\x93NUMPY\x01\x00\x14\x00{'descr': __import__"})
    files = [(name, special.get(data, data) if isinstance(data, str) else data) for name, data in files]
    before = {j.id for j in queue.list(500)}
    with pytest.raises(JobInputError) as caught:
        queue.submit(JobRequest(**request_), files)
    assert (caught.value.status, caught.value.code) == (status, code), caught.value.detail
    assert {j.id for j in queue.list(500)} == before  # nothing was queued


def test_cancel_queued_and_running(queue, request):
    # two long jobs occupy the two workers (threads); the third waits in the queue
    jobs = [queue.submit(JobRequest(type="screen", model="lenet5", dataset="mnist:test", limit=1000))
            for _ in range(3)]
    queued = queue.cancel(jobs[2].id)
    assert queued.status == JobStatus.cancelled and queued.cancel_requested
    for job in jobs[:2]:
        wait_for(queue, job.id, lambda i: i.status == JobStatus.running and i.progress.done > 0)
        queue.cancel(job.id)
    for job in jobs:
        final = wait_for(queue, job.id, timeout=30)
        assert final.status == JobStatus.cancelled, final
        assert final.progress.done < 1000 and final.error.code == "cancelled"
        with pytest.raises(JobNotReady) as caught:
            queue.result(job.id)
        assert caught.value.code == "job_cancelled"
    # cancelling a finished job changes nothing
    assert queue.cancel(jobs[0].id).status == JobStatus.cancelled
    if queue.backend == "redis":  # what the user asked for is logged as such, without rq's error traceback
        workers = request.getfixturevalue("pool").behaviour
        logs = workers.log("w1") + workers.log("w2")
        assert "cancelled on request" in logs and "JobCancelled" not in logs


def test_list_recent_jobs(queue):
    first = queue.submit(JobRequest(type="screen", model="lenet5", dataset="mnist:test", limit=10))
    second = queue.submit(JobRequest(type="least-norm", model="lenet5", dataset="mnist:test", limit=5,
                                     params={"attack": "fgm", "tol": 0.01}))
    for job in (first, second):
        assert wait_for(queue, job.id).status == JobStatus.succeeded
    ids = [j.id for j in queue.list(100)]
    assert ids.index(second.id) < ids.index(first.id)  # newest first
    assert [j.id for j in queue.list(1)] == [second.id]
    succeeded = queue.list(100, JobStatus.succeeded)
    assert {first.id, second.id} <= {j.id for j in succeeded}
    assert all(j.status == JobStatus.succeeded for j in succeeded)
    with pytest.raises(JobNotFound):
        queue.status(uuid.uuid4().hex)


def test_jobs_are_seen_only_by_their_caller_and_admins(queue):
    from service.jobs.types import Caller, key_id

    alice, bob = Caller(key_id("alice"), admin=False), Caller(key_id("bob"), admin=False)
    job = queue.submit(JobRequest(type="screen", model="lenet5", dataset="mnist:test", limit=2), caller=alice)
    assert queue.status(job.id, alice).id == job.id and queue.status(job.id).id == job.id  # the operator sees all
    for call in (queue.status, queue.result, queue.artifact, queue.cancel):
        with pytest.raises(JobNotFound):
            call(job.id, bob)
    assert job.id not in {j.id for j in queue.list(100, caller=bob)}
    assert job.id in {j.id for j in queue.list(100, caller=alice)}
    assert job.id in {j.id for j in queue.list(100, caller=Caller(key_id("carol"), admin=True))}
    assert wait_for(queue, job.id).status == JobStatus.succeeded


@pytest.mark.parametrize("job_id", ["a.b", "x y", "a:b", "\u2603", "a" * 129, ""])
def test_ids_that_cannot_name_a_job_are_unknown(queue, job_id):
    for call in (queue.status, queue.result, queue.artifact, queue.cancel):
        with pytest.raises(JobNotFound):
            call(job_id)


def test_results_expire_after_ttl(make_queue):
    queue = make_queue(jobs_result_ttl_s=2)
    info = queue.submit(JobRequest(type="screen", model="lenet5", dataset="mnist:test", limit=10))
    assert wait_for(queue, info.id).status == JobStatus.succeeded
    assert queue.result(info.id)["screened"] == 10 and queue.artifact(info.id).data
    time.sleep(2.6)
    with pytest.raises(JobNotFound):
        queue.status(info.id)
    with pytest.raises(JobNotFound):
        queue.artifact(info.id)
    assert info.id not in {j.id for j in queue.list(500)}


def test_failing_job_fails_with_reason_and_is_not_retried(queue):
    info = queue.submit(JobRequest(type="debug-crash", params={"mode": "raise"}))
    final = wait_for(queue, info.id)
    assert final.status == JobStatus.failed and final.attempts == 1
    assert final.error.code == "job_failed" and "raised on purpose" in final.error.reason
    with pytest.raises(JobNotReady) as caught:
        queue.result(info.id)
    assert caught.value.code == "job_failed"


def test_attack_job_gives_an_npz(queue):
    info = queue.submit(JobRequest(type="attack", model="lenet5", dataset="mnist:test", limit=6,
                                   params={"attack": "bim", "epsilon": 1.0, "options": {"steps": 3}}))
    assert wait_for(queue, info.id).status == JobStatus.succeeded
    artifact = queue.artifact(info.id)
    with np.load(io.BytesIO(artifact.data)) as npz:
        assert npz["adversarial"].shape == (6, 1, 28, 28)
        assert np.all(npz["perturbation_norm"] <= 1.0 + 1e-4)
        assert npz["names"].tolist()[0] == "mnist:test[0]"


def test_a_sharded_job_gives_the_unsharded_answer(make_queue):
    """Redis splits big jobs into shards that free workers run in parallel; the in-process backend never splits.
    Either way the result is the same, bad items included."""
    plain, sharded = make_queue(), make_queue(jobs_shard_size=3)
    images, labels = sample_images()
    images[2, 0, 0, 0] = np.nan  # a bad item: the shards see 7 valid images (3 + 3 + 1)
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    outputs = []
    for queue in (plain, sharded):
        for job_type, params in (("screen", {}), ("least-norm", {"attack": "fgm", "tol": 0.01}),
                                 ("attack", {"attack": "fgm", "epsilon": 1.0})):
            info = queue.submit(JobRequest(type=job_type, model="lenet5", params=params),
                                [("batch.npz", buffer.getvalue())])
            assert info.items == 8 and info.item_errors == 1
            final = wait_for(queue, info.id)
            assert final.status == JobStatus.succeeded, final.error
            assert final.progress.done == final.progress.total
            summary = queue.result(info.id)
            assert [e["index"] for e in summary["item_errors"]] == [2]
            outputs.append((job_type, summary, queue.artifact(info.id).data))
    if isinstance(sharded, RedisJobQueue):
        assert all(summary["shards"] == 3 for _, summary, _ in outputs[3:])
    for (job_type, one, data_one), (_, other, data_other) in zip(outputs[:3], outputs[3:], strict=True):
        if job_type == "attack":
            a, b = np.load(io.BytesIO(data_one)), np.load(io.BytesIO(data_other))
            assert a["names"].tolist() == b["names"].tolist() and len(a["names"]) == 7
            np.testing.assert_allclose(a["adversarial"], b["adversarial"], atol=1e-5)
            continue
        rows_one, rows_other = csv_rows(data_one), csv_rows(data_other)
        assert [r["status"] for r in rows_one] == [r["status"] for r in rows_other] == ["ok"] * 2 + ["error"] + \
            ["ok"] * 5
        assert [r["name"] for r in rows_one] == [r["name"] for r in rows_other]
        column = "score" if job_type == "screen" else "least_norm"
        np.testing.assert_allclose([float(r[column] or "nan") for r in rows_one],
                                   [float(r[column] or "nan") for r in rows_other], rtol=1e-4, equal_nan=True)
        assert one.keys() - {"shards"} == other.keys() - {"shards"}
        for key, value in one.items():
            if key not in ("timing", "shards"):
                numeric = isinstance(value, float) and not isinstance(value, bool)
                assert other[key] == (pytest.approx(value, rel=1e-4) if numeric else value), key


def test_train_detector_job_writes_a_candidate_and_activation_is_a_separate_step(models_dir, tmp_path,
                                                                                 monkeypatch):
    from service.detect.files import activate_detector, find_detector
    from service.zoo.registry import sha256_file

    folder = tmp_path / "models"
    shutil.copytree(models_dir, folder)
    monkeypatch.setenv("FISHER_GUARD_MODELS_DIR", str(folder))
    get_settings.cache_clear()
    model_cache.forget()
    active = folder / "lenet5.detector.npz"
    before = active.read_bytes()
    queue = InProcessJobQueue(queue_settings(models_dir=folder))
    try:
        info = queue.submit(JobRequest(type="train-detector", model="lenet5", params={
            "fit_dataset": "mnist:val", "fit_limit": 90, "test_fraction": 0.3, "attacks": ["fgm", "ossa"],
            "classifier": "gnb", "feature_set": "plain", "epsilons": {"fgm": 3.0}}))
        final = wait_for(queue, info.id, timeout=120)
        assert final.status == JobStatus.succeeded, final.error
        summary = queue.result(info.id)
        candidate = Path(summary["detector_path"])
        assert summary["active"] is False and candidate.parent == folder / "candidates" and candidate.is_file()
        assert summary["budgets"]["fgm"] == 3.0 and summary["budgets"]["ossa"] > 0  # given; chosen by the rule
        assert summary["test"]["rows"]["negatives"] > 0  # measured on the held-out 30%
        assert active.read_bytes() == before  # training does not touch the active detector
        artifact = queue.artifact(info.id)
        assert artifact.filename.endswith(".zip")
        with zipfile.ZipFile(io.BytesIO(artifact.data)) as zf:
            assert {candidate.name, candidate.with_suffix(".json").name, "report/report.md"} <= set(zf.namelist())
        done = activate_detector(candidate, folder / "lenet5.json", sha256_file(folder / "lenet5.pt"))
        assert done.file.read_bytes() == candidate.read_bytes()
        assert find_detector(folder, "lenet5") == folder / "lenet5.detector.json"
    finally:
        queue.close()
        get_settings.cache_clear()
        model_cache.forget()


def test_evaluate_detector_job_zips_its_report(models_dir):
    queue = InProcessJobQueue(queue_settings(models_dir=models_dir))
    try:
        info = queue.submit(JobRequest(type="evaluate-detector", model="lenet5", params={
            "images": 3, "budgets": [2.0], "effort": "quick", "parts": ["heldout", "shifts", "squeezing"],
            "heldout": ["deepfool"], "shift_images": 10, "check_images": 0}))
        final = wait_for(queue, info.id, timeout=300)
        assert final.status == JobStatus.succeeded, final.error
        summary = queue.result(info.id)
        assert summary["model"] == "lenet5" and summary["clean"]["images"] == 3
        with zipfile.ZipFile(io.BytesIO(queue.artifact(info.id).data)) as zf:
            assert {"report.md", "results.json"} <= set(zf.namelist())
            assert "## Held-out attacks" in zf.read("report.md").decode()
    finally:
        queue.close()


# --------------------------------------------------------------------------------- Redis only: crashes

def live_workers(workers: Workers) -> list[str]:
    return [name for name, proc in workers.procs.items() if proc.poll() is None]


def test_worker_killed_mid_job_the_job_completes_elsewhere(redis_url, pool):
    workers = pool.crash
    workers.wait_ready(*live_workers(workers))
    queue = RedisJobQueue(redis_url, queue_settings(redis_url=redis_url, jobs_queue=workers.queue,
                                                    jobs_max_attempts=3))
    try:
        request = JobRequest(type="screen", model="lenet5", dataset="mnist:test", limit=300)
        clean = queue.submit(request)
        assert wait_for(queue, clean.id).status == JobStatus.succeeded
        expected = queue.artifact(clean.id).data

        job = queue.submit(request)
        running = wait_for(queue, job.id, lambda i: i.status == JobStatus.running and i.progress.done >= BATCH)
        assert running.progress.done < 300, "the job finished before it could be killed"
        victim = running.worker
        workers.kill(victim)
        killed_at = time.monotonic()
        again = wait_for(queue, job.id, lambda i: i.attempts == 2 or i.status.finished, timeout=60)
        # picked up again within the lease and a maintenance pass (plus slack for a busy machine)
        assert time.monotonic() - killed_at < LEASE_S + 2 * HEARTBEAT_S + 10, again
        final = wait_for(queue, job.id, timeout=60)
        assert final.status == JobStatus.succeeded, (final, [workers.log(n) for n in workers.procs])
        assert final.attempts == 2 and final.worker != victim
        assert queue.artifact(job.id).data == expected  # same bytes as the uninterrupted run
        strip = lambda s: {k: v for k, v in s.items() if k != "timing"}  # noqa: E731
        assert strip(queue.result(job.id)) == strip(queue.result(clean.id))
    finally:
        queue.close()


def test_a_job_that_keeps_killing_workers_ends_failed(redis_url, pool):
    workers = pool.crash
    alive = live_workers(workers)
    assert len(alive) >= 3, "the poison job kills two workers; a third marks it failed"
    workers.wait_ready(*alive)
    queue = RedisJobQueue(redis_url, queue_settings(redis_url=redis_url, jobs_queue=workers.queue,
                                                    jobs_max_attempts=2))
    try:
        info = queue.submit(JobRequest(type="debug-crash", params={"mode": "kill"}))
        final = wait_for(queue, info.id, timeout=60)
        assert final.status == JobStatus.failed and final.attempts == 2, final
        assert final.error.code == "worker_lost" and "2 attempt" in final.error.reason
        assert len(live_workers(workers)) == len(alive) - 2  # each attempt took a worker down
    finally:
        queue.close()


def test_redis_down_means_queue_unavailable(models_dir):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    queue = RedisJobQueue(url, queue_settings(redis_url=url))
    for call in (lambda: queue.submit(JobRequest(type="screen", model="lenet5", dataset="mnist:test", limit=5)),
                 lambda: queue.list(), lambda: queue.status("x"), lambda: queue.ping()):
        with pytest.raises(QueueUnavailable) as caught:
            call()
        assert caught.value.status == 503 and "unreachable" in caught.value.detail


