"""Hardening a trained detector against what its paper-style training never shows it (issue 18).

The paper's detection set teaches the forest five attacks at fixed budgets against clean and noisy twins. An
attacker who adapts goes deeper (high confidence) or around the features (through the squeezings, against the
Fisher quantities), and benign changes of a clean image (blur, a darker scan) move the features as well. So, in
`rounds` rounds:

1. attack the current detector with the adaptive white-box attacks of service.evaluate.adaptive (the real
   detector picks each image's best candidate) at L2 budgets drawn from `budgets`, on correctly classified fit
   images, and add the successful adversarials as positives (group = the attack's name);
2. add benign shifts of the clean fit images as negatives (kind "shifted", group "shift"): each image one random
   shift of service.evaluate.shifts.random_shift, with parameters drawn from ranges wider than the mild limits;
3. refit the classifier on all rows and set the threshold again at the target FPR on the CLEAN fit images'
   out-of-fold scores (as train_detector does), so the clean operating point is unchanged.

Everything is drawn from the fit images only: the test split stays untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from service.detect.compiled import compile_classifier
from service.detect.dataset import DetectionSet
from service.detect.detector import (
    Detector,
    TrainingRun,
    calibration_scores,
    evaluate_scores,
    fit_classifier,
    out_of_fold_scores,
    threshold_at_fpr,
)
from service.detect.features import batched_features
from service.evaluate.adaptive import Effort, Target, feature_scale, run_adaptive
from service.evaluate.shifts import random_shift


@dataclass(frozen=True)
class Hardening:
    """How the detector is hardened: rounds, the adaptive attacks and their budgets and effort, the images each
    round attacks, and the shifted negatives per clean image."""

    rounds: int = 2
    attacks: tuple[str, ...] = ("high-confidence", "squeeze-bpda", "blur-start", "fisher-penalty")
    budgets: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)
    images_per_round: int = 400
    shifts_per_image: int = 12  # enough rows for the forest to spend splits on (bench/shifted_negatives.py)
    effort: Effort = Effort(steps=40, restarts=1, check_every=10, queries=0, feature_steps=15, feature_restarts=1)

    def as_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "attacks": list(self.attacks), "budgets": list(self.budgets),
                "images_per_round": self.images_per_round, "shifts_per_image": self.shifts_per_image,
                "effort": self.effort.__dict__}


def _append(data: DetectionSet, images: Tensor, positive: bool, kind: str, group: str, source: np.ndarray,
            label: np.ndarray, originals: Tensor) -> DetectionSet:
    m = len(images)
    return DetectionSet(
        images=torch.cat([data.images, images.cpu()]),
        is_adversarial=np.concatenate([data.is_adversarial, np.full(m, positive)]),
        kind=np.concatenate([data.kind, np.full(m, kind)]), attack=np.concatenate([data.attack, np.full(m, group)]),
        source=np.concatenate([data.source, source]), label=np.concatenate([data.label, label]),
        perturbation_norm=np.concatenate([data.perturbation_norm,
                                          (images.cpu() - originals.cpu()).flatten(1).norm(dim=1).numpy()]),
        info=data.info)


def _refit(matrix: np.ndarray, data: DetectionSet, detector: Detector, classifier: str, seed: int,
           target_fpr: float) -> tuple[Detector, np.ndarray]:
    """The classifier refitted on all rows and its threshold at `target_fpr` on the clean rows' out-of-fold
    scores; returns the new detector (the old card) and the out-of-fold scores."""
    oof = out_of_fold_scores(matrix, data.is_adversarial, data.source, classifier, seed)
    fitted = compile_classifier(fit_classifier(matrix, data.is_adversarial, classifier, seed))
    threshold = threshold_at_fpr(calibration_scores(data, oof), target_fpr)
    return Detector(fitted, detector.feature_set, detector.k, threshold, dict(detector.card), detector.route), oof


def harden_detector(model: nn.Module, run: TrainingRun, fit_images: Tensor, fit_labels: Tensor,
                    hardening: Hardening, *, classifier: str = "rf", seed: int = 0,
                    progress: bool = False) -> TrainingRun:
    """`run`'s detector hardened in rounds (module docstring); the card records the rounds, the new validation
    (out-of-fold, over all rows) and, when the run has test images, the paper-style test metrics again."""
    start = time.perf_counter()
    detector, data = run.detector, run.fit_set
    target_fpr = float(detector.card["threshold"]["target_fpr"])
    feats = lambda x: batched_features(model, x, detector.feature_set, detector.k, route=detector.route)  # noqa: E731
    matrix = feats(data.images)
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(-1).cpu() for chunk in fit_images.split(256)])
    correct = torch.nonzero(predictions == fit_labels.cpu()).flatten()
    clean_x = fit_images[correct]
    # shifted negatives: every correctly classified fit image, shifts_per_image times
    for _ in range(hardening.shifts_per_image):
        shifted = random_shift(clean_x, generator)
        data = _append(data, shifted, False, "shifted", "shift", correct.numpy(), fit_labels[correct].numpy(),
                       clean_x)
        matrix = np.concatenate([matrix, feats(shifted)])
    detector, oof = _refit(matrix, data, detector, classifier, seed, target_fpr)
    rounds = []
    for round_index in range(hardening.rounds):
        target = Target(model, detector)
        target.clean_mean, target.clean_std = feature_scale(feats(clean_x[:300]))
        picked = correct[torch.randperm(len(correct), generator=generator)[:hardening.images_per_round]]
        budget_of = torch.randint(0, len(hardening.budgets), (len(picked),), generator=generator)
        added = {}
        for name in hardening.attacks:
            for b, budget in enumerate(hardening.budgets):
                rows = picked[budget_of == b]
                if not len(rows):
                    continue
                x, y = fit_images[rows], fit_labels[rows].long()
                result = run_adaptive(name, target, x, y, budget, hardening.effort, seed + 100 * round_index + b)
                keep = torch.as_tensor(result.fooled)
                if not bool(keep.any()):
                    continue
                adversarial = result.adversarial[keep].detach()
                data = _append(data, adversarial, True, "adversarial", name, rows[keep].numpy(),
                               y[keep].numpy(), x[keep])
                matrix = np.concatenate([matrix, feats(adversarial)])
                added[name] = added.get(name, 0) + int(keep.sum())
                added[f"{name} unflagged"] = added.get(f"{name} unflagged", 0) + int((~result.flagged[
                    result.fooled]).sum())
        detector, oof = _refit(matrix, data, detector, classifier, seed, target_fpr)
        rounds.append({"round": round_index + 1, "positives_added": added, "threshold": detector.threshold})
        if progress:
            print(f"hardening round {round_index + 1}: {added}; threshold {detector.threshold:.4f}", flush=True)
    card = detector.card
    val = evaluate_scores(data, oof, detector.threshold)
    card["hardening"] = {**hardening.as_dict(), "rounds_run": rounds, "detection_set": data.counts(),
                         "shifted_negatives": int((data.kind == "shifted").sum()),
                         "seconds": round(time.perf_counter() - start, 1)}
    card["threshold"] = {**card["threshold"], "value": detector.threshold,
                         "chosen_on": card["threshold"]["chosen_on"] + "; after hardening, on the clean fit images' "
                                      "out-of-fold scores over the hardened detection set"}
    card["validation"] = val.as_dict()
    card["training_data"]["detection_set"] = data.counts()
    test_scores = None
    if run.test_set is not None:
        test_scores = detector.score_features(feats(run.test_set.images))
        card["test"] = {**evaluate_scores(run.test_set, test_scores, detector.threshold).as_dict(),
                        "detection_set": run.test_set.counts(), "attack_info": run.test_set.info}
    return TrainingRun(detector, data, oof, run.test_set, test_scores)
