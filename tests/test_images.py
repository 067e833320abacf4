"""Image decoding and encoding (service.data.images): modes, channels and the PNG round trip."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from service.data.mnist import load_mnist


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist("test")
    return images[:8], labels[:8]


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "I;16"])
def test_decode_image_modes_and_channels(mode):
    from service.data.images import InputLimits, decode_image

    gray = (np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 257)  # 16-bit: exact after /65535
    else:
        img = Image.fromarray(gray, mode="L").convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    for channels in (1, 3):
        out = decode_image(buffer.getvalue(), (channels, 28, 28), InputLimits()).images
        assert out.shape == (1, channels, 28, 28) and out.dtype == torch.float32
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        if mode in ("L", "RGB", "LA", "I;16"):
            np.testing.assert_allclose(out[0, 0].numpy(), gray / 255.0, atol=1e-6)


def test_encode_png_round_trip(digits):
    from service.data.images import InputLimits, decode_image, encode_png

    image = digits[0][0]
    back = decode_image(base64.b64decode(encode_png(image)), (1, 28, 28), InputLimits()).images[0]
    assert torch.equal(back, image)  # MNIST digits are 8-bit: the PNG is exact
