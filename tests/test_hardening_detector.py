"""Hardening a detector (service.detect.hardening) on a small slice: the shifted negatives and the adaptive
positives are what they claim (benign shifts of correctly classified fit images; adversarials the model gets wrong,
within the largest budget), and the threshold keeps the clean out-of-fold FPR at the target. Random shifts are
seeded, stay in the box and cover every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.attacks.common import predict
from service.data.mnist import load_mnist
from service.detect.detector import calibration_scores, train_detector
from service.detect.hardening import Hardening, harden_detector
from service.evaluate.adaptive import Effort
from service.evaluate.shifts import RANDOM_SHIFTS, random_shift, translation
from service.zoo.registry import load_model

TINY = Effort(steps=5, restarts=1, check_every=5, queries=0, feature_steps=2, feature_restarts=1)


def test_random_shifts_are_seeded_in_the_box_and_cover_every_family(monkeypatch) -> None:
    x, _ = load_mnist("val")
    x = x[:64]
    a = random_shift(x, torch.Generator().manual_seed(3))
    b = random_shift(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, random_shift(x, torch.Generator().manual_seed(4)))
    seen = []
    for family, sampler in list(RANDOM_SHIFTS.items()):
        monkeypatch.setitem(RANDOM_SHIFTS, family, lambda g, family=family, sampler=sampler:
                            seen.append(family) or sampler(g))
    random_shift(x, torch.Generator().manual_seed(0))
    assert set(seen) == set(RANDOM_SHIFTS)


def test_translation_moves_each_axis_by_its_own_pixels() -> None:
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 2, 3] = 1.0
    moved = translation(image, 2, down=-1)
    assert moved[0, 0, 1, 5] == 1.0 and moved.sum() == 1.0
    assert torch.equal(translation(image, 1), translation(image, 1, down=1))


@pytest.fixture(scope="module")
def hardened():
    loaded = load_model("lenet5", device="cpu")
    x, y = load_mnist("val")
    x, y = x[:40], y[:40]
    run = train_detector(loaded.module, model_name="lenet5", model_sha256=loaded.sha256, fit_images=x, fit_labels=y,
                         attacks=("fgm",), epsilons={"fgm": 3.0}, feature_set="plain", classifier="gnb")
    plan = Hardening(rounds=1, attacks=("high-confidence",), budgets=(2.0, 4.0), images_per_round=16,
                     shifts_per_image=1, effort=TINY)
    return loaded.module, x, y, run, harden_detector(loaded.module, run, x, y, plan, classifier="gnb"), plan


def test_hardening_adds_shifted_negatives_and_adaptive_positives(hardened) -> None:
    model, x, y, before, after, plan = hardened
    data = after.fit_set
    correct = int((predict(model, x).argmax(-1) == y).sum())
    shifted = data.kind == "shifted"
    assert shifted.sum() == correct and not data.is_adversarial[shifted].any()
    assert np.array_equal(data.attack[shifted], np.full(correct, "shift"))
    added = data.attack == "high-confidence"
    assert added.any() and data.is_adversarial[added].all()
    rows = data.images[torch.as_tensor(added)]
    assert bool((predict(model, rows).argmax(-1) != torch.as_tensor(data.label[added])).all())
    originals = x[torch.as_tensor(data.source[added])]
    assert float((rows - originals).flatten(1).norm(dim=1).max()) <= max(plan.budgets) * (1 + 1e-4)
    # the paper's rows are all still there, first and unchanged
    assert torch.equal(data.images[:len(before.fit_set)], before.fit_set.images)


def test_hardened_threshold_keeps_the_clean_fpr_at_the_target(hardened) -> None:
    _, _, _, _, after, _ = hardened
    clean = calibration_scores(after.fit_set, after.fit_scores)
    target = after.detector.card["threshold"]["target_fpr"]
    assert np.mean(clean >= after.detector.threshold) <= target + 1 / len(clean)
    card = after.detector.card["hardening"]
    assert card["rounds"] == 1 and card["rounds_run"][0]["positives_added"]["high-confidence"] > 0
    assert card["shifted_negatives"] == int((after.fit_set.kind == "shifted").sum())
