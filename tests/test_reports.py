"""service.reports: the detector report on a synthetic detection set with known scores (numbers checked against
sklearn), its robustness to missing parts, and the MNIST reproduction drawing with the same figure code."""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

import service.reports.figures as figures
import service.reproduce.report as repro_report
from service.detect.dataset import DEFAULT_ATTACKS, DetectionSet
from service.reports.detector_report import ReportData, write_detector_report
from service.reports.markdown import code_block, fmt, pct, table

THRESHOLD = 0.55


def detection_set(groups: dict[str, int], seed: int, attempted: dict[str, int] | None = None,
                  kinds: tuple[str, ...] = ("clean", "noisy", "adversarial")) -> ReportData:
    """`groups[name]` source images per attack group, each with one row of each kind; scores drawn so that
    adversarial rows score higher (overlapping), noisy rows a little above clean ones."""
    rng = np.random.default_rng(seed)
    parts = {k: [] for k in ("kind", "attack", "source", "norm", "score")}
    low = {"clean": 0.0, "noisy": 0.1, "adversarial": 0.4}
    for name, m in groups.items():
        for kind in kinds:
            parts["kind"] += [kind] * m
            parts["attack"] += [name] * m
            parts["source"] += list(range(m))
            parts["norm"] += list(np.zeros(m) if kind == "clean" else rng.uniform(1, 2, m))
            parts["score"] += list(rng.uniform(low[kind], low[kind] + 0.6, m))
    kind = np.array(parts["kind"], dtype=str)
    n = len(kind)
    info = {"images_given": 50, "correctly_classified": 45, "attempted": attempted or {g: 45 for g in groups},
            "epsilons": {"fgm": 1.4, "ossa": 2.0, "bim": 0.9}, "opt": {"c": 1.0, "steps": 30, "lr": 0.05},
            "seed": seed}
    data = DetectionSet(images=torch.zeros(n, 1, 4, 4), is_adversarial=kind == "adversarial", kind=kind,
                        attack=np.array(parts["attack"], dtype=str), source=np.array(parts["source"], dtype=int),
                        label=np.zeros(n, dtype=int), perturbation_norm=np.array(parts["norm"], dtype=float),
                        info=info)
    return ReportData(data, np.array(parts["score"]))


def card(with_future_keys: bool = True, with_test: bool = True) -> dict:
    out = {
        "kind": "fisher-guard detector",
        "model": {"name": "my-net", "sha256": "f" * 64, "input_shape": [3, 16, 16], "num_classes": 7},
        "features": {"feature_set": "spectral+noise", "k": 20, "definition": "eigenvalues and probes",
                     "spectrum": {"method": "exact", "max_classes": None, "error_bound": "exact to float rounding"}},
        "classifier": {"name": "rf", "definition": "RandomForestClassifier(...)", "seed": 0},
        "training_data": {"description": "fit: user.npz (50 images)", "images": 50,
                          "attacks": ["fgm", "ossa", "bim", "opt"],
                          "attack_info": {"epsilons": {"fgm": 1.4, "ossa": 2.0, "bim": 0.9}},
                          "fit": {"source": "user.npz", "count": 50, "shape": [3, 16, 16],
                                  "per_class": {"cat": 7, "dog": 8}},
                          "negatives": "clean + noisy", "positives": "successful adversarial images"},
        "threshold": {"value": THRESHOLD, "target_fpr": 0.05, "clean_images": 50, "clean_fpr": 0.04,
                      "chosen_on": "the clean fit images' scores"},
        "validation": {"auc": 0.9},
        "test": {"auc": 0.9} if with_test else None,
        "command": "fisher-guard train-detector my-net --data user.npz --epsilon fgm=1.4",
        "versions": {"torch": "2.14.1", "sklearn": "1.7.0"},
    }
    if with_future_keys:
        out["budgets"] = {
            "fgm": {"attack": "fgm", "chosen": 1.4, "grid": [], "fooling_rates": [], "target": 0.8, "reached": True,
                    "images": 0, "overridden": True, "rule": "given by the user"},
            "ossa": {"attack": "ossa", "chosen": 2.0, "grid": [1.0, 2.0, 4.0], "fooling_rates": [0.5, 0.85, None],
                     "target": 0.8, "reached": True, "images": 45, "overridden": False, "rule": "smallest budget rule"},
            "bim": {"attack": "bim", "chosen": 0.9, "grid": [0.5, 0.9], "fooling_rates": [0.0, 0.0], "target": 0.8,
                    "reached": False, "images": 45, "overridden": False, "rule": "smallest budget rule"},
        }
        out["feature_selection"] = {"candidates": {"plain": 0.8125, "spectral+noise": 0.9375, "spectral": float("nan")},
                                    "chosen": "spectral+noise", "rule": "highest out-of-fold AUC"}
    return out


