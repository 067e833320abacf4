"""Budgets from the data (service.detect.budgets), the natural-image squeezings, the candidate feature sets and the
truncated spectrum route of a large-K detector, each against its definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from torch import nn

from service.attacks import attack_spec
from service.data.mnist import load_mnist
from service.detect.budgets import RMS_GRID, budget_grid, options_at, select_budgets
from service.detect.dataset import protocol_options
from service.detect.detector import Detector, calibration_scores
from service.detect.features import (
    SpectrumRoute,
    bit_depth_direction,
    candidate_features,
    candidate_sets,
    feature_names,
    fisher_features,
    median_direction,
    median_smooth,
    probe_scale,
)
from service.fisher import fisher_spectrum
from service.zoo.registry import load_model


@pytest.fixture(scope="module")
def lenet():
    return load_model("lenet5", device="cpu").module


@pytest.fixture(scope="module")
def val():
    x, y = load_mnist("val")
    return x[:40], y[:40]


def test_the_grid_keeps_its_per_pixel_rms_for_every_input_size():
    for shape in [(1, 28, 28), (1, 8, 8), (3, 32, 32), (3, 224, 224)]:
        grid = budget_grid(shape)
        dim = math.prod(shape)
        assert len(grid) == len(RMS_GRID)
        np.testing.assert_allclose(np.asarray(grid) / math.sqrt(dim), RMS_GRID, rtol=5e-3)
    assert budget_grid((1, 8, 8))[0] < budget_grid((1, 28, 28))[0] < budget_grid((3, 32, 32))[0]


def _rate(model, name, x, y, eps):
    return attack_spec(name).bind(eps, options_at(name, protocol_options(name, 0), eps))(model, x, y).fooling_rate


@pytest.mark.parametrize("name", ["fgm", "bim", "ossa", "otcm"])
def test_each_budget_is_the_smallest_grid_budget_that_reaches_the_target(lenet, val, name):
    x, y = val
    target = 0.6
    choice = select_budgets(lenet, x, y, {name: protocol_options(name, 0)}, target=target)[name]
    grid = budget_grid(x.shape[1:])
    assert choice.grid == grid and not choice.overridden
    correct = lenet(x).argmax(-1) == y
    xc, yc = x[correct], y[correct]
    at = grid.index(choice.chosen)
    assert choice.reached and _rate(lenet, name, xc, yc, choice.chosen) >= target  # measured again, independently
    if at > 0:
        assert _rate(lenet, name, xc, yc, grid[at - 1]) < target
    assert all(r is None for r in choice.fooling_rates[at + 1:])  # the scan stopped at the first hit


def test_overrides_are_taken_as_given_and_unknown_ones_refused(lenet, val):
    x, y = val
    attacks = {a: protocol_options(a, 0) for a in ("fgm", "opt")}
    choices = select_budgets(lenet, x, y, attacks, overrides={"fgm": 1.25})
    assert choices["fgm"].chosen == 1.25 and choices["fgm"].overridden and "opt" not in choices  # C&W: its own norm
    with pytest.raises(ValueError, match="not trained on"):
        select_budgets(lenet, x, y, attacks, overrides={"bim": 2.0})
    with pytest.raises(ValueError, match="positive"):
        select_budgets(lenet, x, y, attacks, overrides={"fgm": -1.0})


def test_an_unreachable_target_takes_the_largest_budget_and_says_so(val):
    flat = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    nn.init.zeros_(flat[1].weight)
    with torch.no_grad():
        flat[1].bias.copy_(torch.arange(10.0))  # always class 9: no budget fools it
    x, _ = val
    y = torch.full((len(x),), 9)
    choice = select_budgets(flat.eval(), x, y, {"fgm": {}})["fgm"]
    assert not choice.reached and choice.chosen == choice.grid[-1]


def test_bit_depth_and_median_squeezings_follow_their_definitions():
    x = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for bits in (4, 5):
        w = np.round(x.numpy() * (2 ** bits - 1)) / (2 ** bits - 1) - x.numpy()
        np.testing.assert_allclose(bit_depth_direction(x, bits).numpy(),
                                   w / np.linalg.norm(w.reshape(2, -1), axis=1).reshape(2, 1, 1, 1), rtol=1e-12)
    reference = scipy.ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="nearest")
    np.testing.assert_allclose(median_smooth(x, 3).numpy(), reference, rtol=0, atol=0)
    two = median_smooth(x, 2).numpy()
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (0, 1), (0, 1)), mode="edge")
    for i, j in [(0, 0), (4, 3), (8, 6)]:
        window = np.sort(padded[:, :, i:i + 2, j:j + 2].reshape(2, 3, 4), -1)
        np.testing.assert_array_equal(two[:, :, i, j], window[..., 1])  # the lower middle of 4
    u = median_direction(x, 3)
    np.testing.assert_allclose(u.flatten(1).norm(dim=1).numpy(), 1.0, rtol=1e-12)


def test_candidates_follow_the_channels_and_share_one_pass(lenet, val):
    assert "spectral+noise+fine+squeeze" in candidate_sets((1, 28, 28))
    assert "spectral+noise+fine+squeeze" not in candidate_sets((3, 32, 32))
    assert "spectral+noise+fine+natural" in candidate_sets((3, 32, 32)) and "plain" in candidate_sets((3, 32, 32))
    x = val[0][:4]
    together = candidate_features(lenet, x, ("plain", "spectral+noise+fine+natural", "spectral+noise+fine+squeeze"))
    for name, matrix in together.items():
        assert matrix.shape == (4, len(feature_names(name)))
        reference = fisher_features(lenet, x, name).matrix
        np.testing.assert_allclose(matrix, reference, rtol=1e-4, atol=1e-4)  # float32 probes, other batches


def test_probe_norms_keep_their_rms():
    assert probe_scale(torch.zeros(1, 1, 28, 28)) == 1.0
    assert probe_scale(torch.zeros(1, 3, 32, 32)) == pytest.approx(math.sqrt(3072 / 784))


def test_a_large_k_detector_screens_on_the_truncated_route():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 150)).eval()
    model.requires_grad_(False)
    route = SpectrumRoute.for_classes(150)
    assert route.method == "truncated" and route.max_classes is not None and route.max_classes < 150
    assert SpectrumRoute.for_classes(10).method == "exact"
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    feats = fisher_features(model, x, "spectral+noise+fine+natural", route=route)
    reference = fisher_spectrum(model, x, k=20, method="truncated", max_classes=route.max_classes)
    torch.testing.assert_close(feats.spectrum.eigenvalues, reference.eigenvalues)
    rows = np.random.default_rng(0).normal(size=(40, feats.matrix.shape[1]))
    from sklearn.naive_bayes import GaussianNB

    fitted = GaussianNB().fit(rows, np.arange(40) % 2)
    card = {"features": {"spectrum": route.as_dict()}}
    detector = Detector(fitted, "spectral+noise+fine+natural", 20, 0.5, card)
    assert detector.route == route  # read back from the card, as load_detector builds it
    scores = detector.score(model, x).scores
    np.testing.assert_allclose(scores, fitted.predict_proba(feats.matrix)[:, 1], rtol=1e-6)
    with pytest.raises(ValueError, match="max_classes"):
        Detector(fitted, "plain", 20, 0.5, {"features": {"spectrum": {"method": "truncated"}}})


def test_calibration_counts_each_clean_image_once():
    from service.detect.dataset import DetectionSet

    kinds = np.array(["clean", "noisy", "adversarial"] * 2 + ["clean", "noisy", "adversarial"])
    source = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0])  # image 0 in two attack groups
    data = DetectionSet(torch.zeros(9, 1, 2, 2), kinds == "adversarial", kinds, np.array(["a"] * 6 + ["b"] * 3),
                        source, np.zeros(9, int), np.zeros(9))
    oof = np.array([0.1, 0.5, 0.9, 0.2, 0.5, 0.9, 0.1, 0.5, 0.9])
    np.testing.assert_array_equal(calibration_scores(data, oof), [0.1, 0.2])
    np.testing.assert_array_equal(calibration_scores(data, oof, np.array([0.3])), [0.1, 0.2, 0.3])
