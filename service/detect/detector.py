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

from service.detect.budgets import SELECT_RATE, select_budgets
from service.detect.compiled import CompiledClassifier, compile_classifier
from service.detect.dataset import DEFAULT_ATTACKS, DetectionSet, build_detection_set, protocol_options
from service.detect.defaults import DEFAULT_FPR
from service.detect.features import (
    DEFAULT_K,
    EXACT,
    FEATURE_SETS,
    SHIPPED_FEATURE_SET,
    SpectrumRoute,
    batched_features,
    candidate_features,
    candidate_sets,
    check_feature_set,
    fisher_features,
)
from service.fisher import fisher_spectrum
from service.fisher.checks import num_classes_of, prepare_inputs

RF_TREES = 300
RF_DEPTH = 5  # the paper: depth <= 5 and >= 20 trees
RF_MAX_FEATURES = 1.0  # every feature at every split: chosen on validation (out-of-fold AUC), see reports/mnist
CLASSIFIERS: dict[str, str] = {
    "rf": f"RandomForestClassifier(n_estimators={RF_TREES}, max_depth={RF_DEPTH}, max_features={RF_MAX_FEATURES})",
    "gnb": "GaussianNB()",
    "logreg": "StandardScaler + LogisticRegression (the KD+BU baseline)",
}
CV_FOLDS = 5
SELECTION_FOLDS = 3  # the feature-set comparison's CV folds and forest size (cheaper than the final fit's)
SELECTION_TREES = 100


