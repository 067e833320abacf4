"""The job HTTP router through the app, on each backend: submission forms, limits, Redis down or missing
(fixtures: tests/jobs_support.py)."""

from __future__ import annotations

import time
import uuid

import numpy as np
from jobs_support import (
    csv_rows,
    queue_settings,
    sample_images,
)
from support import free_port, png, zip_of

from service.config import Settings
from service.jobs.redis_queue import RedisJobQueue

pytest_plugins = ["jobs_support"]  # its fixtures: models_dir, pool, make_queue, queue

# ---------------------------------------------------------------------------------------------- HTTP

def api_client(settings: Settings):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    return TestClient(create_app(settings))


def wait_ready(client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "the app did not become ready"
        time.sleep(0.1)


def http_wait(client, url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(url).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_http_jobs_need_redis_with_several_api_processes(models_dir):
    """With workers > 1 and no Redis, a job taken by one process would be unknown to the others (404 on its
    status): the job endpoints refuse with 503 and say what to set, and nothing is accepted."""
    with api_client(queue_settings(models_dir=models_dir, workers=2)) as client:
        response = client.post("/v1/jobs", json={"type": "screen", "model": "lenet5", "dataset": "mnist:test",
                                                 "limit": 4})
        assert response.status_code == 503 and response.headers["retry-after"]
        body = response.json()
        assert body["code"] == "queue_unavailable" and "FISHER_GUARD_REDIS_URL" in body["detail"]
        assert client.get("/v1/jobs").status_code == 503
        assert client.get(f"/v1/jobs/{uuid.uuid4().hex}").json()["code"] == "queue_unavailable"
        assert client.get("/health/live").status_code == 200


def test_http_jobs_in_process(models_dir):
    with api_client(queue_settings(models_dir=models_dir)) as client:
        response = client.post("/v1/jobs", json={"type": "screen", "model": "lenet5", "dataset": "mnist:test",
                                                 "limit": 8})
        assert response.status_code == 202, response.text
        job = response.json()
        assert response.headers["location"] == job["status_url"] == f"/v1/jobs/{job['id']}"
        assert http_wait(client, job["status_url"])["status"] == "succeeded"
        result = client.get(job["result_url"]).json()
        assert result["summary"]["screened"] == 8 and result["job"]["artifact_url"]
        artifact = client.get(result["job"]["artifact_url"])
        assert artifact.status_code == 200 and artifact.headers["content-type"].startswith("text/csv")
        assert "attachment" in artifact.headers["content-disposition"]
        # a job and a request give the same answer
        wait_ready(client)
        images = sample_images()[0]
        sync = client.post("/v1/models/lenet5/screen", json={"tensor": images.tolist()})
        assert sync.status_code == 200, sync.text
        scores = [item["score"] for item in sync.json()["results"]]
        np.testing.assert_allclose([float(r["score"]) for r in csv_rows(artifact.content)], scores, rtol=1e-5)
        listed = client.get("/v1/jobs", params={"limit": 5}).json()["jobs"]
        assert listed[0]["id"] == job["id"]
        assert client.delete(job["status_url"]).json()["status"] == "succeeded"  # nothing left to cancel

        # multipart with files; a running job has no result yet (409); cancel through POST
        response = client.post("/v1/jobs", data={"type": "screen", "model": "lenet5", "params": '{"k": 3}'},
                               files=[("files", ("a.png", png(images[0]), "image/png")),
                                      ("files", ("b.png", png(images[1]), "image/png"))])
        assert response.status_code == 202, response.text
        assert http_wait(client, response.json()["status_url"])["items"] == 2
        long = client.post("/v1/jobs", json={"type": "screen", "model": "lenet5", "dataset": "mnist:test"}).json()
        early = client.get(long["result_url"])
        assert early.status_code == 409 and early.headers["content-type"] == "application/problem+json"
        assert client.post(f"{long['status_url']}/cancel").status_code == 202
        assert http_wait(client, long["status_url"])["status"] == "cancelled"

        # refusals are problem documents
        bad = client.post("/v1/jobs", data={"type": "screen", "model": "lenet5"},
                          files={"files": ("x.zip", zip_of({"../up.png": png(images[0])}), "application/zip")})
        assert bad.status_code == 400 and bad.json()["code"] == "unsafe_archive"
        assert client.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        assert client.post("/v1/jobs", json={"type": "screen", "bogus": 1}).status_code == 422
        missing = client.get(f"/v1/jobs/{uuid.uuid4().hex}")
        assert missing.status_code == 404 and missing.json()["code"] == "job_not_found"


def test_http_jobs_through_each_backend(make_queue, models_dir):
    queue = make_queue()
    redis_backend = isinstance(queue, RedisJobQueue)
    with api_client(queue.settings.model_copy(update={"models_dir": models_dir})) as client:
        response = client.post("/v1/jobs", json={"type": "screen", "model": "lenet5", "dataset": "mnist:test",
                                                 "limit": 60})
        assert response.status_code == 202, response.text
        final = http_wait(client, response.json()["status_url"])
        assert final["status"] == "succeeded"
        assert final["worker"] in (("w1", "w2") if redis_backend else ("in-process",))
        assert client.get(final["artifact_url"]).content.count(b"\n") == 61


def test_http_redis_down_is_503_and_sync_endpoints_keep_working(models_dir):
    url = f"redis://127.0.0.1:{free_port()}/0"
    with api_client(queue_settings(models_dir=models_dir, redis_url=url)) as client:
        for response in (client.post("/v1/jobs", json={"type": "screen", "model": "lenet5", "dataset": "mnist:test"}),
                         client.get("/v1/jobs"), client.get(f"/v1/jobs/{uuid.uuid4().hex}")):
            assert response.status_code == 503, response.text
            body = response.json()
            assert response.headers["content-type"] == "application/problem+json"
            assert body["code"] == "queue_unavailable" and "unreachable" in body["detail"]
        wait_ready(client)
        sync = client.post("/v1/models/lenet5/screen", json={"tensor": sample_images()[0][:2].tolist()})
        assert sync.status_code == 200, sync.text


def test_job_uploads_have_their_own_body_limit(models_dir):
    """An archive over the synchronous endpoints' body limit is still accepted by /v1/jobs (jobs_max_upload_mb),
    while the same bytes sent to a synchronous endpoint get 413."""
    images = sample_images()[0]
    archive = np.random.default_rng(0).bytes(4096)  # incompressible padding member keeps the zip over 2 KiB
    body = zip_of({"a.png": png(images[0]), "b.png": png(images[1]), "padding.bin": archive})
    assert len(body) > 2048
    settings = queue_settings(models_dir=models_dir, max_payload_bytes=2048, jobs_max_upload_mb=1)
    with api_client(settings) as client:
        sync = client.post("/v1/models/lenet5/screen/upload", files=[("files", ("a.zip", body, "application/zip"))])
        assert sync.status_code == 413 and sync.json()["code"] == "payload_too_large"
        job = client.post("/v1/jobs", data={"type": "screen", "model": "lenet5"},
                          files=[("files", ("batch.zip", body, "application/zip"))])
        assert job.status_code != 413, job.text
        assert job.status_code in (202, 422), job.text  # accepted, or refused for its content, not its size
