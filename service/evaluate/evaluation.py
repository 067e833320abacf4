"""`evaluate-detector`: where a detector holds, measured on attacks and images it was not shaped around.

One call, `evaluate_detector(model, detector, fit, test, plan)`, shared by the CLI and the job. Four parts, each
on the test images only (the fit images, normally the validation split, give the squeezing baseline its threshold
and the adaptive attacker its surrogate and feature scale: what an attacker who knows the detector could build):

- held-out: the library attacks of service.evaluate.heldout at each L2 budget: fooling rate, median L2, TPR at the
  detector's threshold, AUC against the clean images, and the squeezing baseline's TPR on the same images;
- adaptive: the attacks of service.evaluate.adaptive at each budget (a TPR-against-budget curve each), plus per
  image the best of all white-box variants (an image gets through when any variant fools the model unflagged), and
  a convergence check: the white-box best-of again at twice the effort on a slice;
- shifts: FPR at the threshold under each benign shift of service.evaluate.shifts, the model's accuracy under it,
  and a different source of the same classes where the model's classes are the digits 0-9;
- squeezing: the baseline's FPR on the clean and the shifted images beside the detector's.

TPR is over the images the attack fooled (a failed attack is not a miss); `through` is the share of the attacked
images (correctly classified clean ones) that came out fooled AND unflagged: what an attacker achieves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from service.attacks.common import l2_normalize
from service.data.datasets import LabelledImages
from service.detect.detector import Detector, auc_score
from service.detect.features import batched_features
from service.evaluate import PARTS
from service.evaluate.adaptive import (
    ADAPTIVE_NAMES,
    EFFORTS,
    NOT_FOOLED,
    Effort,
    Target,
    adaptive_spec,
    available,
    feature_scale,
    fit_surrogate,
    high_confidence_loss,
    pgd_l2,
    run_adaptive,
)
from service.evaluate.heldout import HELDOUT_NAMES, run_heldout
from service.evaluate.shifts import SHIFTS, other_source
from service.evaluate.squeezing import FeatureSqueezing

DIGIT_CLASSES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class EvaluationPlan:
    """What to run and how hard: the number of attacked test images (correctly classified ones), the L2 budgets,
    the effort (`full` is the honest setting, `quick` is for tests), the double-effort check's slice, the images
    shifted, the fit images the surrogate and the baseline see, and which attacks and shifts."""

    images: int = 100
    budgets: tuple[float, ...] = (1.0, 2.0, 3.0)
    effort: str = "full"
    check_images: int = 32
    check_budget: float = 3.0
    shift_images: int = 500
    fit_images: int = 300
    parts: tuple[str, ...] = PARTS
    heldout: tuple[str, ...] = HELDOUT_NAMES
    adaptive: tuple[str, ...] = ADAPTIVE_NAMES
    shifts: tuple[str, ...] = tuple(SHIFTS)
    other_source: bool | None = None  # None: where the model's classes are the digits 0-9
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown or not self.parts:
            raise ValueError(f"parts: unknown or none {unknown} (known: {', '.join(PARTS)})")
        if self.effort not in ("quick", "full"):
            raise ValueError(f"effort must be quick or full, not {self.effort!r}")
        if not self.budgets or any(not (math.isfinite(b) and b > 0) for b in self.budgets):
            raise ValueError(f"budgets must be finite L2 norms > 0, got {list(self.budgets)}")
        for name, known, what in ((self.heldout, HELDOUT_NAMES, "held-out attack"),
                                  (self.adaptive, ADAPTIVE_NAMES, "adaptive attack"), (self.shifts, SHIFTS, "shift")):
            bad = sorted(set(name) - set(known))
            if bad:
                raise ValueError(f"unknown {what}s {bad} (known: {', '.join(known)})")
        if self.images < 1 or self.shift_images < 1 or self.fit_images < 10 or self.check_images < 0:
            raise ValueError("images and shift_images must be >= 1, fit_images >= 10, check_images >= 0")


@dataclass
class EvaluationResult:
    """Every table of the report, as plain JSON-able dicts, and the seconds each part took."""

    detector: dict[str, Any]
    plan: dict[str, Any]
    clean: dict[str, Any]
    heldout: list[dict[str, Any]] = field(default_factory=list)
    adaptive: list[dict[str, Any]] = field(default_factory=list)
    best_of: list[dict[str, Any]] = field(default_factory=list)
    effort_check: dict[str, Any] | None = None
    surrogate: dict[str, Any] | None = None
    shifts: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RESULT_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        """The result as its results.json holds it (what `as_dict` wrote; other keys ignored)."""
        missing = [k for k in ("detector", "plan", "clean") if k not in data]
        if missing:
            raise ValueError(f"an evaluation's results lack {', '.join(missing)}")
        return cls(**{k: data[k] for k in RESULT_FIELDS if k in data})


RESULT_FIELDS = ("detector", "plan", "clean", "heldout", "adaptive", "best_of", "effort_check", "surrogate", "shifts",
         "timings")  # EvaluationResult's fields, in its results.json


def _rate(flags: np.ndarray) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


def _auc(attack_scores: np.ndarray, clean_scores: np.ndarray) -> float:
    if not len(attack_scores):
        return float("nan")
    y = np.concatenate([np.zeros(len(clean_scores), bool), np.ones(len(attack_scores), bool)])
    return auc_score(y, np.concatenate([clean_scores, attack_scores]))


@dataclass
class _Screens:
    """The two screens under test, with their clean scores on the attacked images."""

    target: Target
    squeezing: FeatureSqueezing | None
    clean_scores: np.ndarray
    clean_squeeze: np.ndarray | None

    def rows(self, adversarial: Tensor, fooled: np.ndarray) -> dict[str, float]:
        """Detector TPR and AUC, and the baseline's, on the fooled adversarials."""
        x = adversarial[torch.as_tensor(fooled)]
        scores = self.target.screen(x)[0] if len(x) else np.zeros(0)
        row = {"tpr": _rate(scores >= self.target.detector.threshold), "auc": _auc(scores, self.clean_scores)}
        if self.squeezing is not None:
            squeezed = self.squeezing.score(x) if len(x) else np.zeros(0)
            row["squeezing_tpr"] = _rate(squeezed >= self.squeezing.threshold)
            row["squeezing_auc"] = _auc(squeezed, self.clean_squeeze)
        return row


