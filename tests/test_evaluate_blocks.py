"""The detector evaluation's building blocks against their definitions: the held-out ART attacks (norm, box,
fooling, as checked by us), the benign shifts (identities, known pixels, independent references), the other
source of digits, and the feature-squeezing baseline (hand-computed L1 distances, threshold at FPR)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from service.attacks.common import predict
from service.data.mnist import load_mnist
from service.data.sources import sklearn_digits
from service.detect.features import median_smooth
from service.evaluate.heldout import (
    BUDGET_TOLERANCE,
    HELDOUT_NAMES,
    HELDOUT_SPECS,
    check_adversarial,
    run_heldout,
)
from service.evaluate.shifts import (
    FAMILIES,
    SHIFTS,
    brightness,
    contrast,
    gaussian_blur,
    gaussian_noise,
    jpeg,
    make_shift,
    other_source,
    rotation,
    translation,
)
from service.evaluate.squeezing import FeatureSqueezing, bit_depth, squeezers_for
from service.zoo.registry import load_model

BUDGETS = (0.5, 1.0, 2.0, 3.0)


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    return load_model("lenet5", device="cpu").module


@pytest.fixture(scope="module")
def digits(lenet: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 8 correctly classified validation digits."""
    x, y = load_mnist("val")
    x, y = x[:40], y[:40]
    right = predict(lenet, x).argmax(-1) == y
    return x[right][:8], y[right][:8]


@pytest.fixture(scope="module", params=HELDOUT_NAMES)
def heldout(request, lenet, digits):
    x, y = digits
    return request.param, run_heldout(request.param, lenet, x, y, BUDGETS, effort="quick", seed=0)


# ------------------------------------------------------------------------------------------------ held-out attacks

def test_each_heldout_adversarial_is_in_the_box_within_its_budget_and_misclassified(heldout, lenet, digits):
    name, result = heldout
    x, y = digits
    assert result.fooled.shape == result.norms.shape == (len(BUDGETS), len(y))
    assert result.adversarial.shape == (len(BUDGETS), *x.shape)
    for b, budget in enumerate(BUDGETS):
        fooled = result.fooled[b]
        adv = result.adversarial[b]
        assert torch.isnan(adv[~fooled]).all() and torch.isnan(result.norms[b][~fooled]).all()
        if not fooled.any():
            continue
        adv, original = adv[fooled], x[fooled]
        assert adv.min() >= 0.0 and adv.max() <= 1.0
        norms = (adv - original).flatten(1).double().norm(dim=1)
        assert torch.allclose(norms, result.norms[b][fooled], atol=1e-6)
        assert (norms <= budget + BUDGET_TOLERANCE).all(), f"{name} at budget {budget}: {norms.max()}"
        assert (predict(lenet, adv).argmax(-1) != y[fooled]).all(), f"{name}: a fooled image is classified right"
    # the attacks are real: at L2 3 every one fools some of LeNet-5's digits, even at the quick effort
    assert result.fooled[-1].any(), name
    assert not result.projected.any(), f"{name} returned images outside its budget"


def test_minimal_norm_attacks_fool_at_a_budget_exactly_the_images_whose_norm_fits(heldout):
    name, result = heldout
    if not HELDOUT_SPECS[name].minimal:
        assert result.minimal_norm is None
        return
    rates = result.fooling_rates()
    assert rates == sorted(rates), f"{name}: fooling rate not monotone in the budget: {rates}"
    found = ~torch.isnan(result.minimal_norm)
    for b, budget in enumerate(BUDGETS):
        assert torch.equal(result.fooled[b], found & (result.minimal_norm <= budget))


