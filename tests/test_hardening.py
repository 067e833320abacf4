"""Bad input over real HTTP against `fisher-guard serve` on the Redis backend (a real redis-server, a real
`fisher-guard worker`): job ids, hostile array headers, deep JSON, model names that are files, images of the wrong
size, submissions that time out, formula injection in artifacts, jobs owned by their key, a worker that loses
Redis, and a schema-driven fuzz run of the job routes that must find no server error."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import time
import urllib.parse
import uuid
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from conftest import start_redis
from support import png, zip_of
from test_e2e import MODEL, free_port, start_server, stop_server

FISHER_GUARD = Path(sys.executable).with_name("fisher-guard")
KEY_A, KEY_B, ADMIN = "key-a-" + "1" * 16, "key-b-" + "2" * 16, "admin-" + "3" * 16
BAD_IDS = ["a.b", "x y", "\u2603", "a:b", "'", "a" * 129, "a..b", "%00", "a\\b"]


def npy_header(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    """A valid .npy v1.0 header declaring `shape` (no data after it)."""
    text = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}"
    pad = 64 - (10 + len(text) + 1) % 64
    body = (text + " " * pad + "\n").encode()
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body




def png_head(width: int, height: int) -> bytes:
    """A PNG declaring width x height (IHDR) whose pixel data (IDAT) is junk: decoding it would fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib data") + chunk(b"IEND", b"")




def digit() -> np.ndarray:
    from service.data.mnist import load_mnist

    return load_mnist("test")[0][0, 0].numpy()


@pytest.fixture(scope="module")
def queue_name() -> str:
    return f"fg-hardening-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def server(api_models_dir, redis_url, queue_name, tmp_path_factory):
    """The API on the Redis backend, without keys; one `fisher-guard worker` serves its queue."""
    logs = tmp_path_factory.mktemp("hardening")
    env = {"FISHER_GUARD_REDIS_URL": redis_url, "FISHER_GUARD_JOBS_QUEUE": queue_name,
           "FISHER_GUARD_JOBS_MAX_ITEMS": "64", "FISHER_GUARD_JOBS_SHARD_SIZE": "0"}
    worker_env = {**os.environ, **env, "FISHER_GUARD_MODELS_DIR": str(api_models_dir), "FISHER_GUARD_DEVICE": "cpu"}
    with open(logs / "worker.log", "wb") as out:
        worker = subprocess.Popen([str(FISHER_GUARD), "worker", "--threads", "1"], env=worker_env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    base, process = start_server(api_models_dir, logs / "server.log", **env)
    yield base
    stop_server(process)
    worker.terminate()
    worker.wait(30)


@pytest.fixture(scope="module")
def keys_server(api_models_dir, redis_url, queue_name, tmp_path_factory):
    """The API on the Redis backend with API keys KEY_A and KEY_B and the admin key ADMIN."""
    log = tmp_path_factory.mktemp("keys") / "server.log"
    base, process = start_server(api_models_dir, log, FISHER_GUARD_REDIS_URL=redis_url,
                                 FISHER_GUARD_JOBS_QUEUE=queue_name, FISHER_GUARD_API_KEYS=f"{KEY_A},{KEY_B}",
                                 FISHER_GUARD_ADMIN_API_KEYS=ADMIN)
    yield base
    stop_server(process)


@pytest.fixture(scope="module")
def base(server) -> str:
    return server


def wait_job(base: str, job_id: str, headers: dict | None = None, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
        if info["status"] in ("succeeded", "failed", "cancelled"):
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.1)


# ---- 1. job ids outside [A-Za-z0-9_-] are unknown jobs (404), on every job route ----

@pytest.mark.parametrize("job_id", BAD_IDS)
def test_bad_job_ids_are_404_on_every_route(base, job_id):
    quoted = f"{base}/v1/jobs/{urllib.parse.quote(job_id, safe='')}"
    for method, suffix in [("GET", ""), ("DELETE", ""), ("GET", "/result"), ("GET", "/artifact"),
                           ("POST", "/cancel")]:
        response = httpx.request(method, f"{quoted}{suffix}", timeout=30)
        assert response.status_code == 404, (method, suffix, response.status_code, response.text)
        assert response.json()["code"] in ("job_not_found", "not_found"), response.text


# ---- 2. declared array sizes are checked against the payload before anything is allocated ----

def test_npy_that_declares_a_huge_shape_is_refused(base):
    for data in (npy_header((256, 1, 4096, 4096)), npy_header((2, 1, 28, 28)) + b"\0" * 100,
                 npy_header((10**12,), "<f4")):
        response = httpx.post(f"{base}/v1/models/{MODEL}/screen/upload",
                              files={"files": ("x.npy", data, "application/octet-stream")}, timeout=30)
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["code"] in ("image_too_large", "corrupt_npy"), response.text


def test_npz_member_that_declares_a_huge_shape_is_refused(base):
    hostile = zip_of({"images.npy": npy_header((256, 1, 4096, 4096))})
    lying = zip_of({"images.npy": npy_header((4, 1, 28, 28)) + b"\0" * 64})
    for data in (hostile, lying):
        response = httpx.post(f"{base}/v1/jobs", data={"type": "screen", "model": MODEL},
                              files={"files": ("x.npz", data, "application/octet-stream")}, timeout=30)
        assert response.status_code in (400, 413), response.text
        assert response.json()["code"] in ("corrupt_archive", "upload_too_large"), response.text


def test_read_npz_equals_numpy_and_never_reads_objects():
    from service.data.arrays import ArrayFileError, read_npy, read_npz

    rng = np.random.default_rng(0)
    arrays = {"images": rng.random((3, 1, 5, 5)).astype(np.float32), "labels": np.arange(3),
              "fortran": np.asfortranarray(rng.random((4, 6)))}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    got = read_npz(buffer.getvalue(), 10**6, 10**7)
    for name, value in arrays.items():
        np.testing.assert_array_equal(got[name], value)
    one = io.BytesIO()
    np.save(one, arrays["fortran"])
    np.testing.assert_array_equal(read_npy(one.getvalue(), 10**6), arrays["fortran"])
    objects = io.BytesIO()
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ArrayFileError, match="objects"):
        read_npy(objects.getvalue(), 10**6)
    with pytest.raises(ArrayFileError, match="limit"):
        read_npz(buffer.getvalue(), 10, 10**7)