def correctly_classified(model: nn.Module, data: LabelledImages, limit: int) -> tuple[Tensor, Tensor]:
    """The first `limit` images of `data` that the model classifies right (the ones an attack starts from)."""
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels).long()
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(-1).cpu() for chunk in images.split(256)])
    keep = torch.nonzero(predictions == labels).flatten()[:limit]
    return images[keep], labels[keep]


def _surrogate_rows(target: Target, images: Tensor, labels: Tensor, budgets: Sequence[float],
                    seed: int) -> Tensor:
    """Inputs that span what the surrogate must imitate: clean images, Gaussian-noised ones, and high-confidence
    PGD adversarials at each budget (the detector scoring only the last iterate: an attacker's cheap first draft)."""
    generator = torch.Generator().manual_seed(seed)
    draft = Effort(steps=20, restarts=1, check_every=20, queries=0, feature_steps=0, feature_restarts=0)
    rows = [images]
    for budget in budgets:
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        rows.append((images + budget * l2_normalize(noise)).clamp(0, 1))
        start = (images.clone(), np.full(len(images), NOT_FOOLED))
        rows.append(pgd_l2(target, high_confidence_loss(target, 5.0), images, labels, budget, draft, generator,
                           start)[0])
    return torch.cat(rows)


def build_target(model: nn.Module, detector: Detector, fit_x: Tensor, fit_y: Tensor, budgets: Sequence[float],
                 seed: int) -> tuple[Target, dict[str, Any]]:
    """The attacker's knowledge: the detector, its features' clean scale on the fit images, and a surrogate of the
    forest distilled from its scores on clean, noisy and adversarial fit images (fidelity measured on a held-out
    fifth of those rows: correlation of scores, agreement of verdicts at the threshold)."""
    target = Target(model, detector)
    clean_features = batched_features(model, fit_x, detector.feature_set, detector.k, route=detector.route)
    target.clean_mean, target.clean_std = feature_scale(clean_features)
    rows = _surrogate_rows(target, fit_x, fit_y, budgets, seed)
    features = batched_features(model, rows, detector.feature_set, detector.k, route=detector.route)
    scores = detector.score_features(features)
    order = np.random.default_rng(seed).permutation(len(rows))
    cut = len(rows) // 5
    held, train = order[:cut], order[cut:]
    target.surrogate = fit_surrogate(features[train], scores[train], seed)
    with torch.no_grad():
        predicted = torch.sigmoid(target.surrogate(torch.from_numpy(features[held]))).numpy()
    fidelity = {"rows": int(len(rows)), "held_out_rows": int(cut),
                "score_correlation": float(np.corrcoef(predicted, scores[held])[0, 1]),
                "verdict_agreement": float(np.mean((predicted >= detector.threshold) ==
                                                   (scores[held] >= detector.threshold)))}
    return target, fidelity


