"""Decoding and validation of image inputs: PNG/JPEG bytes, base64 text, nested lists and .npy arrays.

Everything becomes a float32 batch (N, C, H, W) in [0, 1] that fits a model's input shape, or an
`ImageInputError` whose `code` is machine-readable and whose message is one sentence naming the problem.
Image dimensions are checked from the file header BEFORE any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torch import Tensor

from service.data.arrays import ArrayFileError, read_npy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
NPY_MAGIC = b"\x93NUMPY"
URLSAFE = str.maketrans("-_", "+/")
SCALED_NOTE = "8-bit images (whole numbers 0-255) were divided by 255"

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image


class ImageInputError(ValueError):
    """Bad input; `code` names the kind of problem (e.g. 'corrupt_image', 'image_too_large', 'wrong_shape')."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class InputLimits:
    """Limits on one request's images."""

    max_side: int = 4096
    max_pixels: int = 4096 * 4096
    max_batch: int = 256


@dataclass
class DecodedBatch:
    """A validated batch (N, C, H, W) float32 in [0, 1] and notes on what was done to it (scaling, resizing)."""

    images: Tensor
    notes: list[str] = field(default_factory=list)


def sniff_format(data: bytes) -> str:
    """'png', 'jpeg' or 'npy' from the first bytes; anything else is refused with 'unsupported_format'."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(NPY_MAGIC):
        return "npy"
    if not data:
        raise ImageInputError("empty_file", "the uploaded file is empty")
    raise ImageInputError("unsupported_format", "the file is not a PNG, JPEG or .npy file (unrecognised header bytes)")


def _check_declared_size(width: int, height: int, limits: InputLimits) -> None:
    if width < 1 or height < 1:
        raise ImageInputError("corrupt_image", f"the image declares an empty size {width}x{height}")
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise ImageInputError(
            "image_too_large",
            f"the image declares {width}x{height} pixels, over the limit of {limits.max_side} per side and "
            f"{limits.max_pixels} in all",
        )


def _pixels(img: Image.Image, channels: int) -> np.ndarray:
    """(H, W, C) float32 in [0, 1], converted to `channels` (1: luminance, 3: RGB); 16-bit kept exact."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(img, dtype=np.float32) / 65535.0
        gray = gray[..., None]
        return np.repeat(gray, channels, axis=2) if channels != 1 else gray
    if channels in (1, 3):
        mode = "L" if channels == 1 else "RGB"
        array = np.asarray(img if img.mode == mode else img.convert(mode), dtype=np.float32) / 255.0
        return array[..., None] if channels == 1 else array
    raise ImageInputError("wrong_channels", f"image files can feed only 1- or 3-channel models, not {channels}")


def decode_image(data: bytes, shape: tuple[int, int, int], limits: InputLimits, resize: bool = False) -> DecodedBatch:
    """One PNG/JPEG file -> (1, C, H, W). Its declared size is checked before decoding; resized only if asked."""
    kind = sniff_format(data)
    if kind == "npy":
        return decode_npy(data, shape, limits, resize)
    channels, height, width = shape
    try:
        img = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageInputError("image_too_large", f"the image declares more pixels than the limit of "
                              f"{limits.max_pixels}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError("corrupt_image", f"the {kind.upper()} file cannot be read: its header is not "
                              "valid") from exc
    _check_declared_size(img.width, img.height, limits)
    if (img.height, img.width) != (height, width) and not resize:
        raise ImageInputError(
            "wrong_shape",
            f"the image is {img.width}x{img.height} but the model takes {width}x{height}; "
            "resize it or ask the API to (resize=true)",
        )
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageInputError("image_too_large", f"the image declares more pixels than the limit of "
                              f"{limits.max_pixels}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError("corrupt_image", f"the {kind.upper()} file is corrupt or truncated: {exc}") from exc
    notes = []
    if (img.height, img.width) != (height, width):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
        notes.append(f"resized to {width}x{height}")
    array = _pixels(img, channels)
    return DecodedBatch(torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None], notes)