def table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    """The cells of every table row whose first cell is `first_cell`."""
    rows = []
    for line in markdown.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip()[1:-1].split(" | ")]
            if cells[0] == first_cell:
                rows.append(cells)
    return rows


def assert_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        im.verify()


@pytest.fixture(scope="module")
def parts() -> tuple[ReportData, ReportData]:
    groups = {"fgm": 12, "ossa": 10}  # bim: attacked, no success; opt: no rows either
    attempted = {"fgm": 45, "ossa": 45, "bim": 45, "opt": 45}
    return detection_set(groups, 1, attempted), detection_set(groups, 2, attempted)


def test_detector_report_numbers(tmp_path: Path, parts: tuple[ReportData, ReportData]) -> None:
    test, fit = parts
    path = write_detector_report(tmp_path / "r", card(), test, fit)
    assert path == tmp_path / "r" / "report.md"
    md = path.read_text()
    for png in ("roc.png", "scores.png"):
        assert_png(tmp_path / "r" / png)
        assert f"]({png})" in md
    y, s = test.data.is_adversarial, test.scores
    (row,) = table_rows(md, "test")
    assert row[1:3] == [str(int(y.sum())), str(int((~y).sum()))]
    assert row[3] == f"{100 * roc_auc_score(y, s):.2f}"
    assert row[4] == f"{100 * np.mean(s[y] >= THRESHOLD):.1f}"
    assert row[5] == f"{100 * np.mean(s[~y] >= THRESHOLD):.1f}"
    clean = test.data.kind == "clean"
    assert row[6] == f"{100 * np.mean(s[clean] >= THRESHOLD):.1f}"
    (fit_row,) = table_rows(md, "fit (out-of-fold)")
    assert fit_row[3] == f"{100 * roc_auc_score(fit.data.is_adversarial, fit.scores):.2f}"
    # per attack: test AUC, TPR, FPR over the group's negatives; then the fit part's
    g = test.data.attack == "ossa"
    per = [r for r in table_rows(md, "ossa") if len(r) == 7]  # the operating point's table comes first
    assert per[0][1] == f"{100 * roc_auc_score(y[g], s[g]):.2f}"
    assert per[0][2] == f"{100 * np.mean(s[g & y] >= THRESHOLD):.1f}"
    assert per[0][3] == f"{100 * np.mean(s[g & ~y] >= THRESHOLD):.1f}"
    # the attack with zero successes: in the budgets table, no rows in the sets and the operating point
    bim = table_rows(md, "bim")
    assert ["bim", "0.900", "the rule (target 80%)", "0.0%", "no: the largest grid budget", "0.5: 0%, 0.9: 0%"] in bim
    assert ["bim", "no rows", "-", "-", "no rows", "-", "-"] in bim
    assert ["bim", "45", "0 / 0 / 0", "n/a", "45", "0 / 0 / 0", "n/a"] in bim
    assert ["fgm", "1.400", "given by the user", "-", "-", "-"] in table_rows(md, "fgm")
    assert ["ossa", "2.000", "the rule (target 80%)", "85.0%", "yes", "1: 50%, 2: 85%"] in table_rows(md, "ossa")
    assert table_rows(md, "opt")[0][1] == "none (C&W finds its own norm)"
    # counts: 12 sources in fgm -> 12 / 12 / 12; the median adversarial L2
    fgm = [r for r in table_rows(md, "fgm") if r[1] == "45"][0]
    rows = (fit.data.attack == "fgm") & fit.data.is_adversarial
    assert fgm[2] == "12 / 12 / 12" and fgm[3] == f"{np.median(fit.data.perturbation_norm[rows]):.3f}"
    assert table_rows(md, "all")[-1][2] == "22 / 22 / 22"
    # candidates: AUC %, the chosen one marked, NaN read n/a
    assert table_rows(md, "`spectral+noise`") == [["`spectral+noise`", "93.75", "chosen"]]
    assert table_rows(md, "`plain`") == [["`plain`", "81.25", ""]]
    assert table_rows(md, "`spectral`")[0][1] == "n/a"
    assert "Threshold 0.5500" in md and "target FPR of 5.0%" in md
    assert "fisher-guard train-detector my-net --data user.npz --epsilon fgm=1.4" in md
    assert "torch 2.14.1, sklearn 1.7.0" in md
    assert "`my-net`" in md and "3 x 16 x 16" in md and "7 classes" in md
    assert "Spectrum route: exact" in md


