"""The `evaluate-detector` report: report.md (the four parts as tables), results.json, and the TPR-against-budget
figure of the adaptive attacks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.evaluate.adaptive import ADAPTIVE_SPECS
from service.evaluate.evaluation import EvaluationResult
from service.evaluate.heldout import HELDOUT_SPECS
from service.reports.figures import line_figure
from service.reports.markdown import fmt, pct, table


def _attack_rows(rows: list[dict[str, Any]], titles: dict[str, str]) -> list[list[Any]]:
    return [[titles.get(r["attack"], r["attack"]), fmt(r["budget"], 1), pct(r["fooling_rate"]), fmt(r["median_l2"]),
             pct(r["tpr"]), pct(r["auc"]), pct(r["through"]), pct(r.get("squeezing_tpr"))] for r in rows]


ATTACK_HEADER = ["attack", "L2 budget", "fooled %", "median L2", "TPR %", "AUC %", "through %",
                 "squeezing TPR %"]


def envelope(result: EvaluationResult) -> list[list[Any]]:
    """Per budget, the worst TPR over the held-out attacks, the adaptive white-box best-of TPR and the
    score-query TPR: what is detected, at which budget, against which attacker."""
    rows = []
    for budget in result.plan["budgets"]:
        heldout = [r["tpr"] for r in result.heldout if r["budget"] == budget and r["tpr"] == r["tpr"]]
        worst = min(heldout, default=None)
        worst_name = next((r["attack"] for r in result.heldout if r["budget"] == budget and r["tpr"] == worst), "")
        best = next((b["tpr"] for b in result.best_of if b["scope"] == "white-box" and b["budget"] == budget), None)
        query = next((r["tpr"] for r in result.adaptive if r["attack"] == "score-query" and r["budget"] == budget),
                     None)
        rows.append([fmt(budget, 1), f"{pct(worst)} ({worst_name})" if worst is not None else "n/a", pct(best),
                     pct(query)])
    return rows


def mild_shift_line(result: EvaluationResult) -> str:
    clean = next((r["fpr"] for r in result.shifts if r["shift"] == "clean"), None)
    mild = [r for r in result.shifts if r["mild"] and r["shift"] != "clean"]
    if not mild or clean is None:
        return ""
    worst = max(mild, key=lambda r: r["fpr"])
    return (f"Benign shifts: clean FPR {pct(clean)}% on the shifted set's images; the worst mild shift is "
            f"{worst['shift']} at {pct(worst['fpr'])}% FPR.")


def write_evaluation_report(out: Path, result: EvaluationResult, *, command: str, machine: str) -> Path:
    """Write `out`/report.md, results.json and adaptive-tpr.png; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    data = result.as_dict()
    (out / "results.json").write_text(json.dumps({**data, "command": command, "machine": machine}, indent=1,
                                                 default=float))
    d, p, c = result.detector, result.plan, result.clean
    lines = [f"# Detector evaluation: {d['model']} ({d['feature_set']}, k={d['k']})", "",
             f"Command: `{command}`", "", f"Machine: {machine}", "",
             f"Threshold {fmt(d['threshold'], 4)} (set at {pct(d['target_fpr'])}% FPR on clean fit images). "
             f"Effort `{p['effort']}`; {p['attacked_images']} attacked test images (correctly classified); "
             f"L2 budgets {', '.join(fmt(b, 1) for b in p['budgets'])}; seed {p['seed']}.", "",
             "TPR is over the images an attack fooled; *through* is the share of the attacked images that came out "
             "fooled and unflagged (what the attacker gets). AUC: the fooled adversarials' scores against the "
             "attacked images' clean scores.", "",
             f"Clean test images: FPR {pct(c['fpr'])}% (detector)"
             + ("" if c["squeezing_fpr"] is None else f", {pct(c['squeezing_fpr'])}% (feature squeezing)") + ".",
             ""]
    if result.heldout or result.adaptive:
        lines += ["## Envelope", "",
                  *table(["L2 budget", "held-out: worst TPR %", "adaptive white-box best-of TPR %",
                          "score-query TPR %"], envelope(result)), "", mild_shift_line(result), ""]
    if result.heldout:
        lines += ["## Held-out attacks (ART)", "",
                  "Attacks from a library nobody here wrote, at their tuned `full` effort (service/evaluate/heldout.py "
                  "records the tuning).", "",
                  *table(ATTACK_HEADER, _attack_rows(result.heldout, {k: s.title for k, s in HELDOUT_SPECS.items()})),
                  ""]
    if result.adaptive:
        lines += ["## Adaptive attacks", "",
                  "Attackers who know the detector (service/evaluate/adaptive.py): each image keeps its best "
                  "candidate over the attack's settings, scored by the real detector.", "",
                  *table(ATTACK_HEADER, _attack_rows(result.adaptive, {k: s.title for k, s in ADAPTIVE_SPECS.items()})),
                  "", "### Per-image best-of", "",
                  "An image gets through when any variant fools the model unflagged; TPR = 1 - through / fooled by "
                  "any.", "",
                  *table(["scope", "L2 budget", "fooled by any %", "through %", "TPR %", "attacks"],
                         [[b["scope"], fmt(b["budget"], 1), pct(b["fooled_by_any"]), pct(b["through"]), pct(b["tpr"]),
                           ", ".join(b["attacks"])] for b in result.best_of]), "",
                  "![TPR against the L2 budget](adaptive-tpr.png)", ""]
        budgets = p["budgets"]
        series = {name: [next((r["tpr"] for r in result.adaptive if r["attack"] == name and r["budget"] == b), None)
                         for b in budgets] for name in dict.fromkeys(r["attack"] for r in result.adaptive)}
        series["best-of (white-box)"] = [next((r["tpr"] for r in result.best_of if r["scope"] == "white-box" and
                                               r["budget"] == b), None) for b in budgets]
        line_figure(out / "adaptive-tpr.png", budgets, series, xlabel="L2 budget", ylabel="TPR (fooled images)",
                    title="Adaptive attacks", linestyles={"best-of (white-box)": "--"})
    if result.effort_check:
        e = result.effort_check
        verdict = ("twice the effort let no more images through: the figures are converged at this effort"
                   if e["more_through_at_double"] == 0 else
                   f"twice the effort let {e['more_through_at_double']} more image(s) through: the adaptive figures "
                   "are NOT yet an upper bound")
        lines += ["### Effort check", "",
                  f"White-box best-of at L2 {fmt(e['budget'], 1)} on the first {e['images']} attacked images: through "
                  f"{pct(e['through'])}% at `{e['effort']}`, {pct(e['through_double'])}% at `double`; {verdict}.", ""]
    if result.surrogate:
        s = result.surrogate
        lines += [f"Surrogate of the forest: {s['rows']} fit rows (clean, noisy, adversarial); on a held-out fifth, "
                  f"score correlation {fmt(s['score_correlation'])}, verdict agreement "
                  f"{pct(s['verdict_agreement'])}%.", ""]
    if result.shifts:
        clean_fpr = next((r["fpr"] for r in result.shifts if r["shift"] == "clean"), float("nan"))
        lines += ["## Benign shifts", "",
                  "FPR at the threshold on shifted clean test images (all, whatever the model predicts). *mild*: "
                  "within the limits a screen should tolerate (blur sigma <= 1, brightness and contrast 0.8-1.2, "
                  "rotation <= 10 degrees, translation <= 2 px, JPEG quality >= 50); target: FPR <= 2x clean.", "",
                  *table(["shift", "mild", "images", "model accuracy %", "FPR %", "x clean", "squeezing FPR %"],
                         [[r["shift"], "yes" if r["mild"] else "", r["images"], pct(r["accuracy"]), pct(r["fpr"]),
                           fmt(r["fpr"] / clean_fpr if clean_fpr else float("nan"), 1), pct(r.get("squeezing_fpr"))]
                          for r in result.shifts]), ""]
    lines += ["## Timings (s)", "", *table(list(result.timings), [list(result.timings.values())]), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