def decode_base64(text: str, what: str = "image") -> bytes:
    """Standard or URL-safe base64, line breaks allowed (and a data: URL prefix) -> bytes."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    text = "".join(text.split())  # line breaks of MIME base64 (`base64` wraps at 76 columns)
    if "-" in text or "_" in text:
        text = text.translate(URLSAFE)  # the URL-safe alphabet
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError("invalid_base64", f"{what} is not valid base64: {exc}") from exc


def encode_png(image: Tensor) -> str:
    """(C, H, W) in [0, 1] -> base64 PNG (8-bit, grayscale or RGB)."""
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    if array.shape[0] == 1:
        img = Image.fromarray(array[0], mode="L")
    else:
        img = Image.fromarray(array[:3].transpose(1, 2, 0), mode="RGB")
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def vector_png(vector: Tensor) -> str:
    """A signed direction (e.g. an eigenvector) as a PNG: 0 is mid-grey, +/- max|v| are white/black."""
    scale = vector.abs().max().clamp(min=torch.finfo(vector.dtype).tiny)
    return encode_png(0.5 + 0.5 * vector / scale)


def _as_batch(array: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(N, C, H, W) from (N, C, H, W), (C, H, W), or for 1-channel models (H, W) and (N, H, W)."""
    channels, height, width = shape
    if array.ndim == 4:
        return array
    if array.ndim == 3:
        if array.shape[0] == channels and channels != 1:
            return array[None]
        if channels == 1:
            return array[:, None]  # (N, H, W); a (1, H, W) image is the same thing
        return array[None]
    if array.ndim == 2 and channels == 1:
        return array[None, None]
    raise ImageInputError(
        "wrong_shape",
        f"a tensor of shape {list(array.shape)} is neither one image [{channels}, {height}, {width}] nor a batch "
        f"[N, {channels}, {height}, {width}]",
    )