# ---- 3. deep JSON is a 4xx ----

def test_deep_json_is_refused(base):
    deep = b"[" * 10_000 + b"]" * 10_000
    response = httpx.post(f"{base}/v1/jobs", content=b'{"type": "screen", "params": {"a": ' + deep + b"}}",
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and response.json()["code"] == "invalid_json", response.text
    nested: object = 1
    for _ in range(100):
        nested = {"a": nested}
    response = httpx.post(f"{base}/v1/jobs", json={"type": "screen", "model": MODEL, "params": {"k": nested}},
                          timeout=30)
    assert response.status_code == 422 and "deeper" in response.json()["detail"], response.text
    response = httpx.post(f"{base}/v1/models/{MODEL}/screen", content=b'{"tensor": ' + deep + b"}",
                          headers={"content-type": "application/json"}, timeout=30)
    assert 400 <= response.status_code < 500, response.text


# ---- 4. a job's model resolves only through the registry ----

def test_a_model_name_that_is_a_file_is_not_read(base):
    for name in ("Dockerfile", "pyproject.toml", "models/lenet5.json", "./README.md"):
        response = httpx.post(f"{base}/v1/jobs", json={"type": "screen", "model": name, "dataset": "mnist:test"},
                              timeout=30)
        assert response.status_code == 422 and response.json()["code"] == "unknown_model", response.text
        detail = response.json()["detail"]
        assert "FROM " not in detail and "[project]" not in detail and "fisher-guard" not in detail.split("known")[0]


# ---- 5. refused images cost no decoding; a submission that times out creates no job ----

def test_an_image_of_another_size_is_refused_from_its_header():
    from service.data.images import ImageInputError, InputLimits, decode_image

    with pytest.raises(ImageInputError) as refused:
        decode_image(png_head(4096, 4096), (1, 28, 28), InputLimits())
    assert refused.value.code == "wrong_shape"  # decoding it would have failed as corrupt: it was not decoded
    with pytest.raises(ImageInputError) as decoded:
        decode_image(png_head(28, 28), (1, 28, 28), InputLimits())
    assert decoded.value.code == "corrupt_image"


def test_a_zip_of_large_images_is_refused_item_by_item_from_the_headers(base):
    members = {f"big{i}.png": png_head(4096, 4096) for i in range(8)} | {"ok.png": png(digit())}
    response = httpx.post(f"{base}/v1/jobs", data={"type": "screen", "model": MODEL},
                          files={"files": ("x.zip", zip_of(members), "application/zip")}, timeout=30)
    assert response.status_code == 202, response.text
    info = wait_job(base, response.json()["id"])
    assert info["status"] == "succeeded" and info["item_errors"] == 8, info
    summary = httpx.get(f"{base}/v1/jobs/{info['id']}/result", timeout=30).json()["summary"]
    reasons = [e["reason"] for e in summary["item_errors"]]
    assert all(r.startswith("wrong_shape") for r in reasons), reasons


def test_a_submission_that_times_out_creates_no_job(api_models_dir, redis_url, tmp_path):
    """With a request timeout far below what checking a 64-image zip takes, every answer is 202 (the job
    exists) or 504 (no job exists, once the server settles): the jobs in Redis are exactly the 202s."""
    queue = f"fg-timeout-{uuid.uuid4().hex[:8]}"
    base, process = start_server(api_models_dir, tmp_path / "server.log", FISHER_GUARD_REDIS_URL=redis_url,
                                 FISHER_GUARD_JOBS_QUEUE=queue, FISHER_GUARD_REQUEST_TIMEOUT_S="0.02",
                                 FISHER_GUARD_JOBS_MAX_ITEMS="64")
    try:
        upload = zip_of({f"d{i}.png": png(np.roll(digit(), i, axis=1)) for i in range(64)})
        accepted, timed_out = set(), 0
        for _ in range(12):
            response = httpx.post(f"{base}/v1/jobs", data={"type": "screen", "model": MODEL},
                                  files={"files": ("x.zip", upload, "application/zip")}, timeout=60)
            assert response.status_code in (202, 504), response.text
            if response.status_code == 202:
                accepted.add(response.json()["id"])
            else:
                timed_out += 1
        assert timed_out > 0
        client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 60
        while True:
            listed = {m.decode() for m in client.zrange(f"{queue}:jobs", 0, -1)}
            stored = {k.decode().removeprefix("rq:job:") for k in client.scan_iter("rq:job:*", _type="hash")
                      if client.hget(k, "origin") == queue.encode()}
            if listed == accepted and stored == accepted:
                break
            assert time.monotonic() < deadline, (listed - accepted, stored - accepted)
            time.sleep(0.1)
    finally:
        stop_server(process)


def test_large_json_bodies_are_parsed_off_the_event_loop(monkeypatch, api_models_dir):
    """The JSON parser runs in another thread than the event loop for a large body, inline for a small one."""
    import threading

    from fastapi.testclient import TestClient

    from service.api import json_body
    from service.api.app import create_app
    from service.config import Settings

    threads: list[int] = []
    real = json_body.parse_json
    monkeypatch.setattr(json_body, "parse_json", lambda body: threads.append(threading.get_ident()) or real(body))
    app = create_app(Settings(models_dir=api_models_dir, serve_models=[MODEL], device="cpu"))
    image = digit().tolist()
    with TestClient(app) as client:
        loop_thread = client.portal.call(threading.get_ident)
        while not client.get("/health/ready").status_code == 200:
            time.sleep(0.1)
        small = client.post(f"/v1/models/{MODEL}/screen", json={"tensor": image})
        large = client.post(f"/v1/models/{MODEL}/screen", json={"tensor": [[image]] * 40})
    assert small.status_code == 200 and large.status_code == 200, large.text
    assert threads[0] == loop_thread and threads[1] != loop_thread


# ---- 6. artifact cells that a spreadsheet would run are quoted ----

def test_artifact_cells_cannot_be_formulas(base):
    names = ["=HYPERLINK(1).png", "+cmd.png", "-2+3.png", "@sum.png"]
    files = [("files", (name, png(np.roll(digit(), i, axis=0)), "image/png")) for i, name in enumerate(names)]
    files.append(("files", ("\t=x.png", b"GIF89a", "image/png")))  # a bad item: its name and reason go in a row too
    response = httpx.post(f"{base}/v1/jobs", data={"type": "screen", "model": MODEL}, files=files, timeout=30)
    assert response.status_code == 202, response.text
    info = wait_job(base, response.json()["id"])
    assert info["status"] == "succeeded", info
    import csv

    rows = list(csv.DictReader(io.StringIO(httpx.get(f"{base}/v1/jobs/{info['id']}/artifact").text)))
    assert len(rows) == 5
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "@", "\t", "\r")), row
            assert not value.startswith("-") or float(value) <= 0, row
    assert {row["name"] for row in rows} >= {"'=HYPERLINK(1).png", "'+cmd.png", "'-2+3.png", "'@sum.png"}


