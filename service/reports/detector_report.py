"""The report of a detector trained for a user's model: `report.md` with `roc.png` and `scores.png`, from its card
and the scores of its detection sets. It draws with the figures of the MNIST reproduction (service.reports.figures).

What it shows: the model and data, the attack budgets, the candidate feature sets compared, the operating point
(threshold, target FPR, measured AUC / TPR / FPR overall and per attack), the detection sets' counts, the command
and the versions. Keys the card lacks are skipped or read "n/a"; so are a missing test part, an AUC with one class
missing and an attack without any success."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.detect.dataset import DetectionSet
from service.detect.detector import Evaluation, evaluate_scores
from service.reports.figures import KINDS, roc_figure, score_histograms
from service.reports.markdown import code_block, fmt, pct, table

REPORT = "report.md"
ROC_PNG = "roc.png"
SCORES_PNG = "scores.png"


@dataclass
class ReportData:
    """A detection set and its scores: out-of-fold scores for the fit part, the detector's for the test part."""

    data: DetectionSet
    scores: np.ndarray

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.shape != (len(self.data),):
            raise ValueError(f"ReportData: {self.scores.shape[0] if self.scores.ndim else 0} scores for "
                             f"{len(self.data)} rows")


def write_detector_report(out: Path, card: dict, test: ReportData | None, fit: ReportData) -> Path:
    """Write `<out>/report.md`, `<out>/roc.png` and `<out>/scores.png`; return the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threshold = _threshold(card)
    name = _d(card.get("model")).get("name") or "model"
    feature_set = _d(card.get("features")).get("feature_set")
    curves, points = {}, {}
    for label, part in (("test", test), ("fit, out-of-fold", fit)):
        if part is None:
            continue
        measured = _measure(part, threshold)
        curves[f"{label}, all attacks (AUC {pct(measured.auc, 2)}%)"] = (part.data.is_adversarial, part.scores)
        points[f"{label} at the threshold"] = (measured.fpr, measured.tpr)
    if test is not None:
        for attack in dict.fromkeys(test.data.attack.tolist()):
            rows = test.data.attack == attack
            curves[f"test, {attack}"] = (test.data.is_adversarial[rows], test.scores[rows])
    roc_figure(out / ROC_PNG, curves, f"ROC: {name} detector" + (f" ({feature_set})" if feature_set else ""), points)
    shown, part_name = (test, "test") if test is not None else (fit, "fit (out-of-fold)")
    score_histograms(out / SCORES_PNG, shown.scores, shown.data.is_adversarial, shown.data.kind, shown.data.attack,
                     threshold, f"Scores, {part_name} detection set (dashed: the threshold)")
    path = out / REPORT
    path.write_text(detector_markdown(card, test, fit))
    return path


def detector_markdown(card: dict, test: ReportData | None, fit: ReportData) -> str:
    """The report's Markdown (figures referenced by their file names in the same folder)."""
    model = _d(card.get("model"))
    lines = [f"# Detector report: `{model.get('name') or 'model'}`", "",
             "From the detector's card and the scores of its detection sets: out-of-fold scores (cross-validation "
             "grouped by source image) on the fit part, the trained detector's scores on the test part"
             + ("" if test is not None else " (none here: no test images were given)") + "."
             + (f" Training took {fmt(card['wall_time_s'], 0)} s." if _number(card.get("wall_time_s")) else ""), ""]
    attacks = _attacks(card, test, fit)
    threshold = _threshold(card)
    lines += _model_and_data(card, test)
    lines += _budgets(card, attacks, fit)
    lines += _feature_sets(card)
    lines += _operating_point(card, attacks, threshold, test, fit)
    lines += _detection_sets(card, attacks, test, fit)
    lines += ["## Figures", "",
              f"ROC curves ({'test and ' if test is not None else ''}fit out-of-fold; dots: the threshold): "
              f"![roc]({ROC_PNG})", "",
              f"Scores per attack on the {'test' if test is not None else 'fit (out-of-fold)'} detection set, clean vs "
              f"noisy vs adversarial rows, the threshold dashed: ![scores]({SCORES_PNG})", ""]
    lines += _provenance(card)
    return "\n".join(lines)