def make_classifier(name: str = "rf", seed: int = 0, trees: int = RF_TREES) -> Any:
    """A fresh, unfitted sklearn classifier by name (see CLASSIFIERS; `trees`: the forest's size)."""
    if name == "rf":
        return RandomForestClassifier(n_estimators=trees, max_depth=RF_DEPTH, max_features=RF_MAX_FEATURES,
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
                       seed: int = 0, folds: int = CV_FOLDS, trees: int = RF_TREES) -> np.ndarray:
    """Adversarial probability of each row from a model that did not see its source image (GroupKFold)."""
    out = np.zeros(len(features))
    splitter = GroupKFold(n_splits=min(folds, len(np.unique(groups))))
    template = make_classifier(classifier, seed, trees)
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
    the forest ~100x faster, and savable as arrays), so a Detector always scores through a CompiledClassifier.
    `route` is the spectrum route of its features; by default the one its card records (exact when none)."""

    classifier: CompiledClassifier
    feature_set: str = SHIPPED_FEATURE_SET
    k: int = DEFAULT_K
    threshold: float = 0.5
    card: dict = field(default_factory=dict)
    route: SpectrumRoute | None = None

    @property
    def model_sha256(self) -> str | None:
        return self.card.get("model", {}).get("sha256")

    def __post_init__(self) -> None:
        self.classifier = compile_classifier(self.classifier)
        if self.route is None:
            recorded = (self.card.get("features") or {}).get("spectrum")
            self.route = SpectrumRoute(recorded.get("method", "exact"), recorded.get("max_classes")) \
                if isinstance(recorded, dict) else EXACT

    def training_protocol(self) -> tuple[tuple[str, ...], dict[str, float], int]:
        """The attacks, L2 budgets and seed of the detection set its card says it was trained on: to build another
        set the same way (its test part, validation studies)."""
        card = self.card
        return (tuple(card["training_data"]["attacks"]),
                {name: choice["chosen"] for name, choice in card["budgets"].items()}, int(card["classifier"]["seed"]))

    def score_features(self, features: np.ndarray) -> np.ndarray:
        return self.classifier.predict_proba(features)[:, 1].astype(np.float64)

    def score(self, model: nn.Module, images: Tensor) -> ScreenResult:
        """Screen a batch: the features (one spectrum call on its route, see `fisher_features`), then the classifier."""
        feats = fisher_features(model, images, self.feature_set, self.k, self.route or EXACT)
        scores = self.score_features(feats.matrix)
        spec = feats.spectrum
        return ScreenResult(
            scores=scores, adversarial=scores >= self.threshold, threshold=self.threshold,
            eigenvalues=spec.eigenvalues.cpu().numpy(), predictions=spec.predictions.cpu().numpy(),
            probabilities=spec.probabilities.cpu().numpy(), feature_set=self.feature_set,
        )


@dataclass
class Evaluation:
    """AUC and TPR at a threshold of scores on one detection set, overall and per attack group; FPR over all
    negatives, and apart over the clean and the noisy ones (the clean FPR is what a production input sees)."""

    auc: float
    tpr: float
    fpr: float
    per_attack: dict[str, dict[str, float]]
    rows: dict[str, int]
    clean_fpr: float = float("nan")
    noisy_fpr: float = float("nan")

    def as_dict(self) -> dict:
        return {"auc": self.auc, "tpr": self.tpr, "fpr": self.fpr, "clean_fpr": self.clean_fpr,
                "noisy_fpr": self.noisy_fpr, "per_attack": self.per_attack, "rows": self.rows}


def _share(flags: np.ndarray, rows: np.ndarray) -> float:
    return float(flags[rows].mean()) if rows.any() else float("nan")


def evaluate_scores(data: DetectionSet, scores: np.ndarray, threshold: float) -> Evaluation:
    """AUC, TPR (adversarial rows flagged) and FPR (clean + noisy rows flagged; clean, noisy) at `threshold`."""
    y, flagged = data.is_adversarial, scores >= threshold
    per = {}
    for name in dict.fromkeys(data.attack.tolist()):
        rows = data.attack == name
        per[name] = {"auc": auc_score(y[rows], scores[rows]), "tpr": _share(flagged, rows & y)}
    return Evaluation(auc_score(y, scores), _share(flagged, y), _share(flagged, ~y), per,
                      {"positives": int(y.sum()), "negatives": int((~y).sum())},
                      _share(flagged, data.kind == "clean"), _share(flagged, data.kind == "noisy"))


def calibration_scores(data: DetectionSet, oof: np.ndarray, extra_clean: np.ndarray | None = None) -> np.ndarray:
    """The clean images' scores that set the threshold: each clean source image once (its out-of-fold score; it
    appears once per attack group with the same score), plus `extra_clean`, the scores of clean fit images outside
    the detection set (never trained on)."""
    clean = np.flatnonzero(data.kind == "clean")
    _, first = np.unique(data.source[clean], return_index=True)
    own = oof[clean[np.sort(first)]]
    return own if extra_clean is None else np.concatenate([own, extra_clean])


@dataclass
class TrainingRun:
    """A trained detector with what its report shows: the fit part's detection set and out-of-fold scores, and the
    test part's detection set and detector scores (None without test images)."""

    detector: Detector
    fit_set: DetectionSet
    fit_scores: np.ndarray
    test_set: DetectionSet | None = None
    test_scores: np.ndarray | None = None


def select_feature_set(features: dict[str, np.ndarray], data: DetectionSet, classifier: str = "rf",
                       seed: int = 0) -> tuple[str, dict[str, float]]:
    """The candidate with the highest out-of-fold AUC on the fit set's detection set (ties: the first, i.e. the
    smaller set), and every candidate's AUC: SELECTION_FOLDS folds, a forest of SELECTION_TREES trees (the same
    depth and features per split; a 300-tree forest costs ~10 s per fit on 1500 rows here, 25 of them 4 minutes)."""
    aucs = {name: auc_score(data.is_adversarial, out_of_fold_scores(m, data.is_adversarial, data.source, classifier,
                                                                     seed, SELECTION_FOLDS, SELECTION_TREES))
            for name, m in features.items()}
    best = max(aucs, key=lambda name: (np.nan_to_num(aucs[name], nan=-1.0), -list(aucs).index(name)))
    return best, aucs