# ---- 7. jobs belong to the key that submitted them; admin keys see all ----

def test_jobs_belong_to_their_key(keys_server):
    base = keys_server
    a, b, admin = ({"X-API-Key": k} for k in (KEY_A, KEY_B, ADMIN))
    job = httpx.post(f"{base}/v1/jobs", json={"type": "screen", "model": MODEL, "dataset": "mnist:test",
                                             "limit": 2}, headers=a, timeout=30)
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    assert httpx.get(f"{base}/v1/jobs/{job_id}", headers=a).status_code == 200
    for method, suffix in [("GET", ""), ("GET", "/result"), ("GET", "/artifact"), ("DELETE", ""),
                           ("POST", "/cancel")]:
        response = httpx.request(method, f"{base}/v1/jobs/{job_id}{suffix}", headers=b)
        assert response.status_code == 404, (method, suffix, response.text)
    assert job_id not in {j["id"] for j in httpx.get(f"{base}/v1/jobs", headers=b).json()["jobs"]}
    assert job_id in {j["id"] for j in httpx.get(f"{base}/v1/jobs", headers=a).json()["jobs"]}
    assert job_id in {j["id"] for j in httpx.get(f"{base}/v1/jobs", headers={"Authorization": f"Bearer {ADMIN}"},
                                                 timeout=30).json()["jobs"]}
    assert httpx.get(f"{base}/v1/jobs/{job_id}", headers=admin).status_code == 200
    assert httpx.get(f"{base}/v1/jobs", headers={"X-API-Key": "wrong"}).status_code == 401
    assert httpx.post(f"{base}/v1/jobs/{job_id}/cancel", headers=admin).status_code == 202


