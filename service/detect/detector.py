"""The detector: a small classifier on Fisher features, its operating threshold and its card; training.

Training protocol (`train_detector`): the detection set (`dataset.py`) is built from the `fit` images; out-of-fold
scores of a 5-fold cross-validation grouped by source image (clean, noisy and adversarial twins stay in one fold)
give the validation AUC and the threshold at the target false-positive rate; the classifier is then refitted on
all of it. When `test` images are given, the same is built from them and the test AUC / TPR at that threshold go
into the card. Files (save, find, load, with their checks) are service.detect.files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from service.detect.compiled import CompiledClassifier, compile_classifier
from service.detect.dataset import DEFAULT_ATTACKS, DetectionSet, build_detection_set
from service.detect.features import (
    DEFAULT_K,
    FEATURE_SETS,
    SHIPPED_FEATURE_SET,
    batched_features,
    check_feature_set,
    fisher_features,
)

RF_TREES = 300
RF_DEPTH = 5  # the paper: depth <= 5 and >= 20 trees
RF_MAX_FEATURES = 1.0  # every feature at every split: chosen on validation (out-of-fold AUC), see reports/mnist
CLASSIFIERS: dict[str, str] = {
    "rf": f"RandomForestClassifier(n_estimators={RF_TREES}, max_depth={RF_DEPTH}, max_features={RF_MAX_FEATURES})",
    "gnb": "GaussianNB()",
    "logreg": "StandardScaler + LogisticRegression (the KD+BU baseline)",
}
DEFAULT_FPR = 0.05
CV_FOLDS = 5


def make_classifier(name: str = "rf", seed: int = 0) -> Any:
    """A fresh, unfitted sklearn classifier by name (see CLASSIFIERS)."""
    if name == "rf":
        return RandomForestClassifier(n_estimators=RF_TREES, max_depth=RF_DEPTH, max_features=RF_MAX_FEATURES,
                                      random_state=seed, n_jobs=1)
    if name == "gnb":
        return GaussianNB()
    if name == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    raise ValueError(f"classifier: must be one of {', '.join(CLASSIFIERS)}; got {name!r}")


def threshold_at_fpr(negative_scores: np.ndarray, fpr: float = DEFAULT_FPR) -> float:
    """The smallest threshold t with mean(negatives >= t) <= fpr (verdict: score >= t)."""
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr: must lie in [0, 1), got {fpr!r}")
    values = np.sort(np.asarray(negative_scores, dtype=np.float64))
    if values.size == 0:
        raise ValueError("threshold_at_fpr: no negative scores")
    above = 1.0 - np.searchsorted(values, values, side="right") / values.size  # share strictly above each value
    ok = np.flatnonzero(above <= fpr)
    return float(np.nextafter(values[ok[0]], np.inf))


def auc_score(is_adversarial: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (nan when one class is missing)."""
    if len(np.unique(is_adversarial)) < 2:
        return float("nan")
    return float(roc_auc_score(is_adversarial, scores))


def out_of_fold_scores(features: np.ndarray, is_adversarial: np.ndarray, groups: np.ndarray, classifier: str = "rf",
                       seed: int = 0, folds: int = CV_FOLDS) -> np.ndarray:
    """Adversarial probability of each row from a model that did not see its source image (GroupKFold)."""
    out = np.zeros(len(features))
    splitter = GroupKFold(n_splits=min(folds, len(np.unique(groups))))
    template = make_classifier(classifier, seed)
    for train, held in splitter.split(features, is_adversarial, groups):
        fitted = clone(template).fit(features[train], is_adversarial[train])
        out[held] = fitted.predict_proba(features[held])[:, 1]
    return out


def fit_classifier(features: np.ndarray, is_adversarial: np.ndarray, classifier: str = "rf", seed: int = 0) -> Any:
    return make_classifier(classifier, seed).fit(features, is_adversarial)


@dataclass
class ScreenResult:
    """Per image: adversarial score in [0, 1], verdict (score >= threshold), and what the score was made of."""

    scores: np.ndarray
    adversarial: np.ndarray
    threshold: float
    eigenvalues: np.ndarray
    predictions: np.ndarray
    probabilities: np.ndarray
    feature_set: str


@dataclass
class Detector:
    """A fitted classifier on one feature set, with its operating threshold and its card (provenance, metrics).

    `classifier` may be given as a fitted sklearn estimator: it is compiled on construction (same predict_proba,
    the forest ~100x faster, and savable as arrays), so a Detector always scores through a CompiledClassifier."""

    classifier: CompiledClassifier
    feature_set: str = SHIPPED_FEATURE_SET
    k: int = DEFAULT_K
    threshold: float = 0.5
    card: dict = field(default_factory=dict)

    @property
    def model_sha256(self) -> str | None:
        return self.card.get("model", {}).get("sha256")

    def __post_init__(self) -> None:
        self.classifier = compile_classifier(self.classifier)

    def score_features(self, features: np.ndarray) -> np.ndarray:
        return self.classifier.predict_proba(features)[:, 1].astype(np.float64)

    def score(self, model: nn.Module, images: Tensor) -> ScreenResult:
        """Screen a batch: the features (one exact spectrum call, see `fisher_features`), then the classifier."""
        feats = fisher_features(model, images, self.feature_set, self.k)
        scores = self.score_features(feats.matrix)
        spec = feats.spectrum
        return ScreenResult(
            scores=scores, adversarial=scores >= self.threshold, threshold=self.threshold,
            eigenvalues=spec.eigenvalues.cpu().numpy(), predictions=spec.predictions.cpu().numpy(),
            probabilities=spec.probabilities.cpu().numpy(), feature_set=self.feature_set,
        )