def _route_record(model: nn.Module, images: Tensor, route: SpectrumRoute, check_images: int = 4) -> dict:
    """What the card says of the spectrum route: the route, and for the truncated one its error bound on clean fit
    images (discarded probability mass; the top eigenvalue against the exact route on a few images)."""
    record: dict[str, Any] = {**route.as_dict(), "function": "service.fisher.fisher_spectrum"}
    if route.method == "exact":
        record["error_bound"] = "exact to float rounding (the Gram route over all K classes)"
        return record
    x = images[:64]
    truncated = fisher_spectrum(model, x, k=1, method="truncated", max_classes=route.max_classes)
    mass = truncated.discarded_mass.double().cpu().numpy()
    record["error_bound"] = ("eigenvalues are lower bounds, off by at most the discarded probability mass times the "
                             "largest squared class gradient (service.fisher.gram)")
    record["discarded_mass"] = {"images": int(len(x)), "median": float(np.median(mass)), "max": float(mass.max())}
    few = x[:check_images]
    exact = fisher_spectrum(model, few, k=1, method="exact").eigenvalues[:, 0].double().cpu()
    low = truncated.eigenvalues[:check_images, 0].double().cpu()
    record["top_eigenvalue_vs_exact"] = {"images": int(len(few)),
                                         "max_relative_shortfall": float(((exact - low) / exact.clamp(min=1e-30))
                                                                         .max())}
    return record


