"""The feature sets against golden matrices: 16 MNIST test images and their OSSA adversarials (epsilon 3), every
set on the shipped LeNet-5 and the shipped set on the shipped VGG, in float64 (float32 kernels differ from one CPU
to the next by more than a refactoring should: up to 2% on some KL columns between two x86 machines; in float64
they agree to ~1e-12, but for a KL of two nearly equal distributions, whose cancellation the order of float64
operations moves by up to ~4e-8 relative: the blocks computing in torch since the differentiable route moved one
such entry of 3424 by 3.8e-8, hence rtol 1e-7). Regenerate (only when a feature's definition changes on purpose) with
`python tests/test_features_blocks.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.detect.features import (
    FEATURE_SETS,
    KL_FLOOR,
    SHIPPED_FEATURE_SET,
    Block,
    BlockInput,
    FeatureSet,
    feature_names,
    fisher_features,
    log10_kl,
)
from service.zoo.registry import load_model

GOLDEN = Path(__file__).parent / "data" / "features_golden.npz"
IMAGES = 16
NAME_DTYPE = "<U64"
CASES = [("lenet5", name) for name in FEATURE_SETS] + [("vgg-shallow", SHIPPED_FEATURE_SET)]


def _key(model: str, feature_set: str) -> str:
    return f"{model}/{feature_set}"


def golden_images() -> torch.Tensor:
    """The clean images, then their OSSA adversarials on the shipped LeNet-5."""
    from service.attacks import ossa
    from service.data.mnist import load_mnist

    x, y = load_mnist("test")
    x, y = x[:IMAGES], y[:IMAGES]
    return torch.cat([x, ossa(load_model("lenet5", device="cpu").module, x, y, epsilon=3.0).adversarial])


def compute(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Every case's feature matrix and names, model and images in float64, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for model_name in dict.fromkeys(model for model, _ in CASES):
            module = load_model(model_name, device="cpu").module.double()
            for feature_set in (name for model, name in CASES if model == model_name):
                feats = fisher_features(module, images.double(), feature_set)
                out[f"matrix:{_key(model_name, feature_set)}"] = feats.matrix.astype(np.float64)
                out[f"names:{_key(model_name, feature_set)}"] = np.asarray(feats.names, dtype=NAME_DTYPE)
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN, allow_pickle=False) as data:
        return dict(data)


@pytest.fixture(scope="module")
def computed(golden) -> dict[str, np.ndarray]:
    return compute(torch.from_numpy(golden["images"]))


def test_golden_images_are_the_ossa_slice(golden):
    np.testing.assert_allclose(golden_images().numpy(), golden["images"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("model", "feature_set"), CASES)
def test_features_equal_the_golden_ones(golden, computed, model, feature_set):
    key = _key(model, feature_set)
    np.testing.assert_array_equal(computed[f"names:{key}"], golden[f"names:{key}"])
    np.testing.assert_allclose(computed[f"matrix:{key}"], golden[f"matrix:{key}"], rtol=1e-7, atol=1e-9)
    assert list(golden[f"names:{key}"]) == feature_names(feature_set)


def test_every_set_has_a_golden_case(golden):
    assert {key.split("/", 1)[1] for key in golden if key.startswith("matrix:lenet5/")} == set(FEATURE_SETS)


class _Unmoved(Block):
    """A test block: two probes that are the image itself, so both KLs are exactly the floor."""

    def __init__(self, columns: int = 2) -> None:
        self.count = columns

    def names(self, k: int) -> list[str]:
        return ["unmoved_a_log10_kl", "unmoved_b_log10_kl"]

    def probes(self, images, spectrum):
        return torch.stack([images, images], 1)

    def columns(self, data: BlockInput) -> torch.Tensor:
        return log10_kl(data.p[:, None], data.q)[:, :self.count]


def test_a_new_block_gets_its_own_share_of_the_probe_round(golden, monkeypatch):
    base = FEATURE_SETS["spectral"]
    monkeypatch.setitem(FEATURE_SETS, "spectral+unmoved", FeatureSet("spectral+unmoved", "test",
                                                                      (*base.blocks, _Unmoved())))
    module = load_model("lenet5", device="cpu").module
    x = torch.from_numpy(golden["images"][:4])
    feats = fisher_features(module, x, "spectral+unmoved")
    assert feats.names == feature_names("spectral") + _Unmoved().names(20)
    np.testing.assert_allclose(feats.matrix[:, :-2], fisher_features(module, x, "spectral").matrix, rtol=1e-6,
                               atol=1e-9)
    np.testing.assert_array_equal(feats.matrix[:, -2:], np.log10(KL_FLOOR))


def test_a_block_must_return_the_columns_it_names(golden, monkeypatch):
    monkeypatch.setitem(FEATURE_SETS, "short", FeatureSet("short", "test", (_Unmoved(columns=1),)))
    with pytest.raises(AssertionError, match="_Unmoved"):
        fisher_features(load_model("lenet5", device="cpu").module, torch.from_numpy(golden["images"][:2]), "short")


if __name__ == "__main__":
    images = golden_images()
    np.savez_compressed(GOLDEN, images=images.numpy(), **compute(images))
    print(f"wrote {GOLDEN}")