def test_detector_report_without_test_part_or_future_keys(tmp_path: Path, parts) -> None:
    _, fit = parts
    bare = card(with_future_keys=False, with_test=False)
    del bare["versions"], bare["command"]
    md = write_detector_report(tmp_path, bare, None, fit).read_text()
    for png in ("roc.png", "scores.png"):
        assert_png(tmp_path / png)
    assert table_rows(md, "test") == [["test", "-", "-", "n/a", "n/a", "n/a", "n/a", "n/a"]]
    auc = roc_auc_score(fit.data.is_adversarial, fit.scores)
    assert table_rows(md, "fit (out-of-fold)")[0][3] == f"{100 * auc:.2f}"
    assert "One feature set given, none compared: `spectral+noise`" in md
    assert ["fgm", "1.400", "not recorded", "-", "-", "-"] in table_rows(md, "fgm")  # from attack_info
    assert "Test images: none" in md and "Command:\n\nnot recorded" in md and "Versions: not recorded." in md
    assert "test: attacked" not in md


def test_detector_report_nan_auc_and_empty_sets(tmp_path: Path) -> None:
    """One class only (no adversarial row in the test part) gives AUC n/a; an empty fit set still reports."""
    test = detection_set({"fgm": 5}, 3, kinds=("clean", "noisy"))
    fit = detection_set({"fgm": 5}, 4)
    md = write_detector_report(tmp_path / "a", card(), test, fit).read_text()
    (row,) = table_rows(md, "test")
    assert row[1] == "0" and row[3] == "n/a" and row[4] == "n/a"
    assert_png(tmp_path / "a" / "roc.png")
    empty = detection_set({}, 5)
    thresholdless = card(with_test=False)
    del thresholdless["threshold"]
    md = write_detector_report(tmp_path / "b", thresholdless, None, empty).read_text()
    assert table_rows(md, "fit (out-of-fold)")[0][1:4] == ["0", "0", "n/a"]
    assert "Threshold n/a" in md
    for png in ("roc.png", "scores.png"):
        assert_png(tmp_path / "b" / png)


def test_report_data_checks_lengths(parts) -> None:
    with pytest.raises(ValueError, match="scores for"):
        ReportData(parts[0].data, np.zeros(3))


def test_markdown_helpers() -> None:
    assert fmt(float("nan")) == "n/a" and fmt(None) == "n/a" and fmt(1.23456, 3) == "1.235"
    assert pct(0.1234) == "12.3" and pct(float("nan")) == "n/a"
    assert table(["a", "b"], [["x|y", 1]]) == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]
    assert code_block("say `a` and ```b```") == ["````", "say `a` and ```b```", "````"]


def test_figures_write_pngs(tmp_path: Path) -> None:
    y = np.r_[np.zeros(10, bool), np.ones(10, bool)]
    s = np.linspace(0, 1, 20)
    figures.roc_figure(tmp_path / "roc.png", {"a": (y, s), "one class": (y[:5], s[:5])}, "t", {"op": (0.1, 0.8)})
    figures.score_histograms(tmp_path / "h.png", s, y, np.where(y, "adversarial", "clean"), np.array(["g"] * 20),
                             0.5, "t")
    figures.roc_panels(tmp_path / "p.png", {"A": {"a": (y, s)}, "B": {}})
    for name in ("roc.png", "h.png", "p.png"):
        assert_png(tmp_path / name)


def test_reproduction_report_uses_the_shared_figures() -> None:
    """No second copy of the plotting code: report.py draws only through service.reports.figures."""
    source = inspect.getsource(repro_report)
    tree = ast.parse(source)
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert "service.reports.figures" in imported
    assert not {m for m in imported if m and m.startswith("matplotlib")}
    called = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
              for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not called & {"savefig", "subplots", "_plt", "roc_curve", "hist", "plot", "scatter"}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_plt"]
    for name in ("roc_panels", "line_figure", "scatter_figure", "histogram_figure"):
        assert getattr(repro_report, name) is getattr(figures, name)
    assert repro_report.fmt is __import__("service.reports.markdown", fromlist=["fmt"]).fmt