def test_check_adversarial_clips_projects_and_re_evaluates(lenet, digits):
    x, y = digits
    x, y = x[:3], y[:3]
    generator = torch.Generator().manual_seed(0)
    far = x + 0.3 * torch.randn(x.shape, generator=generator)  # L2 ~ 8, partly outside the box
    adversarial, norms, fooled, projected = check_adversarial(lenet, x, far, y, budget=2.0)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (norms <= 2.0 + 1e-6).all() and projected.all()
    assert torch.allclose(norms, (adversarial - x).flatten(1).double().norm(dim=1))
    assert torch.equal(fooled, predict(lenet, adversarial).argmax(-1) != y)
    # within the budget: left alone; the clean images themselves are not fooled
    same, norms, fooled, projected = check_adversarial(lenet, x, x.clone(), y, budget=2.0)
    assert torch.equal(same, x) and (norms == 0).all() and not fooled.any() and not projected.any()
    # a non-finite output is a failure, whatever the model makes of it
    broken = far.clone()
    broken[0, 0, 0, 0] = math.nan
    adversarial, norms, fooled, _ = check_adversarial(lenet, x, broken, y, budget=2.0)
    assert torch.equal(adversarial[0], x[0]) and norms[0] == 0 and not fooled[0]
    # a rounding overshoot is projected without being counted
    tiny = x.clone()
    tiny[:, 0, 0, 0] += 1.0 + 0.5 * BUDGET_TOLERANCE
    _, norms, _, projected = check_adversarial(lenet, x, tiny.clamp(max=2), y, budget=1.0)
    assert (norms <= 1.0 + 1e-6).all() and not projected.any()


def test_heldout_runs_are_seeded(lenet, digits):
    x, y = digits
    first = run_heldout("square-l2", lenet, x[:4], y[:4], (2.0,), effort="quick", seed=3)
    again = run_heldout("square-l2", lenet, x[:4], y[:4], (2.0,), effort="quick", seed=3)
    assert torch.equal(first.fooled, again.fooled)
    assert torch.equal(torch.nan_to_num(first.adversarial), torch.nan_to_num(again.adversarial))


def test_heldout_refuses_bad_arguments(lenet, digits):
    x, y = digits
    with pytest.raises(ValueError, match="unknown held-out attack"):
        run_heldout("jsma", lenet, x, y, (1.0,))
    with pytest.raises(ValueError, match="budgets"):
        run_heldout("pgd-l2", lenet, x, y, (0.0,))
    with pytest.raises(ValueError, match="effort"):
        run_heldout("pgd-l2", lenet, x, y, (1.0,), effort="thorough")
    with pytest.raises(ValueError, match="unknown effort settings"):
        run_heldout("pgd-l2", lenet, x, y, (1.0,), effort={"iterations": 3})


def test_fab_runs_on_a_model_with_another_number_of_classes(digits):
    """A user's model with 3 classes, not MNIST's 10: FAB is given the model's class count and fools it within
    the budget."""
    x, _ = digits
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 3)).eval()
    torch.manual_seed(0)
    nn.init.normal_(model[1].weight, std=0.05)
    labels = predict(model, x).argmax(-1)
    result = run_heldout("fab-l2", model, x, labels, (3.0,), effort="quick", seed=0)
    assert result.fooled.any() and not result.projected.any()


