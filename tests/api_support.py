"""What the API test modules share: constants, and helpers that build inputs and check problem documents (their
fixtures, the app through Starlette's TestClient and the engine's reference answers, are in conftest.py)."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

PYTESTMARK = [pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

MODEL = "lenet5"
BARE = "lenet5-bare"
KEY = "test-key-7f3a"  # an API key for the auth tests; must never appear in logs
PAYLOAD_LIMIT = 2 * 1024 * 1024


def wait_ready(client, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/health/ready")
        if response.status_code == 200:
            return
        assert response.status_code == 503
        time.sleep(0.05)
    raise AssertionError(f"the app did not become ready: {response.json()}")


def png_bytes(image: torch.Tensor, mode: str = "L", fmt: str = "PNG") -> bytes:
    """(1, H, W) in [0, 1] -> PNG (or JPEG) bytes, as grayscale or converted to RGB."""
    array = (image[0].numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(array, mode="L").convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_png(side: int = 100_000) -> bytes:
    """A tiny PNG whose header declares side x side pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b""))


def assert_problem(response, status: int, code: str | None = None) -> dict:
    """A problem document with this status (and code), no stack trace."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["code"] and body["detail"] and body["type"].endswith(body["code"])
    assert "Traceback" not in response.text
    if code is not None:
        assert body["code"] == code, body
    return body




def assert_v2_error(response, status: int, code: str | None = None) -> dict:
    """An Open Inference Protocol error (on /v2 paths): application/json with the message in `error`, as Triton's
    and KServe's clients read it, and the problem's code; no stack trace."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"  # exactly: KServe's client reads no other
    body = response.json()
    assert body["status"] == status and body["code"] and isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in response.text
    if code is not None:
        assert body["code"] == code, body
    return body
