"""End to end: `fisher-guard serve` (uvicorn) as a real process on a free port, called over HTTP: real MNIST PNG
uploads (one and a batch), a schema-driven fuzz run (schemathesis) that must find no server error, and a
graceful shutdown that finishes the request in flight."""

from __future__ import annotations

import io
import os
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
from PIL import Image

from service.data.mnist import load_mnist
from service.zoo.registry import sha256_file

REPO = Path(__file__).resolve().parent.parent
MODEL = "lenet5"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((image[0] * 255).round().astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(api_models_dir, tmp_path_factory):
    """The service in its own process; yields (base URL, process). Stopped with SIGTERM at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("e2e") / "server.log"
    env = {**os.environ, "FISHER_GUARD_MODELS_DIR": str(api_models_dir), "FISHER_GUARD_SERVE_MODELS": MODEL,
           "FISHER_GUARD_DEVICE": "cpu", "FISHER_GUARD_MAX_ATTACK_STEPS": "5000", "FISHER_GUARD_LOG_LEVEL": "info"}
    env.pop("FISHER_GUARD_API_KEYS", None)
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                                    "--threads", "1"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the server did not become ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield base, process, log
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


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