def train_detector(model: nn.Module, *, model_name: str, model_sha256: str | None, fit_images: Tensor,
                   fit_labels: Tensor, test_images: Tensor | None = None, test_labels: Tensor | None = None,
                   attacks: tuple[str, ...] = DEFAULT_ATTACKS, epsilons: dict[str, float] | None = None,
                   feature_set: str | None = None, classifier: str = "rf", k: int = DEFAULT_K,
                   target_fpr: float = DEFAULT_FPR, seed: int = 0, progress: bool = False,
                   command: str | None = None, data_description: str = "", route: SpectrumRoute | None = None,
                   budget_target: float = SELECT_RATE, opt_params: dict[str, float] | None = None) -> TrainingRun:
    """Train a detector for any model on its user's data:

    1. budgets: each attack's L2 budget by the rule of service.detect.budgets on the fit images (`epsilons`
       overrides some or all);
    2. the detection set of the fit images; features on `route` (default: exact up to 100 classes, truncated above);
    3. the feature set: `feature_set`, or the candidate for this input shape (`candidate_sets`) with the highest
       out-of-fold AUC;
    4. the threshold at `target_fpr` on the clean fit images' scores (out-of-fold in the detection set, and the
       refitted detector's on the rest), the classifier refitted on all rows;
    5. when test images are given, the same detection set from them, scored once: AUC, TPR, FPR in the card."""
    image_shape = tuple(fit_images.shape[1:])
    candidates = (check_feature_set(feature_set),) if feature_set else candidate_sets(image_shape)
    num_classes = num_classes_of(model, prepare_inputs(model, fit_images[:1]))
    route = route or SpectrumRoute.for_classes(num_classes)
    budgets = select_budgets(model, fit_images, fit_labels, {a: protocol_options(a, seed, opt_params, route)
                                                              for a in attacks},
                             target=budget_target, overrides=epsilons)
    eps = {name: choice.chosen for name, choice in budgets.items()}
    fit_set = build_detection_set(model, fit_images, fit_labels, attacks, eps, seed, progress=progress,
                                  opt_params=opt_params, route=route)
    if len(fit_set) == 0 or fit_set.is_adversarial.all():
        raise ValueError("train_detector: no successful attack (or no negatives) on the fit images")
    features = candidate_features(model, fit_set.images, candidates, k, progress=progress, desc="fit features",
                                  route=route)
    chosen, aucs = select_feature_set(features, fit_set, classifier, seed) if len(candidates) > 1 else \
        (candidates[0], None)
    matrix = features[chosen]
    oof = out_of_fold_scores(matrix, fit_set.is_adversarial, fit_set.source, classifier, seed)
    fitted = compile_classifier(fit_classifier(matrix, fit_set.is_adversarial, classifier, seed))
    outside = np.setdiff1d(np.arange(len(fit_images)), np.unique(fit_set.source))
    extra = None
    if len(outside):
        extra_feats = batched_features(model, fit_images[torch.as_tensor(outside)], chosen, k, route=route)
        extra = fitted.predict_proba(extra_feats)[:, 1]
    clean_scores = calibration_scores(fit_set, oof, extra)
    threshold = threshold_at_fpr(clean_scores, target_fpr)
    val = evaluate_scores(fit_set, oof, threshold)
    test = test_set = test_scores = None
    if test_images is not None and test_labels is not None:
        test_set, test_scores, test = test_evaluation(model, Detector(fitted, chosen, k, threshold, route=route),
                                                      test_images, test_labels, attacks, eps, seed, progress,
                                                      opt_params)
    card = {
        "kind": "fisher-guard detector",
        "model": {"name": model_name, "sha256": model_sha256, "input_shape": list(image_shape),
                  "num_classes": num_classes},
        "features": {"feature_set": chosen, "k": k, "definition": FEATURE_SETS[chosen].description,
                     "spectrum": _route_record(model, fit_images, route)},
        "feature_selection": None if aucs is None else {
            "candidates": aucs, "chosen": chosen,
            "rule": "highest out-of-fold ROC AUC on the fit set's detection set "
                    f"({SELECTION_FOLDS}-fold CV grouped by source image; a forest of {SELECTION_TREES} trees for "
                    f"'rf'), among the candidates for {list(image_shape)} images"},
        "budgets": {name: choice.as_dict() for name, choice in budgets.items()},
        "classifier": {"name": classifier, "definition": CLASSIFIERS[classifier], "seed": seed},
        "training_data": {"description": data_description, "images": int(len(fit_images)), "attacks": list(attacks),
                          "detection_set": fit_set.counts(), "attack_info": fit_set.info,
                          "negatives": "clean + noisy (Gaussian, L2 norm matched to the adversarial perturbation)",
                          "positives": "successful adversarial images of correctly classified clean images"},
        "threshold": {"value": threshold, "target_fpr": target_fpr, "clean_images": int(len(clean_scores)),
                      "clean_fpr": float(np.mean(clean_scores >= threshold)),
                      "chosen_on": "the clean fit images' scores: out-of-fold (5-fold CV grouped by source image) "
                                   "for those in the detection set, the refitted detector's for the rest"},
        "validation": val.as_dict(),
        "test": test,
        "command": command,
        "versions": {"torch": torch.__version__, "sklearn": _sklearn_version()},
    }
    return TrainingRun(Detector(fitted, chosen, k, threshold, card, route), fit_set, oof, test_set, test_scores)


def test_evaluation(model: nn.Module, detector: Detector, images: Tensor, labels: Tensor, attacks: tuple[str, ...],
                    epsilons: dict[str, float], seed: int = 0, progress: bool = False,
                    opt_params: dict[str, float] | None = None) -> tuple[DetectionSet, np.ndarray, dict]:
    """The card's "test" section: the detection set of the test images (the fit's attacks and budgets, seed + 1),
    scored once by `detector`; returns the set, its scores and the section (AUC, TPR, FPR, per attack, counts)."""
    data = build_detection_set(model, images, labels, attacks, epsilons, seed + 1, progress=progress,
                               opt_params=opt_params, route=detector.route or EXACT)
    features = batched_features(model, data.images, detector.feature_set, detector.k, progress=progress,
                                desc="test features", route=detector.route or EXACT)
    scores = detector.score_features(features)
    return data, scores, {**evaluate_scores(data, scores, detector.threshold).as_dict(),
                          "detection_set": data.counts(), "attack_info": data.info}


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__