# ---- 8. a worker that loses Redis comes back when Redis does ----

def test_a_worker_reconnects_after_redis_restarts(api_models_dir, tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port)
    queue = f"fg-reconnect-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "FISHER_GUARD_REDIS_URL": url, "FISHER_GUARD_JOBS_QUEUE": queue, "FISHER_GUARD_DEVICE": "cpu",
           "FISHER_GUARD_MODELS_DIR": str(api_models_dir), "FISHER_GUARD_JOBS_HEARTBEAT_S": "1",
           "FISHER_GUARD_JOBS_RECONNECT_MAX_S": "2", "FISHER_GUARD_LOG_FORMAT": "text"}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([str(FISHER_GUARD), "worker", "--threads", "1"], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from rq import Queue, Worker

        def registered() -> bool:
            try:
                return bool(Worker.all(queue=Queue(queue, connection=redis.Redis.from_url(url))))
            except redis.ConnectionError:
                return False

        def until(condition, what: str, timeout: float = 90) -> None:
            deadline = time.monotonic() + timeout
            while not condition():
                assert worker.poll() is None, f"the worker exited:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"{what}:\n{log.read_text()[-3000:]}"
                time.sleep(0.1)

        until(registered, "the worker did not register")
        server.terminate()
        server.wait(10)
        until(lambda: "starting again" in log.read_text() or "could not connect" in log.read_text(),
              "the worker did not notice that Redis went away")
        server = start_redis(port)  # an empty Redis (no persistence here): the worker's registration is gone too
        from service.config import Settings
        from service.jobs.redis_queue import RedisJobQueue
        from service.jobs.types import JobRequest

        jobs = RedisJobQueue(url, Settings(redis_url=url, jobs_queue=queue, models_dir=api_models_dir))
        info = jobs.submit(JobRequest(type="screen", model=MODEL, dataset="mnist:test", limit=2))
        until(lambda: jobs.status(info.id).status.value == "succeeded", "the job did not run after the restart")
        assert worker.poll() is None
    finally:
        worker.terminate()
        worker.wait(30)
        server.terminate()
        server.wait(10)


# ---- 10. schema-driven fuzzing of the job routes on the Redis backend ----

def test_schemathesis_finds_no_server_error_on_the_redis_backed_job_routes(base, tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st is not None, "schemathesis is a development dependency (requirements-dev.lock)"
    command = [st, "run", f"{base}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "30",
               "--phases", "examples,coverage,fuzzing", "--max-time", "40", "--workers", "1", "--no-color",
               "--suppress-health-check", "all", "--include-path-regex", "^/v1/jobs", "--seed", "2",
               "--generation-database", "none", "--request-timeout", "30"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]


def test_a_full_redis_refuses_jobs_with_503_and_loses_none(api_models_dir):
    """With maxmemory and noeviction (as docker-compose.yml runs Redis), a full queue refuses new jobs with
    QueueUnavailable (503) instead of a server error, and every job it accepted is still there."""
    from service.config import Settings
    from service.jobs.redis_queue import RedisJobQueue
    from service.jobs.types import JobRequest, QueueUnavailable

    port = free_port()
    server = start_redis(port, "--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    url = f"redis://127.0.0.1:{port}/0"
    try:
        jobs = RedisJobQueue(url, Settings(redis_url=url, jobs_queue="fg-full", models_dir=api_models_dir,
                                           jobs_shard_size=0))
        rng = np.random.default_rng(0)
        accepted = []
        with pytest.raises(QueueUnavailable, match="full"):
            for _ in range(200):  # each upload is ~0.5 MB of incompressible pixels
                buffer = io.BytesIO()
                np.savez(buffer, images=rng.random((160, 1, 28, 28)).astype(np.float32))
                accepted.append(jobs.submit(JobRequest(type="attack", model=MODEL),
                                            [("x.npz", buffer.getvalue())]).id)
        assert accepted, "the first jobs fit"
        assert {job.id for job in jobs.list(500)} == set(accepted)
    finally:
        server.terminate()
        server.wait(10)
