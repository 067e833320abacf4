"""Small helpers the test modules share: a free port, PNG bytes of a digit, a zip archive in memory."""

from __future__ import annotations

import io
import socket
import zipfile

import numpy as np
from PIL import Image


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(image: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of an image in [0, 1], (H, W) or (1, H, W)."""
    gray = image[0] if image.ndim == 3 else image
    buffer = io.BytesIO()
    Image.fromarray((np.asarray(gray) * 255).round().astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    """A zip archive of `members` (name -> bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()