def _d(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _threshold(card: dict) -> float:
    value = _d(card.get("threshold")).get("value")
    return float(value) if _number(value) else float("nan")


def _attacks(card: dict, test: ReportData | None, fit: ReportData) -> list[str]:
    """The attacks trained on (the card's list), then any other group the detection sets hold."""
    listed = list(_d(card.get("training_data")).get("attacks") or [])
    seen = [a for part in (fit, test) if part is not None for a in part.data.attack.tolist()]
    return list(dict.fromkeys([*listed, *_d(card.get("budgets")), *seen]))


def _measure(part: ReportData, threshold: float) -> Evaluation:
    """evaluate_scores at the threshold; without a finite threshold only the AUCs are kept."""
    if math.isfinite(threshold):
        return evaluate_scores(part.data, part.scores, threshold)
    ev = evaluate_scores(part.data, part.scores, math.inf)
    nan = float("nan")
    ev.tpr = ev.fpr = ev.clean_fpr = ev.noisy_fpr = nan
    for values in ev.per_attack.values():
        values["tpr"] = nan
    return ev


def _group_fpr(part: ReportData, attack: str, threshold: float) -> float:
    rows = (part.data.attack == attack) & ~part.data.is_adversarial
    return float((part.scores[rows] >= threshold).mean()) if rows.any() and math.isfinite(threshold) else float("nan")


def _info(card_part: Any, part: ReportData | None) -> dict:
    """The detection set's attack info: from the set itself, else from the card."""
    return part.data.info if part is not None and part.data.info else _d(_d(card_part).get("attack_info"))


def _model_and_data(card: dict, test: ReportData | None) -> list[str]:
    model, data = _d(card.get("model")), _d(card.get("training_data"))
    feats, clf = _d(card.get("features")), _d(card.get("classifier"))
    sha = model.get("sha256")
    shape = model.get("input_shape")
    lines = ["## Model and data", "",
             f"- Model: `{model.get('name') or 'n/a'}`"
             + (f", sha256 `{sha[:16]}..`" if sha else ", sha256 not recorded")
             + (f", input {' x '.join(str(s) for s in shape)}" if shape else "")
             + (f", {model['num_classes']} classes" if model.get("num_classes") else "") + "."]
    if data.get("description"):
        lines.append(f"- Data: {data['description']}.")
    for part in ("fit", "test"):
        described = _d(data.get(part))
        if described:
            per_class = _d(described.get("per_class"))
            lines.append(f"- {part.capitalize()} images: {described.get('count', 'n/a')} from "
                         f"`{described.get('source', 'n/a')}`"
                         + (f", {len(per_class)} classes ({min(per_class.values())}-{max(per_class.values())} "
                            "images each)" if per_class else "") + ".")
    if not _d(data.get("fit")) and data.get("images") is not None:
        lines.append(f"- Fit images: {data['images']}.")
    if test is None and card.get("test") is None:
        lines.append("- Test images: none; every measure below is out-of-fold on the fit part.")
    if data.get("positives") or data.get("negatives"):
        lines.append(f"- Positives: {data.get('positives', 'n/a')}; negatives: {data.get('negatives', 'n/a')}.")
    if feats:
        lines.append(f"- Features: `{feats.get('feature_set', 'n/a')}`"
                     + (f", top {feats['k']} eigenvalues" if feats.get("k") else "")
                     + (f": {feats['definition']}" if feats.get("definition") else "") + ".")
    spectrum = _d(card.get("spectrum")) or _d(feats.get("spectrum"))
    if spectrum:
        lines.append(f"- Spectrum route: {spectrum.get('method', 'n/a')}"
                     + (f", the {spectrum['max_classes']} most probable classes" if spectrum.get("max_classes") else "")
                     + (f"; error bound: {spectrum['error_bound']}" if spectrum.get("error_bound") else "") + ".")
        mass = _d(spectrum.get("discarded_mass"))
        if mass:
            lines.append(f"- Discarded probability mass on {mass.get('images', 'n/a')} clean fit images: median "
                         f"{fmt(mass.get('median'), 4)}, max {fmt(mass.get('max'), 4)}.")
    if clf:
        lines.append(f"- Classifier: `{clf.get('name', 'n/a')}`"
                     + (f" ({clf['definition']})" if clf.get("definition") else "")
                     + (f", seed {clf['seed']}" if clf.get("seed") is not None else "") + ".")
    return lines + [""]


def _rates(grid: list, rates: list) -> str:
    pairs = [f"{g:g}: {pct(r, 0)}%" for g, r in zip(grid, rates, strict=False) if r is not None]
    return ", ".join(pairs) if pairs else "-"


def _budgets(card: dict, attacks: list[str], fit: ReportData) -> list[str]:
    budgets = _d(card.get("budgets"))
    info = _info(_d(card.get("training_data")), fit)
    eps = _d(info.get("epsilons"))
    lines = ["## Attack budgets", "", "L2 norms in [0, 1] pixel space."]
    rules = {b.get("rule") for b in budgets.values() if isinstance(b, dict) and not b.get("overridden")} - {None}
    if len(rules) == 1:
        lines[-1] += f" Rule: {rules.pop()}."
    lines.append("")
    rows = []
    for attack in attacks:
        if attack == "opt":
            opt = _d(info.get("opt"))
            rows.append([attack, "none (C&W finds its own norm)",
                         "C&W with " + (", ".join(f"{k} {v}" for k, v in opt.items()) or "its defaults"), "-", "-",
                         "-"])
            continue
        b = _d(budgets.get(attack))
        if b:
            grid, rates = list(b.get("grid") or []), list(b.get("fooling_rates") or [])
            chosen = b.get("chosen")
            at = rates[grid.index(chosen)] if chosen in grid and grid.index(chosen) < len(rates) else None
            target = b.get("target")
            how = "given by the user" if b.get("overridden") else "the rule" + (
                f" (target {pct(target, 0)}%)" if _number(target) else "")
            reached = "-" if b.get("overridden") else ("yes" if b.get("reached") else "no: the largest grid budget")
            rows.append([attack, fmt(chosen, 3) if _number(chosen) else "n/a", how,
                         f"{pct(at)}%" if at is not None else "-", reached, _rates(grid, rates)])
        else:
            e = eps.get(attack)
            rows.append([attack, fmt(e, 3) if _number(e) else "n/a", "not recorded", "-", "-", "-"])
    header = ["attack", "L2 budget", "chosen by", "fooling rate there", "target reached", "fooling rate per budget"]
    return lines + table(header, rows) + [""]


def _feature_sets(card: dict) -> list[str]:
    selection = _d(card.get("feature_selection"))
    used = _d(card.get("features")).get("feature_set")
    lines = ["## Feature sets compared", ""]
    candidates = _d(selection.get("candidates"))
    if not candidates:
        return lines + [f"One feature set given, none compared: `{used or 'n/a'}`.", ""]
    chosen = selection.get("chosen") or used
    if selection.get("rule"):
        lines += [f"Chosen by the {selection['rule']}.", ""]
    rows = [[f"`{name}`", pct(auc, 2), "chosen" if name == chosen else ""] for name, auc in candidates.items()]
    return lines + table(["feature set", "out-of-fold AUC %", ""], rows) + [""]


def _operating_point(card: dict, attacks: list[str], threshold: float, test: ReportData | None,
                     fit: ReportData) -> list[str]:
    thr = _d(card.get("threshold"))
    lines = ["## Operating point", ""]
    sentence = f"Threshold {fmt(threshold, 4)} (verdict: adversarial when score >= threshold)"
    if _number(thr.get("target_fpr")):
        sentence += f", at a target FPR of {pct(thr['target_fpr'])}%"
    if thr.get("clean_images") is not None:
        sentence += f", set on {thr['clean_images']} clean fit images"
        if _number(thr.get("clean_fpr")):
            sentence += f" (their FPR {pct(thr['clean_fpr'])}%)"
    sentence += "."
    if thr.get("chosen_on"):
        sentence += f" Chosen on {thr['chosen_on']}."
    lines += [sentence, ""]
    parts = [(name, part, _measure(part, threshold)) for name, part in (("test", test), ("fit (out-of-fold)", fit))
             if part is not None]
    rows = [[name, ev.rows["positives"], ev.rows["negatives"], pct(ev.auc, 2), pct(ev.tpr), pct(ev.fpr),
             pct(ev.clean_fpr), pct(ev.noisy_fpr)] for name, _, ev in parts]
    if test is None:
        rows.insert(0, ["test", "-", "-", "n/a", "n/a", "n/a", "n/a", "n/a"])
    lines += table(["part", "positives", "negatives", "AUC %", "TPR %", "FPR %", "clean FPR %", "noisy FPR %"], rows)
    lines += ["", "Per attack (FPR over that attack's clean and noisy rows):", ""]
    header = ["attack"]
    for name, _, _ in parts:
        header += [f"{name} AUC %", f"{name} TPR %", f"{name} FPR %"]
    per_rows = []
    for attack in attacks:
        cells = [attack]
        for _, part, ev in parts:
            values = ev.per_attack.get(attack)
            if values is None:
                cells += ["no rows", "-", "-"]
            else:
                cells += [pct(values["auc"], 2), pct(values["tpr"]), pct(_group_fpr(part, attack, threshold))]
        per_rows.append(cells)
    return lines + table(header, per_rows) + [""]


def _counts(part: ReportData | None, card_part: Any, attack: str) -> tuple[Any, str, str]:
    """(attacked images, "clean / noisy / adversarial", median adversarial L2) of one attack group."""
    if part is None:
        return "-", "-", "-"
    info = _info(card_part, part)
    attempted = _d(info.get("attempted")).get(attack, "n/a")
    rows = part.data.attack == attack
    counts = [int((rows & (part.data.kind == k)).sum()) for k in KINDS]
    adv = part.data.perturbation_norm[rows & part.data.is_adversarial]
    return attempted, " / ".join(str(c) for c in counts), fmt(float(np.median(adv)), 3) if len(adv) else "n/a"


def _detection_sets(card: dict, attacks: list[str], test: ReportData | None, fit: ReportData) -> list[str]:
    lines = ["## Detection sets", "",
             "Per attack: the correctly classified images attacked, and the rows kept (each success gives its "
             "adversarial image, its clean image and a noisy copy of the same L2 norm); an attack without any success "
             "has no rows.", ""]
    header = ["attack", "fit: attacked", "fit: clean / noisy / adversarial", "fit: median adversarial L2"]
    if test is not None:
        header += ["test: attacked", "test: clean / noisy / adversarial", "test: median adversarial L2"]
    card_fit, card_test = card.get("training_data"), card.get("test")
    rows = []
    for attack in attacks:
        cells = [attack, *_counts(fit, card_fit, attack)]
        if test is not None:
            cells += _counts(test, card_test, attack)
        rows.append(cells)
    total = ["all", "", " / ".join(str(int((fit.data.kind == k).sum())) for k in KINDS), ""]
    if test is not None:
        total += ["", " / ".join(str(int((test.data.kind == k).sum())) for k in KINDS), ""]
    rows.append(total)
    lines += table(header, rows)
    for name, info in (("fit", _info(card_fit, fit)), ("test", _info(card_test, test) if test else {})):
        if info.get("images_given") is not None:
            lines += ["", f"{name.capitalize()}: {info['images_given']} images given, "
                          f"{info.get('correctly_classified', 'n/a')} classified correctly (the ones attacked)"
                      + (f"; seed {info['seed']}" if info.get("seed") is not None else "") + "."]
    return lines + [""]


def _provenance(card: dict) -> list[str]:
    lines = ["## Provenance", "", "Command:", ""]
    command = card.get("command")
    lines += code_block(str(command)) if command else ["not recorded"]
    versions = _d(card.get("versions"))
    lines += ["", "Versions: " + (", ".join(f"{k} {v}" for k, v in versions.items()) if versions else "not recorded")
              + ".", ""]
    return lines