def _unit_range(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(N, C, H, W) pixels in [0, 1]. Each image is judged alone: one with values above 1 must be an 8-bit image
    (whole numbers 0-255), and only it is divided by 255. So one image cannot rescale its batch-mates, and an
    adversarial [0, 1] image with a pixel nudged past 1 is refused rather than screened darkened 255 times."""
    flat = values.reshape(values.shape[0], -1)
    low, high = flat.min(axis=1), flat.max(axis=1)
    if (low < 0).any():
        i = int(np.argmax(low < 0))
        raise ImageInputError("out_of_range", f"pixel values must lie in [0, 1] (or be whole numbers 0-255); image "
                              f"{i} has {float(low[i]):g}")
    eight_bit = high > 1.0
    if not eight_bit.any():
        return values, []
    whole = (flat == np.round(flat)).all(axis=1)
    bad = eight_bit & ((high > 255.0) | ~whole)
    if bad.any():
        i = int(np.argmax(bad))
        raise ImageInputError("out_of_range", f"pixel values must lie in [0, 1] or be whole numbers 0-255; image {i} "
                              f"has values above 1 (largest {float(high[i]):g}) that are not an 8-bit image")
    values = values.copy()
    values[eight_bit] /= 255.0
    which = np.flatnonzero(eight_bit).tolist()
    listed = ", ".join(map(str, which[:10])) + (", ..." if len(which) > 10 else "")
    return values, [f"{SCALED_NOTE}: image{'s' if len(which) > 1 else ''} {listed}"]


def tensor_batch(array: np.ndarray, shape: tuple[int, int, int], limits: InputLimits,
                 resize: bool = False) -> DecodedBatch:
    """A numeric array of one image or a batch -> validated (N, C, H, W) float32 in [0, 1]."""
    if array.dtype.kind not in "biuf":
        raise ImageInputError("invalid_tensor", f"tensor values must be numbers, got dtype {array.dtype}")
    if array.size == 0 and array.ndim <= 1:
        raise ImageInputError("empty_batch", "the batch is empty: send at least one image")
    batch = _as_batch(array, shape)
    channels, height, width = shape
    if batch.shape[0] == 0:
        raise ImageInputError("empty_batch", "the batch is empty: send at least one image")
    if batch.size == 0:
        raise ImageInputError("wrong_shape", f"the images of shape {list(batch.shape[1:])} hold no pixels")
    if batch.shape[0] > limits.max_batch:
        raise ImageInputError("batch_too_large", f"the batch has {batch.shape[0]} images, over the limit of "
                              f"{limits.max_batch}")
    if batch.shape[1] != channels:
        raise ImageInputError("wrong_channels", f"the images have {batch.shape[1]} channels but the model takes "
                              f"{channels}")
    if max(batch.shape[2:]) > limits.max_side or batch.shape[2] * batch.shape[3] > limits.max_pixels:
        raise ImageInputError("image_too_large", f"the images are {batch.shape[3]}x{batch.shape[2]}, over the limit")
    values = batch.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise ImageInputError("non_finite", "the tensor contains NaN or infinite values")
    values, notes = _unit_range(values)
    images = torch.from_numpy(np.ascontiguousarray(values))
    if tuple(images.shape[2:]) != (height, width):
        if not resize:
            raise ImageInputError(
                "wrong_shape",
                f"the images are {images.shape[3]}x{images.shape[2]} but the model takes {width}x{height}; "
                "resize them or ask the API to (resize=true)",
            )
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)
        notes.append(f"resized to {width}x{height}")
    return DecodedBatch(images, notes)


def nested_batch(values: object, shape: tuple[int, int, int], limits: InputLimits,
                 resize: bool = False) -> DecodedBatch:
    """Nested lists of numbers (JSON) -> validated batch."""
    try:
        array = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise ImageInputError("invalid_tensor", "the tensor must be a rectangular nested list of numbers "
                              f"(ragged or non-numeric: {exc})") from exc
    return tensor_batch(array, shape, limits, resize)


def max_values(shape: tuple[int, int, int], limits: InputLimits, resize: bool, batch: int | None = None) -> int:
    """Most values an array of images may declare: a batch of the model's images, or with resize of the largest
    images the limits allow."""
    channels, height, width = shape
    pixels = limits.max_pixels if resize else height * width
    return (batch or limits.max_batch) * max(channels, 1) * pixels


def decode_npy(data: bytes, shape: tuple[int, int, int], limits: InputLimits, resize: bool = False) -> DecodedBatch:
    """A .npy file (never unpickled) -> validated batch; its declared shape and size are checked against the
    payload and the limits before any value is read."""
    try:
        array = read_npy(data, max_values(shape, limits, resize))
    except ArrayFileError as exc:
        code = "image_too_large" if exc.code == "array_too_large" else exc.code
        raise ImageInputError(code, exc.message) from exc
    return tensor_batch(array, shape, limits, resize)


def concat(parts: list[DecodedBatch], limits: InputLimits) -> DecodedBatch:
    """Join decoded parts into one batch, enforcing the batch limits; notes deduplicated, in order."""
    if not parts:
        raise ImageInputError("empty_batch", "the batch is empty: send at least one image")
    total = sum(p.images.shape[0] for p in parts)
    if total > limits.max_batch:
        raise ImageInputError("batch_too_large", f"the batch has {total} images, over the limit of {limits.max_batch}")
    notes: list[str] = []
    for part in parts:
        notes += [n for n in part.notes if n not in notes]
    return DecodedBatch(torch.cat([p.images for p in parts]), notes)


def decode_files(files: list[bytes], shape: tuple[int, int, int], limits: InputLimits,
                 resize: bool = False) -> DecodedBatch:
    """Uploaded files (PNG, JPEG or .npy, each one image or, for .npy, a batch) -> one batch."""
    if len(files) > limits.max_batch:
        raise ImageInputError("batch_too_large", f"{len(files)} files, over the batch limit of {limits.max_batch}")
    return concat([decode_image(data, shape, limits, resize) for data in files], limits)


def decode_base64_images(items: list[str], shape: tuple[int, int, int], limits: InputLimits,
                         resize: bool = False) -> DecodedBatch:
    """base64 PNG/JPEG/.npy strings -> one batch."""
    if len(items) > limits.max_batch:
        raise ImageInputError("batch_too_large", f"{len(items)} images, over the batch limit of {limits.max_batch}")
    parts = [decode_image(decode_base64(text, f"images[{i}]"), shape, limits, resize) for i, text in enumerate(items)]
    return concat(parts, limits)
