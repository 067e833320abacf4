"""End to end: `fisher-guard serve` (uvicorn) as a real process on a free port, called over HTTP: real MNIST PNG
uploads (one and a batch), a schema-driven fuzz run (schemathesis) that must find no server error, and a
graceful shutdown that finishes the request in flight."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from support import free_port, png

from service.data.mnist import load_mnist
from service.zoo.registry import sha256_file

REPO = Path(__file__).resolve().parent.parent
MODEL = "lenet5"






def start_server(models_dir: Path, log: Path, *args: str, **env: str) -> tuple[str, subprocess.Popen]:
    """`fisher-guard serve` on a free port (extra CLI args and FISHER_GUARD_* variables; API keys only when
    given here), once /health/ready answers 200; returns (base URL, process)."""
    port = free_port()
    keys = ("FISHER_GUARD_API_KEYS", "FISHER_GUARD_ADMIN_API_KEYS")
    inherited = {k: v for k, v in os.environ.items() if k not in keys}
    env = {**inherited, "FISHER_GUARD_MODELS_DIR": str(models_dir), "FISHER_GUARD_SERVE_MODELS": MODEL,
           "FISHER_GUARD_DEVICE": "cpu", "FISHER_GUARD_MAX_ATTACK_STEPS": "5000", "FISHER_GUARD_LOG_LEVEL": "info",
           **env}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                                    "--threads", "1", *args], cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                return base, process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the server did not become ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def server(api_models_dir, tmp_path_factory):
    """The service in its own process; yields (base URL, process, log). Stopped with SIGTERM at the end."""
    log = tmp_path_factory.mktemp("e2e") / "server.log"
    base, process = start_server(api_models_dir, log)
    yield base, process, log
    stop_server(process)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist("test")
    return images[:16].numpy(), labels[:16].numpy()


def test_upload_one_mnist_png(server, digits, api_models_dir):
    base, _, _ = server
    images, labels = digits
    response = httpx.post(f"{base}/v1/models/{MODEL}/screen/upload",
                          files={"files": ("digit.png", png(images[0]), "image/png")}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == MODEL and body["sha256"] == sha256_file(api_models_dir / "lenet5.pt")
    result = body["results"][0]
    assert result["prediction"] == int(labels[0]) and 0.0 <= result["score"] <= 1.0
    assert isinstance(result["adversarial"], bool) and len(result["eigenvalues"]) >= 9
    assert response.headers["x-request-id"]


def test_upload_a_batch(server, digits):
    base, _, _ = server
    images, labels = digits
    files = [("files", (f"d{i}.png", png(images[i]), "image/png")) for i in range(len(images))]
    body = httpx.post(f"{base}/v1/models/{MODEL}/screen/upload", files=files, timeout=60).json()
    predictions = np.array([r["prediction"] for r in body["results"]])
    assert len(predictions) == len(labels) and (predictions == labels).mean() >= 0.85
    spectrum = httpx.post(f"{base}/v1/models/{MODEL}/spectrum", json={"tensor": images[:4].tolist(), "k": 9},
                          timeout=60).json()
    for item, label in zip(spectrum["results"], labels[:4], strict=True):
        assert item["prediction"] == label and all(v > 0 for v in item["eigenvalues"])
    attack = httpx.post(f"{base}/v1/models/{MODEL}/attack", json={"tensor": images[:2].tolist(), "epsilon": 3.0},
                        timeout=60).json()
    assert all(r["perturbation_norm"] <= 3.0 + 1e-4 for r in attack["results"])


def test_problem_documents_over_http(server):
    base, _, _ = server
    response = httpx.post(f"{base}/v1/models/{MODEL}/screen/upload", files={"files": ("x.png", b"GIF89a...")})
    assert response.status_code == 415 and response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "unsupported_format"
    metrics = httpx.get(f"{base}/metrics").text
    assert 'fisher_guard_images_screened_total{model="lenet5"}' in metrics


def test_schemathesis_finds_no_server_error(server, tmp_path):
    """Schema-driven fuzzing of every operation of this API (the jobs routes are another suite's), bounded in
    examples and time: no answer is a 5xx, and every status, media type and body is the one the schema
    documents. One schemathesis worker: with several threads, hypothesis trips a CPython 3.11 `ast` SystemError."""
    base, _, _ = server
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    command = [st, "run", f"{base}/openapi.json", "--checks", checks, "--max-examples", "5",
               "--phases", "examples,coverage,fuzzing", "--max-time", "20", "--workers", "1", "--no-color",
               "--suppress-health-check", "all", "--exclude-path-regex", "^/v1/jobs", "--seed", "1",
               "--generation-database", "none", "--request-timeout", "30"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert "passed" in run.stdout


def test_requests_whose_clients_left_are_not_computed(server, digits):
    """While an attack holds the model, 4 clients send a screen request and hang up, a fifth hangs up mid-body:
    all are logged as 499, none reaches the model (no screen batch runs for them), the queue count falls back to
    0, and the server goes on answering."""
    base, _, _ = server
    metrics = lambda: httpx.get(f"{base}/metrics").text  # noqa: E731
    screen = "/v1/models/{model}/screen"
    before = metrics()
    busy = threading.Thread(target=lambda: httpx.post(f"{base}/v1/models/{MODEL}/attack", timeout=60, json={
        "tensor": digits[0][:1].tolist(), "attack": "iterative-ossa", "steps": 1000, "step_size": 0.001}))
    busy.start()
    deadline = time.monotonic() + 10
    while metric_value(metrics(), "fisher_guard_images_in_flight", model=MODEL) < 1:  # the attack holds the model
        assert time.monotonic() < deadline, "the attack did not start"
        time.sleep(0.02)
    body = json.dumps({"tensor": digits[0][:1].tolist()}).encode()
    host, port = base.removeprefix("http://").split(":")
    request = (f"POST /v1/models/{MODEL}/screen HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    clients = [socket.create_connection((host, int(port))) for _ in range(5)]
    for client in clients[:4]:
        client.sendall(request)
    clients[4].sendall(request[:-10])  # the fifth leaves before its body is complete
    time.sleep(0.3)
    for client in clients:
        client.close()
    busy.join(60)
    deadline = time.monotonic() + 10
    while metric_value(metrics(), "fisher_guard_requests_total", endpoint=screen, status="499") - \
            metric_value(before, "fisher_guard_requests_total", endpoint=screen, status="499") < 5:
        assert time.monotonic() < deadline, "the 5 abandoned requests were not recorded as 499"
        time.sleep(0.1)
    after = metrics()
    batches = "fisher_guard_batch_size_images_count"
    assert metric_value(after, batches, model=MODEL, kind="screen") == metric_value(before, batches, model=MODEL,
                                                                                     kind="screen")
    assert metric_value(after, "fisher_guard_images_in_flight", model=MODEL) == 0
    assert httpx.post(f"{base}/v1/models/{MODEL}/screen", json={"tensor": digits[0][:1].tolist()}).status_code == 200


def test_graceful_shutdown_finishes_the_request_in_flight(server, digits):
    """SIGTERM while a slow request runs: the request still gets its answer, then the process shuts down cleanly."""
    base, process, log = server
    answer: dict[str, httpx.Response] = {}

    def slow_request() -> None:
        answer["response"] = httpx.post(f"{base}/v1/models/{MODEL}/attack", timeout=60, json={
            "tensor": digits[0][:1].tolist(), "attack": "iterative-ossa", "steps": 150, "step_size": 0.01})

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    thread.join(timeout=60)
    assert answer["response"].status_code == 200, answer["response"].text
    # uvicorn re-raises the signal after its clean shutdown, so the exit status says SIGTERM
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert "Application shutdown complete" in text and "Finished server process" in text


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            found = dict(re.findall(r'(\w+)="([^"]*)"', head))
            if head.split("{")[0] == name and all(found.get(k) == v for k, v in labels.items()):
                return float(value)
    return 0.0


def test_metrics_add_up_over_worker_processes(api_models_dir, digits, tmp_path):
    """`--workers 2`: each scrape of /metrics, whichever process takes it, counts the requests of both processes;
    the processes, readiness and images in flight combine as their gauges say; the live gauges are dropped at
    exit. Without Redis the job endpoints refuse (503) rather than keep a job in one process."""
    shared = tmp_path / "metrics"
    base, process = start_server(api_models_dir, tmp_path / "server.log", "--workers", "2",
                                 FISHER_GUARD_METRICS_MULTIPROC_DIR=str(shared))
    try:
        # /health/ready was answered by one process: wait for both. Readiness is the minimum over the processes
        # that have started (each writes ready=0 as it starts), so it means both only once both have started.
        deadline = time.monotonic() + 180
        while True:
            text = httpx.get(f"{base}/metrics", headers={"Connection": "close"}).text
            if metric_value(text, "fisher_guard_processes") == 2 and metric_value(text, "fisher_guard_ready") == 1:
                break
            assert time.monotonic() < deadline, "both worker processes did not become ready"
            time.sleep(0.5)
        images = digits[0]
        sent = 24
        for i in range(sent):  # a new connection each: the processes share the listening socket
            response = httpx.post(f"{base}/v1/models/{MODEL}/screen", json={"tensor": images[i % 16].tolist()},
                                  timeout=30, headers={"Connection": "close"})
            assert response.status_code == 200, response.text
        assert len({path.name.split("_")[-1] for path in shared.glob("counter_*.db")}) == 2
        for _ in range(6):
            text = httpx.get(f"{base}/metrics", headers={"Connection": "close"}).text
            assert metric_value(text, "fisher_guard_images_screened_total", model=MODEL) == sent
            assert metric_value(text, "fisher_guard_requests_total", endpoint="/v1/models/{model}/screen",
                                status="200") == sent
            assert metric_value(text, "fisher_guard_processes") == 2
            assert metric_value(text, "fisher_guard_ready") == 1
            assert metric_value(text, "fisher_guard_images_in_flight", model=MODEL) == 0
        jobs = httpx.get(f"{base}/v1/jobs")  # no Redis: the in-process job backend would split jobs over processes
        assert jobs.status_code == 503 and "FISHER_GUARD_REDIS_URL" in jobs.json()["detail"]
    finally:
        stop_server(process)
    assert not list(shared.glob("gauge_live*.db"))  # each process dropped its live gauges at shutdown