@dataclass
class Evaluation:
    """AUC and TPR at a threshold of scores on one detection set, overall and per attack group."""

    auc: float
    tpr: float
    fpr: float
    per_attack: dict[str, dict[str, float]]
    rows: dict[str, int]

    def as_dict(self) -> dict:
        return {"auc": self.auc, "tpr": self.tpr, "fpr": self.fpr, "per_attack": self.per_attack, "rows": self.rows}


def evaluate_scores(data: DetectionSet, scores: np.ndarray, threshold: float) -> Evaluation:
    """AUC, TPR (adversarial rows flagged) and FPR (clean + noisy rows flagged) at `threshold`."""
    y, flagged = data.is_adversarial, scores >= threshold
    per = {}
    for name in dict.fromkeys(data.attack.tolist()):
        rows = data.attack == name
        per[name] = {"auc": auc_score(y[rows], scores[rows]),
                     "tpr": float(flagged[rows & y].mean()) if (rows & y).any() else float("nan")}
    return Evaluation(auc_score(y, scores), float(flagged[y].mean()) if y.any() else float("nan"),
                      float(flagged[~y].mean()) if (~y).any() else float("nan"), per,
                      {"positives": int(y.sum()), "negatives": int((~y).sum())})


def fit_with_threshold(features: np.ndarray, data: DetectionSet, classifier: str = "rf",
                       target_fpr: float = DEFAULT_FPR, seed: int = 0) -> tuple[Any, float, Evaluation]:
    """Out-of-fold scores -> threshold at `target_fpr` and validation metrics; then the refit on all rows."""
    oof = out_of_fold_scores(features, data.is_adversarial, data.source, classifier, seed)
    threshold = threshold_at_fpr(oof[~data.is_adversarial], target_fpr)
    fitted = fit_classifier(features, data.is_adversarial, classifier, seed)
    return fitted, threshold, evaluate_scores(data, oof, threshold)


def train_detector(model: nn.Module, *, model_name: str, model_sha256: str | None, fit_images: Tensor,
                   fit_labels: Tensor, test_images: Tensor | None = None, test_labels: Tensor | None = None,
                   attacks: tuple[str, ...] = DEFAULT_ATTACKS, epsilons: dict[str, float] | None = None,
                   feature_set: str = SHIPPED_FEATURE_SET, classifier: str = "rf", k: int = DEFAULT_K,
                   target_fpr: float = DEFAULT_FPR, seed: int = 0, progress: bool = False,
                   command: str | None = None, data_description: str = "") -> Detector:
    """Build the detection set, fit the classifier, pick the threshold on out-of-fold validation scores,
    measure on the test images when given, and return the detector with its card filled in."""
    check_feature_set(feature_set)
    fit_set = build_detection_set(model, fit_images, fit_labels, attacks, epsilons, seed, progress=progress)
    if len(fit_set) == 0 or fit_set.is_adversarial.all():
        raise ValueError("train_detector: no successful attack (or no negatives) on the fit images")
    features = batched_features(model, fit_set.images, feature_set, k, progress=progress, desc="fit features")
    fitted, threshold, val = fit_with_threshold(features, fit_set, classifier, target_fpr, seed)
    test = None
    if test_images is not None and test_labels is not None:
        test_set = build_detection_set(model, test_images, test_labels, attacks, epsilons, seed + 1, progress=progress)
        test_feats = batched_features(model, test_set.images, feature_set, k, progress=progress, desc="test features")
        scores = compile_classifier(fitted).predict_proba(test_feats)[:, 1]
        test = {**evaluate_scores(test_set, scores, threshold).as_dict(), "detection_set": test_set.counts(),
                "attack_info": test_set.info}
    card = {
        "kind": "fisher-guard detector",
        "model": {"name": model_name, "sha256": model_sha256},
        "features": {"feature_set": feature_set, "k": k, "definition": FEATURE_SETS[feature_set].description,
                     "spectrum": "service.fisher.fisher_spectrum(method='exact')"},
        "classifier": {"name": classifier, "definition": CLASSIFIERS[classifier], "seed": seed},
        "training_data": {"description": data_description, "attacks": list(attacks),
                          "detection_set": fit_set.counts(), "attack_info": fit_set.info,
                          "negatives": "clean + noisy (Gaussian, L2 norm matched to the adversarial perturbation)",
                          "positives": "successful adversarial images of correctly classified clean images"},
        "threshold": {"value": threshold, "target_fpr": target_fpr,
                      "chosen_on": f"out-of-fold scores of {CV_FOLDS}-fold CV grouped by source image, training data"},
        "validation": val.as_dict(),
        "test": test,
        "command": command,
        "versions": {"torch": torch.__version__, "sklearn": _sklearn_version()},
    }
    return Detector(fitted, feature_set, k, threshold, card)


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__