def _heldout_part(plan: EvaluationPlan, screens: _Screens, x: Tensor, y: Tensor) -> list[dict[str, Any]]:
    out = []
    model = screens.target.model
    for name in plan.heldout:
        start = time.perf_counter()
        result = run_heldout(name, model, x, y, plan.budgets, plan.effort, plan.seed)
        for b, budget in enumerate(result.budgets):
            fooled = result.fooled[b].numpy()
            adversarial = torch.nan_to_num(result.adversarial[b])
            row = {"attack": name, "budget": budget, "images": int(len(x)), "fooling_rate": _rate(fooled),
                   "median_l2": result.median_norms()[b], **screens.rows(adversarial, fooled)}
            row["through"] = float(np.mean(fooled & ~_flags(screens.target, adversarial)))
            out.append(row)
        out[-1]["seconds"] = round(time.perf_counter() - start, 1)
    return out


def _flags(target: Target, images: Tensor) -> np.ndarray:
    return target.screen(images)[0] >= target.detector.threshold


def _adaptive_part(plan: EvaluationPlan, screens: _Screens, x: Tensor,
                   y: Tensor) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per attack and budget; then per budget the per-image best-of over the white-box variants and over
    every adaptive attacker."""
    rows, through = [], {}
    for name in plan.adaptive:
        if not available(adaptive_spec(name), screens.target):
            continue
        start = time.perf_counter()
        for budget in plan.budgets:
            result = run_adaptive(name, screens.target, x, y, budget, plan.effort, plan.seed)
            fooled = result.fooled
            through[name, budget] = fooled & ~result.flagged
            rows.append({"attack": name, "budget": budget, "images": int(len(x)), "fooling_rate": _rate(fooled),
                         "median_l2": float(np.median(result.norms[fooled])) if fooled.any() else float("nan"),
                         **screens.rows(result.adversarial, fooled), "through": _rate(through[name, budget]),
                         "fooled_mask": fooled})
        rows[-1]["seconds"] = round(time.perf_counter() - start, 1)
    best = []
    for budget in plan.budgets:
        for scope, names in (("white-box", [n for n in plan.adaptive if adaptive_spec(n).white_box]),
                             ("any adaptive", list(plan.adaptive))):
            got = [through[n, budget] for n in names if (n, budget) in through]
            fooled = [r["fooled_mask"] for r in rows if r["budget"] == budget and r["attack"] in names]
            if not got:
                continue
            through_any = np.any(got, axis=0)
            fooled_any = np.any(fooled, axis=0)
            best.append({"scope": scope, "budget": budget, "attacks": [n for n in names if (n, budget) in through],
                         "images": int(len(x)), "fooled_by_any": _rate(fooled_any), "through": _rate(through_any),
                         "tpr": 1.0 - float(through_any.sum()) / fooled_any.sum() if fooled_any.any() else
                         float("nan")})
    for row in rows:
        row.pop("fooled_mask")
    return rows, best


def _effort_check(plan: EvaluationPlan, target: Target, x: Tensor, y: Tensor) -> dict[str, Any] | None:
    """The white-box best-of at `check_budget` on the first `check_images` images, at the plan's effort and at
    twice it (`double`): if twice the effort lets more images through, the figures are not yet an upper bound."""
    names = [n for n in plan.adaptive if adaptive_spec(n).white_box and available(adaptive_spec(n), target)]
    if not names or plan.check_images == 0:
        return None
    x, y = x[:plan.check_images], y[:plan.check_images]
    through = {}
    for effort in (plan.effort, "double"):
        got = [run_adaptive(n, target, x, y, plan.check_budget, EFFORTS[effort], plan.seed) for n in names]
        through[effort] = np.any([r.fooled & ~r.flagged for r in got], axis=0)
    return {"budget": plan.check_budget, "images": int(len(x)), "attacks": names, "effort": plan.effort,
            "through": _rate(through[plan.effort]), "through_double": _rate(through["double"]),
            "more_through_at_double": int((through["double"] & ~through[plan.effort]).sum())}


def _shift_part(plan: EvaluationPlan, screens: _Screens, data: LabelledImages, model: nn.Module,
                class_names: Sequence[str]) -> list[dict[str, Any]]:
    images = torch.from_numpy(data.images[:plan.shift_images])
    labels = data.labels[:plan.shift_images]
    sets: list[tuple[str, bool, Callable[[], tuple[Tensor, np.ndarray]]]] = [
        ("clean", True, lambda: (images, labels))]
    for name in plan.shifts:
        shift = SHIFTS[name]
        sets.append((name, shift.mild, lambda shift=shift: (shift(images), labels)))
    wants_other = plan.other_source if plan.other_source is not None else list(class_names) == DIGIT_CLASSES
    if wants_other:
        def other() -> tuple[Tensor, np.ndarray]:
            source = other_source(tuple(images.shape[1:]), limit=plan.shift_images)
            return torch.from_numpy(source.images), source.labels
        sets.append(("other-source", False, other))
    out = []
    for name, mild, make in sets:
        shifted, truth = make()
        scores, predictions = screens.target.screen(shifted)
        row = {"shift": name, "mild": mild, "images": int(len(shifted)),
               "accuracy": float(np.mean(predictions == truth)),
               "fpr": _rate(scores >= screens.target.detector.threshold)}
        if screens.squeezing is not None:
            row["squeezing_fpr"] = _rate(screens.squeezing.score(shifted) >= screens.squeezing.threshold)
        out.append(row)
    return out


def evaluate_detector(model: nn.Module, detector: Detector, fit: LabelledImages, test: LabelledImages,
                      plan: EvaluationPlan, class_names: Sequence[str] = (),
                      progress: Callable[[str], None] | None = None) -> EvaluationResult:
    """Run the plan's parts against `detector` on `test`; `fit` gives the baseline's threshold and the attacker's
    surrogate. `progress` is told each part as it starts."""
    say = progress or (lambda _: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    fit_x, fit_y = correctly_classified(model, fit, plan.fit_images)
    x, y = correctly_classified(model, test, plan.images)
    target_fpr = float((detector.card.get("threshold") or {}).get("target_fpr", 0.05))
    squeezing = None
    if "squeezing" in plan.parts:
        squeezing = FeatureSqueezing.for_images(model, tuple(x.shape[1:])).fit(fit_x, target_fpr)
    needs_target = "adaptive" in plan.parts and any(adaptive_spec(n).needs for n in plan.adaptive)
    say("attacker's knowledge (feature scale, surrogate)" if needs_target else "clean images")
    target, fidelity = (build_target(model, detector, fit_x, fit_y, plan.budgets, plan.seed) if needs_target
                        else (Target(model, detector), None))
    clean_scores = target.screen(x)[0]
    screens = _Screens(target, squeezing, clean_scores, None if squeezing is None else squeezing.score(x))
    timings["setup"] = time.perf_counter() - start
    result = EvaluationResult(
        detector={"feature_set": detector.feature_set, "k": detector.k, "threshold": detector.threshold,
                  "target_fpr": target_fpr, "model": detector.card.get("model", {}).get("name"),
                  "sha256": detector.card.get("sha256")},
        plan={**{k: getattr(plan, k) for k in ("images", "budgets", "effort", "check_images", "check_budget",
                                              "shift_images", "fit_images", "parts", "seed")},
              "heldout": list(plan.heldout), "adaptive": list(plan.adaptive), "attacked_images": int(len(x))},
        clean={"images": int(len(x)), "fpr": _rate(clean_scores >= detector.threshold),
               "squeezing_threshold": None if squeezing is None else squeezing.threshold,
               "squeezing_fpr": None if squeezing is None else _rate(screens.clean_squeeze >= squeezing.threshold)},
        surrogate=fidelity)
    def timed(name: str, label: str, work: Callable[[], Any]) -> Any:
        say(label)
        begun = time.perf_counter()
        out = work()
        timings[name] = time.perf_counter() - begun
        return out

    if "heldout" in plan.parts:
        result.heldout = timed("heldout", "held-out attacks", lambda: _heldout_part(plan, screens, x, y))
    if "adaptive" in plan.parts:
        result.adaptive, result.best_of = timed("adaptive", "adaptive attacks",
                                                lambda: _adaptive_part(plan, screens, x, y))
        result.effort_check = timed("effort_check", "effort check (twice the effort)",
                                    lambda: _effort_check(plan, target, x, y))
    if "shifts" in plan.parts:
        result.shifts = timed("shifts", "benign shifts", lambda: _shift_part(plan, screens, test, model, class_names))
    result.timings = {k: round(v, 1) for k, v in timings.items()}
    return result