def synthetic_reproduction(out: Path):
    """A Reproduction with made-up numbers of the right shape (the real one takes minutes)."""
    from service.reproduce.protocol import EPS_GRID, MODELS, EvalConfig
    from service.reproduce.run import Reproduction

    rng = np.random.default_rng(0)
    cfg = EvalConfig.make(out, quick=True, command="fisher-guard evaluate --quick")
    cfg.timings.update({"budgets (val)": 1.5, "total": 12.0})
    fs = ("plain", cfg.ours)
    counts = {a: {"clean": 10, "noisy": 10, "adversarial": 10} for a in DEFAULT_ATTACKS}
    t4 = {a: {"KD": 80.0, "BU": 70.5, "KD+BU": 85.25, "GNB plain": 75.0, "RF plain": 96.5, f"RF {cfg.ours}": 95.0,
              "positives": 10, "negatives": 20} for a in (*DEFAULT_ATTACKS, "all")}
    y = np.r_[np.zeros(20, bool), np.ones(10, bool)]
    roc = {a: {n: (y, rng.random(30) + 0.4 * y) for n in ("KD+BU", "RF plain", f"RF {cfg.ours}")} for a in t4}
    results = {
        "models": {"lenet5": {"sha256": "ab" * 32, "test_accuracy": 0.973}},
        "budgets": {"chosen": {"fgm": 3.0, "ossa": 3.0, "otcm": 4.0, "bim": 2.0}, "val_images": 18,
                    "opt": {"c": 1.0, "steps": 30, "lr": 0.05}},
        "fig2a": {"lenet5": {"fgm": list(np.linspace(0.1, 0.9, 8)), "ossa": list(np.linspace(0.2, 1.0, 8))}},
        "table2": {"epsilon": 3.0, "lenet5": {"images": 29, "fgm": {"rate": 80.0, "mean_least_norm": 2.1, "found": 25},
                                              "ossa": {"rate": 85.0, "mean_least_norm": 1.8, "found": 27}}},
        "table3": {"models": list(MODELS), "images": 12, "successes": {m: 5 for m in MODELS},
                   "crafted_from": {s: {t: 50.0 for t in MODELS} for s in MODELS}},
        "kd_bandwidth": 0.5, "detection_sets": {"val": counts, "test": counts},
        "validation": {f: {a: 90.0 for a in DEFAULT_ATTACKS} for f in fs}, "table4": t4,
        "table5": {f: {a: {b: 88.0 for b in DEFAULT_ATTACKS} for a in DEFAULT_ATTACKS} for f in fs},
        "operating_point": {f: {"threshold": 0.4, "tpr": 0.8, "fpr": 0.05} for f in fs},
        "fig3": {"images": 30, "found": 28, "pearson_log10_lambda1_vs_least_norm": -0.5},
        "fig4a": {k: {"median_log10_lambda1": 0.0} for k in ("clean", "noisy", "adversarial")},
        "shipped_detector": None, "timings": cfg.timings,
    }
    fig4 = {k: rng.normal(m, 0.3, 40) for k, m in (("clean", -1.0), ("noisy", -0.9), ("adversarial", 0.2))}
    top = rng.normal(0, 1, 28)
    assert len(EPS_GRID) == 8
    return cfg, Reproduction(results, roc, top, 2 - 0.3 * top, fig4)


def test_reproduction_report_writes_its_figures(tmp_path: Path) -> None:
    cfg, run = synthetic_reproduction(tmp_path)
    md = repro_report.write_report(cfg, run).read_text()
    for png in repro_report.FIGURES:
        assert_png(tmp_path / png)
        assert f"]({png})" in md
    assert "| paper (LeNet-5, full MNIST) | 10000 | 2.11 | 94.98 | 1.8 | 95.68 |  |" in md
    assert math.isclose(float(table_rows(md, "RF plain")[0][1]), 96.5)


def test_the_reproduction_report_adds_an_evaluations_envelope(tmp_path: Path) -> None:
    """`evaluate --report-only --robustness`: report.md written again from the saved results.json, measuring
    nothing, with the envelope of an evaluate-detector record (its numbers, budget by budget); refusals say why."""
    import json
    import shutil
    import subprocess
    import sys

    from service.evaluate.evaluation import EvaluationResult

    root = Path(__file__).resolve().parent.parent
    record = root / "bench" / "results" / "evaluation" / "lenet5-hardened" / "results.json"
    data = json.loads(record.read_text())
    result = EvaluationResult.from_dict(data)
    assert result.as_dict() == {k: data[k] for k in result.as_dict()}
    with pytest.raises(ValueError, match="lack plan"):
        EvaluationResult.from_dict({"detector": {}, "clean": {}})
    out = tmp_path / "mnist"
    out.mkdir()
    shutil.copy(root / "reports" / "mnist" / "results.json", out / "results.json")
    command = [sys.executable, "-m", "service.cli", "evaluate", "--out", str(out), "--report-only"]
    plain = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert "## Table 4" in (out / "report.md").read_text() and "Beyond the paper" not in (out / "report.md").read_text()
    run = subprocess.run([*command, "--robustness", str(record)], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    text = (out / "report.md").read_text()
    assert "## Beyond the paper" in text and "## Table 4" in text
    for budget in data["plan"]["budgets"]:
        best = next(b["tpr"] for b in data["best_of"] if b["scope"] == "white-box" and b["budget"] == budget)
        assert f"| {fmt(budget, 1)} |" in text and f"| {pct(best)} |" in text
    missing = subprocess.run([*command, "--robustness", str(tmp_path / "none.json")], cwd=root, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode != 0 and "is not a file" in missing.stderr
    (out / "results.json").unlink()
    gone = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120)
    assert gone.returncode != 0 and "does not exist" in gone.stderr
