"""The HTTP API's refusals: every bad input and limit is a 4xx problem document (never a 500), API keys,
overload (503) and timeouts (504), and a device that is not there."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

import numpy as np
import pytest
import torch
from api_support import (
    KEY,
    MODEL,
    PAYLOAD_LIMIT,
    PYTESTMARK,
    assert_problem,
    assert_v2_error,
    b64,
    bomb_png,
    npy_bytes,
    png_bytes,
    wait_ready,
)
from PIL import Image

from service.api import create_app
from service.config import Settings
from service.data.mnist import load_mnist

pytestmark = PYTESTMARK


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist("test")
    return images[:8], labels[:8]


# ---- bad inputs: 4xx problem documents, never a 500 ----

def test_bad_image_files(client, digits):
    good = png_bytes(digits[0][0])
    gif = io.BytesIO()
    Image.new("L", (28, 28)).save(gif, format="GIF")
    cases = [
        (good[:60] + b"\x00" * 40 + good[100:], 422, "corrupt_image"),
        (good[: len(good) // 2], 422, "corrupt_image"),
        (gif.getvalue(), 415, "unsupported_format"),
        (b"hello, not an image", 415, "unsupported_format"),
        (bomb_png(), 413, "image_too_large"),
        (bomb_png(5000), 413, "image_too_large"),
        (b"", 422, "empty_file"),
        (b"\x93NUMPY garbage", 422, "corrupt_npy"),
        (npy_bytes(np.array([{"a": 1}], dtype=object)), 422, "corrupt_npy"),
        (npy_bytes(np.zeros((2, 3, 28, 28), dtype=np.float32)), 422, "wrong_channels"),
        (b"\x93NUMPY\x01\x00\x14\x00{'descr': __import__", 422, "corrupt_npy"),  # numpy's tokenizer raises
        (npy_bytes(np.zeros((1, 1, 0, 28), dtype=np.float32)), 422, "wrong_shape"),
    ]
    for data, status, code in cases:
        assert_problem(client.post(f"/v1/models/{MODEL}/screen/upload", files={"files": ("x.png", data)}), status, code)
        assert_problem(client.post(f"/v1/models/{MODEL}/screen", json={"images": [b64(data)]}), status, code)


def test_bad_tensors(client):
    nan = np.full((28, 28), 0.5)
    nan[3, 4] = np.nan
    cases = [
        ({"tensor": nan.tolist()}, 422, "non_finite"),
        ({"tensor": np.zeros((27, 28)).tolist()}, 422, "wrong_shape"),
        ({"tensor": np.zeros((2, 28)).tolist()}, 422, "wrong_shape"),
        ({"tensor": np.zeros((1, 3, 28, 28)).tolist()}, 422, "wrong_channels"),
        ({"tensor": np.zeros((1, 1, 1, 28, 28)).tolist()}, 422, "wrong_shape"),
        ({"tensor": []}, 422, "empty_batch"),
        ({"images": []}, 422, "empty_batch"),
        ({"tensor": np.zeros((0, 1, 28, 28)).tolist()}, 422, "empty_batch"),
        ({"tensor": np.zeros((33, 28, 28)).tolist()}, 413, "batch_too_large"),
        ({"tensor": [[0.1, 0.2], [0.3]]}, 422, "invalid_tensor"),
        ({"tensor": [["a"] * 28] * 28}, 422, "invalid_tensor"),
        ({"tensor": (np.ones((28, 28)) * -0.5).tolist()}, 422, "out_of_range"),
        ({"tensor": (np.ones((28, 28)) * 300).tolist()}, 422, "out_of_range"),
        ({"tensor": (np.ones((28, 28)) * 1.5).tolist()}, 422, "out_of_range"),  # above 1 but not whole numbers
        ({"tensor": [[]]}, 422, "wrong_shape"),
        ({"tensor": [[[]]]}, 422, "wrong_shape"),
        ({"tensor": [[[[]]]]}, 422, "wrong_shape"),
        ({"images": ["not base64!"]}, 400, "invalid_base64"),
        ({"images": ["AAAA"], "tensor": [[0]]}, 422, "validation_error"),
        ({}, 422, "validation_error"),
        ({"tensor": [[0]], "threshold": 2}, 422, "validation_error"),
        ({"tensor": [[0]], "threshold": float("nan")}, 422, "validation_error"),
        ({"tensor": [[0]], "surprise": 1}, 422, "validation_error"),
    ]
    for body, status, code in cases:  # json.dumps writes NaN as the literal NaN, as some clients do
        assert_problem(client.post(f"/v1/models/{MODEL}/screen", content=json.dumps(body),
                                   headers={"content-type": "application/json"}), status, code)


def test_bad_requests(client, digits):
    url = f"/v1/models/{MODEL}/screen"
    assert_problem(client.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400,
                   "invalid_json")
    assert_problem(client.post(url, content=b"abc", headers={"content-type": "text/plain"}), 415,
                   "unsupported_media_type")
    assert_problem(client.post(f"{url}/upload", json={"tensor": [[0]]}), 415, "unsupported_media_type")
    assert_problem(client.post(f"{url}/upload", files={"other": ("x", b"1")}), 422, "validation_error")
    too_many = [("files", (f"{i}.png", b"x")) for i in range(33)]
    assert_problem(client.post(f"{url}/upload", files=too_many), 413, "batch_too_large")
    image = digits[0][:1].tolist()
    assert_problem(client.post(f"/v1/models/{MODEL}/spectrum", json={"tensor": image, "k": 21}), 422, "k_out_of_range")
    assert_problem(client.post(f"/v1/models/{MODEL}/spectrum", json={"tensor": image, "k": 0}), 422,
                   "validation_error")
    assert_problem(client.post(f"/v1/models/{MODEL}/spectrum", json={"tensor": image, "k": 2, "method": "power"}),
                   422, "invalid_argument")
    five = digits[0][:5].tolist()  # the paper's Algorithm 1 is limited like the iterative attacks (max_attack_batch=4)
    assert_problem(client.post(f"/v1/models/{MODEL}/spectrum", json={"tensor": five, "k": 1, "method": "power"}),
                   422, "too_heavy")
    assert_problem(client.post(f"/v1/models/{MODEL}/spectrum", json={"tensor": image, "method": "magic"}), 422,
                   "validation_error")


def test_payload_limit(client):
    big = b"0" * (PAYLOAD_LIMIT + 1)
    assert_problem(client.post(f"/v1/models/{MODEL}/screen", content=big,
                               headers={"content-type": "application/json"}), 413, "payload_too_large")

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(PAYLOAD_LIMIT // 65536 + 2):
            yield b" " * 65536

    assert_problem(client.post(f"/v1/models/{MODEL}/screen", content=chunks(),
                               headers={"content-type": "application/json"}), 413, "payload_too_large")
    assert_problem(client.post(f"/v1/models/{MODEL}/screen/upload",
                               files={"files": ("big.npy", b"\x93NUMPY" + big)}), 413, "payload_too_large")


# ---- auth ----

def test_api_keys(settings, caplog):
    """Keys are read at start-up: every endpoint but health needs one, and the schema says so."""
    from fastapi.testclient import TestClient

    caplog.set_level(logging.DEBUG)
    keyed = settings.model_copy(update={"api_keys": [KEY, "other-key"], "serve_models": [MODEL]})
    with TestClient(create_app(keyed), raise_server_exceptions=False) as client:
        wait_ready(client)
        body = {"tensor": np.zeros((28, 28)).tolist()}
        assert_problem(client.get("/v1/models"), 401, "unauthorized")
        assert_problem(client.post(f"/v1/models/{MODEL}/screen", json=body), 401, "unauthorized")
        assert_problem(client.get("/metrics"), 401, "unauthorized")
        assert_v2_error(client.get(f"/v2/models/{MODEL}"), 401, "unauthorized")
        assert_problem(client.get("/v1/jobs"), 401, "unauthorized")
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert_problem(wrong, 401, "unauthorized")
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.get("/v1/models", headers={"X-API-Key": "other-key"}).status_code == 200
        assert client.post(f"/v1/models/{MODEL}/screen", json=body, headers={"X-API-Key": KEY}).status_code == 200
        assert client.get("/health/live").status_code == 200 and client.get("/health/ready").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        schema = client.get("/openapi.json").json()
        assert set(schema["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
        paths = schema["paths"]
        assert paths["/v1/models/{model}/screen"]["post"]["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}]
        assert all("security" not in paths[p]["get"] for p in ("/health/live", "/health/ready", "/v2/health/live"))
    assert KEY not in caplog.text


def test_without_keys_nothing_is_checked_and_the_schema_shows_no_security(client):
    assert client.get("/v1/models").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})
    assert not [path for path, ops in schema["paths"].items() for op in ops.values() if "security" in op]


# ---- metrics, request ids, OpenAPI ----

def test_metrics_and_request_id(client, digits):
    client.post(f"/v1/models/{MODEL}/screen", json={"tensor": digits[0][:2].tolist(), "threshold": 0.0})
    response = client.get("/health/live", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert len(client.get("/health/live").headers["x-request-id"]) == 32
    text = client.get("/metrics").text
    assert 'fisher_guard_images_screened_total{model="lenet5"}' in text
    assert 'fisher_guard_adversarial_verdicts_total{model="lenet5"}' in text
    route = 'endpoint="/v1/models/{model}/screen"'
    assert f'fisher_guard_request_duration_seconds_bucket{{{route},le="0.1",model="lenet5"}}' in text
    assert 'fisher_guard_batch_size_images_count{kind="screen",model="lenet5"}' in text
    assert 'fisher_guard_images_in_flight{model="lenet5"} 0.0' in text and "fisher_guard_ready 1.0" in text
    assert f'fisher_guard_requests_total{{{route},method="POST",model="lenet5",status="200"}}' in text


def test_openapi_schema(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/models/{model}/screen", "/v1/models/{model}/spectrum", "/v1/models/{model}/attack",
                 "/v1/models/{model}/screen/upload", "/v2/models/{model_name}/infer", "/health/ready", "/metrics"):
        assert path in paths
    screen = paths["/v1/models/{model}/screen"]["post"]
    assert "application/problem+json" in screen["responses"]["422"]["content"]
    assert screen["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ScreenRequest")
    assert "multipart/form-data" in paths["/v1/models/{model}/screen/upload"]["post"]["requestBody"]["content"]


# ---- overload, timeouts, a missing device ----

def test_overload_and_timeout_over_http(api_models_dir, digits):
    """With the model held by an event (3 images' worth of work in its thread), a 1-image request waits past its
    time limit and gets 504, then leaves the count; a 2-image request would overflow the capacity of 4 and gets 503
    with Retry-After; once the model is free, requests are answered again. No timing decides an outcome."""
    import functools

    from fastapi.testclient import TestClient

    tight = Settings(models_dir=api_models_dir, user_models_dir=None, device="cpu", serve_models=[MODEL],
                     queue_capacity=4, request_timeout_s=0.3)
    with TestClient(create_app(tight), raise_server_exceptions=False) as tight_client:
        wait_ready(tight_client)
        worker = tight_client.app.state.models[MODEL].worker
        hold = threading.Event()
        held = tight_client.portal.start_task_soon(functools.partial(worker.run, ("hold",), hold.wait, images=3))
        try:
            deadline = time.monotonic() + 30
            while worker.pending != 3 or not worker.model_free.locked():
                assert time.monotonic() < deadline, "the model was not held"
                time.sleep(0.01)
            images = digits[0][:2].tolist()
            assert_problem(tight_client.post(f"/v1/models/{MODEL}/screen", json={"tensor": images[0]}), 504,
                           "timeout")
            assert worker.pending == 3  # the abandoned request left the count
            busy = tight_client.post(f"/v1/models/{MODEL}/screen", json={"tensor": images})
            assert_problem(busy, 503, "overloaded")
            assert busy.headers["retry-after"] == "1"
        finally:
            hold.set()
        held.result(timeout=30)
        assert tight_client.post(f"/v1/models/{MODEL}/screen", json={"tensor": images}).status_code == 200


def test_a_device_that_is_not_there_keeps_the_service_unready_and_says_why(api_models_dir):
    from fastapi.testclient import TestClient

    bad = Settings(models_dir=api_models_dir, user_models_dir=None, device=f"cuda:{torch.cuda.device_count()}",
                   serve_models=[MODEL])
    with TestClient(create_app(bad), raise_server_exceptions=False) as bad_client:
        deadline = time.monotonic() + 60
        while "failed" not in (response := bad_client.get("/health/ready")).text:
            assert time.monotonic() < deadline, response.text
            time.sleep(0.05)
        assert_problem(response, 503, "not_ready")
        assert "is not available: torch sees" in response.json()["detail"]
        assert bad_client.get("/health/live").status_code == 200