def test_a_missing_torchattacks_names_its_lock_file(lenet, digits, monkeypatch):
    for module in [m for m in sys.modules if m == "torchattacks" or m.startswith("torchattacks.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    x, y = digits
    with pytest.raises(ImportError, match=r"requirements-nodeps.lock"):
        run_heldout("fab-l2", lenet, x, y, (1.0,), effort="quick")


def test_a_missing_art_names_the_extra(lenet, digits, monkeypatch):
    for module in [m for m in sys.modules if m == "art" or m.startswith("art.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "art", None)  # what an environment without the extra looks like to import
    x, y = digits
    with pytest.raises(ImportError, match=r"pip install fisher-guard\[evaluate\]"):
        run_heldout("deepfool", lenet, x, y, (1.0,), effort="quick")


# -------------------------------------------------------------------------------------------------- benign shifts

@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_mnist("val")[0][:6]


def test_every_shift_keeps_shape_dtype_and_range(images):
    rgb = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    for shift in SHIFTS.values():
        for x in (images, rgb):
            out = shift(x)
            assert out.shape == x.shape and out.dtype == x.dtype, shift.name
            assert out.min() >= 0 and out.max() <= 1, shift.name
            assert torch.equal(shift(x), out), f"{shift.name} is not deterministic"


def test_shifts_are_the_identity_at_their_neutral_parameter(images):
    for family, neutral in (("blur", 0), ("brightness", 1), ("contrast", 1), ("rotation", 0), ("translation", 0),
                            ("noise", 0)):
        assert torch.allclose(make_shift(family, neutral)(images), images, atol=1e-6), family
    high = jpeg(images, 100)
    assert (high - images).abs().max() <= 2 / 255 and (high - images).abs().mean() < 1e-3
    assert (jpeg(images, 10) - images).abs().mean() > 10 * (high - images).abs().mean()


def test_brightness_and_contrast_give_the_known_pixels():
    x = torch.tensor([0.2, 0.6, 0.9, 0.1]).view(1, 1, 2, 2)  # mean 0.45
    assert torch.allclose(brightness(x, 1.2), torch.tensor([0.24, 0.72, 1.0, 0.12]).view(1, 1, 2, 2))
    assert torch.allclose(contrast(x, 0.5), torch.tensor([0.325, 0.525, 0.675, 0.275]).view(1, 1, 2, 2))
    assert torch.allclose(contrast(x, 2.0), torch.tensor([0.0, 0.75, 1.0, 0.0]).view(1, 1, 2, 2))


def test_blur_of_an_impulse_is_the_gaussian_kernel():
    x = torch.zeros(1, 1, 11, 11)
    x[0, 0, 5, 5] = 1.0
    g = torch.tensor([math.exp(-k * k / 2) for k in range(-3, 4)])  # sigma 1: a 7-tap kernel
    g /= g.sum()
    expected = torch.zeros(11, 11)
    expected[2:9, 2:9] = torch.outer(g, g)
    assert torch.allclose(gaussian_blur(x, 1.0)[0, 0], expected, atol=1e-7)


def test_rotation_by_90_degrees_is_rot90_and_translation_shifts_pixels():
    generator = torch.Generator().manual_seed(2)
    for size in (5, 6):
        x = torch.rand(2, 3, size, size, generator=generator)
        assert torch.allclose(rotation(x, 90), torch.rot90(x, 1, dims=(2, 3)), atol=1e-6)
        assert torch.allclose(rotation(x, -90), torch.rot90(x, -1, dims=(2, 3)), atol=1e-6)
    x = torch.rand(1, 1, 6, 6, generator=generator)
    expected = torch.zeros_like(x)
    expected[..., 2:, 2:] = x[..., :-2, :-2]
    assert torch.equal(translation(x, 2), expected)


def test_noise_has_its_sigma_and_its_seed():
    x = torch.full((4, 1, 32, 32), 0.5)
    noisy = gaussian_noise(x, 0.05)
    assert abs(float((noisy - x).std()) - 0.05) < 0.003 and abs(float((noisy - x).mean())) < 0.003
    assert not torch.equal(gaussian_noise(x, 0.05, seed=1), noisy)


def test_the_mild_flags_follow_the_issue_limits():
    mild = {name for name, shift in SHIFTS.items() if shift.mild}
    assert {"blur=1", "jpeg=50", "brightness=0.8", "brightness=1.2", "contrast=1.2", "rotation=-10",
            "translation=2"} <= mild
    assert not mild & {"blur=1.5", "jpeg=30", "brightness=0.6", "contrast=1.5", "rotation=15", "translation=3"}
    for family in FAMILIES:  # every family has entries beyond its limit; all but noise have mild ones
        flags = {shift.mild for shift in SHIFTS.values() if shift.family == family}
        assert flags == ({False} if family == "noise" else {True, False}), family


def test_other_source_is_sklearn_digits_upscaled():
    base = sklearn_digits()
    data = other_source((1, 16, 16), border=0.0)
    assert data.images.shape == (len(base), 1, 16, 16) and np.array_equal(data.labels, base.labels)
    # bilinear x2 with align_corners=False: output 2i+1 lies a quarter pixel past input i, towards i+1
    small, big = base.images[:5, 0], data.images[:5, 0]
    i = np.arange(7)
    rows = 0.75 * small[:, i] + 0.25 * small[:, i + 1]  # (5, 7, 8)
    expected = 0.75 * rows[:, :, i] + 0.25 * rows[:, :, i + 1]
    assert np.allclose(big[:, 2 * i + 1][:, :, 2 * i + 1], expected, atol=1e-6)
    framed = other_source((3, 28, 28), limit=10)
    assert framed.images.shape == (10, 3, 28, 28)
    assert np.array_equal(framed.images[:, 0], framed.images[:, 2])
    assert framed.images[:, :, :4].max() == 0 and framed.images[:, :, :, -4:].max() == 0
    assert framed.images[:, :, 4:24, 4:24].max() > 0.5
    with pytest.raises(ValueError, match="1- or 3-channel"):
        other_source((2, 28, 28))


# ---------------------------------------------------------------------------------------------- feature squeezing

def test_bit_depth_keeps_2_to_the_bits_levels():
    x = torch.tensor([0.0, 0.2, 0.49, 0.51, 0.8, 1.0]).view(1, 1, 2, 3)
    assert torch.equal(bit_depth(x, 1), torch.tensor([0.0, 0, 0, 1, 1, 1]).view(1, 1, 2, 3))
    levels = torch.unique(bit_depth(torch.linspace(0, 1, 1000).view(1, 1, 10, 100), 5))
    assert torch.allclose(levels, torch.arange(32) / 31)


def test_squeezing_score_is_the_largest_l1_distance_by_hand():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, -1.0]]))
    x = torch.tensor([[0.2, 0.7], [0.4, 0.9]]).view(1, 1, 2, 2)

    def p0(z0: float, z1: float) -> float:  # softmax's first class
        return 1 / (1 + math.exp(z1 - z0))

    clean = p0(0.2 + 1.4, 1.2 - 0.9)
    one_bit = p0(0 + 2 * 1, 0 - 1)  # [[0, 1], [0, 1]]
    median = p0(0.4 + 1.4, 1.2 - 0.9)  # 2x2 windows, edges replicated, lower middle: [[0.4, 0.7], [0.4, 0.9]]
    assert torch.allclose(median_smooth(x, 2), torch.tensor([[0.4, 0.7], [0.4, 0.9]]).view(1, 1, 2, 2))
    expected = max(2 * abs(clean - one_bit), 2 * abs(clean - median))
    detector = FeatureSqueezing(model, ("bits1", "median2"))
    assert np.isclose(detector.score(x)[0], expected, rtol=1e-6)
    assert np.isclose(FeatureSqueezing(model, ("median2",)).score(x)[0], 2 * abs(clean - median), rtol=1e-6)


def test_squeezing_threshold_holds_the_target_fpr(lenet, images):
    clean = load_mnist("val")[0][:100]
    detector = FeatureSqueezing.for_images(lenet, clean.shape[1:])
    assert detector.squeezers == ("bits1", "median2") and squeezers_for(3) == ("bits5", "median2", "median3")
    with pytest.raises(ValueError, match="fit"):
        detector.flag(clean)
    detector.fit(clean, target_fpr=0.1)
    scores = detector.score(clean)
    assert detector.flag(clean).mean() <= 0.1
    below = scores[scores < detector.threshold]
    assert (scores >= below.max()).mean() > 0.1  # the smallest such threshold: one step lower flags too many
    with pytest.raises(ValueError, match="unknown"):
        FeatureSqueezing(lenet, ("nl-means",))
