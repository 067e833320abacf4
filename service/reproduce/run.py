"""The run of the paper's MNIST reproduction (Tables 2-5, Figures 2a, 3, 4a, ROC curves; protocol.py says
how): `run_evaluation` returns the results and the arrays behind the figures; report.py writes them."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from service.attacks import direction_attack, least_norm_search
from service.detect.baselines import KernelDensityScorer, bayesian_uncertainty
from service.detect.budgets import select_budgets as budgets_by_rule
from service.detect.dataset import (
    DEFAULT_ATTACKS,
    MNIST_EPSILONS,
    OPT_PARAMS,
    DetectionSet,
    build_detection_set,
    protocol_options,
    run_attack,
)
from service.detect.detector import auc_score, fit_classifier, out_of_fold_scores, threshold_at_fpr
from service.detect.features import candidate_features, log_eigenvalues
from service.reproduce.protocol import (
    EPS_GRID,
    FEATURE_SETS_COMPARED,
    MODELS,
    SELECT_RATE,
    TABLE3_EPSILON,
    EvalConfig,
)


def predict(model: nn.Module, x: Tensor) -> Tensor:
    """The model's logits, without gradients."""
    with torch.no_grad():
        return model(x)


def _correct(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    ok = predict(model, images).argmax(-1) == labels
    return images[ok], labels[ok]


def one_step_curve(model: nn.Module, images: Tensor, labels: Tensor, attack: str, grid=EPS_GRID) -> list[float]:
    """Fooling rate of FGM or OSSA at each epsilon (the direction is computed once)."""
    at = direction_attack(model, images, labels, attack, "exact")
    return [float((predict(model, at(e)).argmax(-1) != labels).float().mean()) for e in grid]


def select_budgets(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[dict[str, float], dict[str, list[float]]]:
    """On validation images: fooling rate per attack over EPS_GRID; the smallest epsilon reaching SELECT_RATE (the
    rule of service.detect.budgets, on the paper's MNIST grid, with the whole curve measured for the report)."""
    attacks = {a: protocol_options(a, 0) for a in ("fgm", "ossa", "otcm", "bim")}
    choices = budgets_by_rule(model, images, labels, attacks, grid=list(EPS_GRID), target=SELECT_RATE,
                              max_images=len(images), full_curve=True)
    return {a: c.chosen for a, c in choices.items()}, {a: c.fooling_rates for a, c in choices.items()}


def _timed(cfg: EvalConfig, name: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            cfg.timings[name] = round(time.perf_counter() - self.t, 1)
    return _T()


def table2(models: dict[str, nn.Module], test: tuple[Tensor, Tensor], cfg: EvalConfig, epsilon: float) -> dict:
    """Fooling rate at `epsilon` and mean least L2 norm (binary search in [0, 6]) of FGM and OSSA, per model."""
    out = {}
    for name in ("lenet5", "vgg-shallow"):
        if name not in models:
            continue
        n = cfg.n_table2 if name == "lenet5" else cfg.n_table2_vgg
        x, y = _correct(models[name], test[0][:n], test[1][:n])
        row = {"images": int(len(x))}
        for attack in ("fgm", "ossa"):
            res = run_attack(models[name], attack, x, y, epsilon)
            ln = least_norm_search(models[name], x, y, attack, low=0.0, high=6.0, tol=1e-2, method="exact")
            found = ln.found.cpu().numpy()
            row[attack] = {"rate": 100 * res.fooling_rate, "mean_least_norm": float(ln.least_norm[ln.found].mean()),
                           "found": int(found.sum()), "least_norm": ln.least_norm.cpu().numpy().tolist()}
        out[name] = row
    return out


def table3(models: dict[str, nn.Module], test: tuple[Tensor, Tensor], cfg: EvalConfig) -> dict:
    """OSSA at epsilon 2.0 crafted on each model, fooling rate on each model: over images every model classifies
    correctly and whose attack succeeded on the source model (so the diagonal is 100 by construction)."""
    names = [m for m in MODELS if m in models]
    x, y = test[0][:cfg.n_table3], test[1][:cfg.n_table3]
    ok = torch.ones(len(x), dtype=torch.bool)
    for m in names:
        ok &= (predict(models[m], x).argmax(-1) == y).cpu()
    x, y = x[ok], y[ok]
    matrix, counts = {}, {}
    for src in names:
        res = run_attack(models[src], "ossa", x, y, TABLE3_EPSILON)
        adv = res.adversarial[res.fooled]
        counts[src] = int(res.fooled.sum())
        matrix[src] = {t: (100 * float((predict(models[t], adv).argmax(-1) != y[res.fooled]).float().mean())
                           if len(adv) else float("nan")) for t in names}
    return {"models": names, "images": int(len(x)), "successes": counts, "crafted_from": matrix}


@dataclass
class DetectionData:
    """A detection set with every feature matrix the tables need."""

    data: DetectionSet
    fisher: dict[str, np.ndarray]
    baseline: np.ndarray  # (N, 2): KD score, BU score


def detection_data(model: nn.Module, images: Tensor, labels: Tensor, kd: KernelDensityScorer, epsilons: dict,
                   seed: int, label: str, feature_sets: tuple[str, ...] = FEATURE_SETS_COMPARED,
                   opt_params: dict | None = None) -> DetectionData:
    data = build_detection_set(model, images, labels, DEFAULT_ATTACKS, epsilons, seed, progress=True,
                               opt_params=opt_params)
    feats = candidate_features(model, data.images, feature_sets, progress=True, desc=f"{label} features")
    base = np.stack([kd.score(model, data.images), bayesian_uncertainty(model, data.images, seed=seed)], 1)
    return DetectionData(data, feats, base)


def table4(fit: DetectionData, test: DetectionData, seed: int) -> tuple[dict, dict]:
    """Per attack: fit on validation rows of that attack, AUC on test rows of that attack. Also ROC inputs."""
    rows: dict[str, dict[str, float]] = {}
    roc: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for attack in DEFAULT_ATTACKS + ("all",):
        fr = np.ones(len(fit.data), bool) if attack == "all" else fit.data.attack == attack
        tr = np.ones(len(test.data), bool) if attack == "all" else test.data.attack == attack
        yf, yt = fit.data.is_adversarial[fr], test.data.is_adversarial[tr]
        if len(np.unique(yf)) < 2 or len(np.unique(yt)) < 2:
            continue
        scores = {
            "KD": test.baseline[tr, 0],
            "BU": test.baseline[tr, 1],
            "KD+BU": fit_classifier(fit.baseline[fr], yf, "logreg", seed).predict_proba(test.baseline[tr])[:, 1],
        }
        for fs in fit.fisher:
            for clf in ("rf", "gnb"):
                if clf == "gnb" and fs != "plain":
                    continue
                model = fit_classifier(fit.fisher[fs][fr], yf, clf, seed)
                scores[f"{clf.upper()} {fs}"] = model.predict_proba(test.fisher[fs][tr])[:, 1]
        rows[attack] = {k: 100 * auc_score(yt, s) for k, s in scores.items()}
        rows[attack]["positives"] = int(yt.sum())
        rows[attack]["negatives"] = int((~yt).sum())
        roc[attack] = {k: (yt, s) for k, s in scores.items()}
    return rows, roc


def validation_table(fit: DetectionData, seed: int) -> dict:
    """Out-of-fold AUC (5-fold CV grouped by source image) on the validation detection set, per attack and feature
    set: the evidence the shipped feature set was chosen on."""
    out = {}
    for fs, feats in fit.fisher.items():
        out[fs] = {}
        for a in DEFAULT_ATTACKS:
            rows = fit.data.attack == a
            y = fit.data.is_adversarial[rows]
            if len(np.unique(y)) < 2 or len(np.unique(fit.data.source[rows])) < 2:
                continue
            oof = out_of_fold_scores(feats[rows], y, fit.data.source[rows], "rf", seed)
            out[fs][a] = 100 * auc_score(y, oof)
    return out


def table5(fit: DetectionData, test: DetectionData, feature_set: str, seed: int) -> dict:
    """RF trained on one attack's validation rows, AUC on each attack's test rows."""
    out = {}
    for a in DEFAULT_ATTACKS:
        fr = fit.data.attack == a
        if len(np.unique(fit.data.is_adversarial[fr])) < 2:
            continue
        model = fit_classifier(fit.fisher[feature_set][fr], fit.data.is_adversarial[fr], "rf", seed)
        out[a] = {}
        for b in DEFAULT_ATTACKS:
            tr = test.data.attack == b
            s = model.predict_proba(test.fisher[feature_set][tr])[:, 1]
            out[a][b] = 100 * auc_score(test.data.is_adversarial[tr], s)
    return out


def operating_point(fit: DetectionData, test: DetectionData, feature_set: str, seed: int, fpr: float = 0.05) -> dict:
    """All attacks together, threshold at `fpr` on out-of-fold validation scores (as the shipped detector): the
    test TPR and FPR there."""
    y = fit.data.is_adversarial
    oof = out_of_fold_scores(fit.fisher[feature_set], y, fit.data.source, "rf", seed)
    thr = threshold_at_fpr(oof[~y], fpr)
    model = fit_classifier(fit.fisher[feature_set], y, "rf", seed)
    s = model.predict_proba(test.fisher[feature_set])[:, 1]
    y = test.data.is_adversarial
    return {"threshold": thr, "tpr": float((s[y] >= thr).mean()), "fpr": float((s[~y] >= thr).mean())}


@dataclass
class Reproduction:
    """What a run measured: the results (JSON-ready; `results.json`) and the arrays behind the figures."""

    results: dict
    roc: dict
    log_top_eigenvalue: np.ndarray  # Figure 3: log10 lambda_1 of the images whose least norm was found
    least_norm: np.ndarray  # and their least OSSA norm
    fig4: dict[str, np.ndarray]


def run_evaluation(cfg: EvalConfig) -> Reproduction:
    """Run every table and figure of the reproduction (`cfg.timings` gets each stage's seconds)."""
    from tqdm.auto import tqdm

    from service.data.mnist import load_mnist
    from service.zoo.registry import load_model

    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    loaded = {}
    for name in MODELS:
        try:
            loaded[name] = load_model(name, device="cpu")
        except Exception as exc:  # a model may not ship: say so in the report
            cfg.timings[f"missing {name}"] = 0.0
            print(f"evaluate: model {name} not available: {exc}")
    if cfg.detector_model not in loaded:
        raise ValueError(f"evaluate: the detector model {cfg.detector_model!r} is not available")
    models = {k: v.module for k, v in loaded.items()}
    val, test, train = load_mnist("val"), load_mnist("test"), load_mnist("train")
    lenet = models[cfg.detector_model]
    results: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                                if k not in ("timings", "robustness")},
                     "models": {k: {"sha256": v.sha256, "test_accuracy": v.card.test_accuracy}
                                for k, v in loaded.items()}}
    stages = tqdm(total=7, desc="evaluate")
    with _timed(cfg, "budgets (val)"):
        xs, ys = _correct(lenet, val[0][:cfg.n_select], val[1][:cfg.n_select])
        chosen, val_curves = select_budgets(lenet, xs, ys)
    results["budgets"] = {"chosen": chosen, "val_curves": val_curves, "grid": EPS_GRID, "rule_rate": SELECT_RATE,
                          "val_images": int(len(xs)), "opt": {**OPT_PARAMS, "steps": cfg.opt_steps},
                          "defaults": MNIST_EPSILONS}
    stages.update()
    with _timed(cfg, "fig 2a (test)"):
        curves = {}
        for name in ("lenet5", "vgg-shallow"):
            if name in models:
                n = cfg.n_table2 if name == "lenet5" else cfg.n_table2_vgg
                x, y = _correct(models[name], test[0][:n], test[1][:n])
                curves[name] = {a: one_step_curve(models[name], x, y, a) for a in ("fgm", "ossa")}
    results["fig2a"] = curves
    stages.update()
    t2_eps = chosen["fgm"]
    with _timed(cfg, "table 2"):
        results["table2"] = {"epsilon": t2_eps, **table2(models, test, cfg, t2_eps)}
    stages.update()
    with _timed(cfg, "table 3"):
        results["table3"] = table3(models, test, cfg)
    stages.update()
    with _timed(cfg, "detection sets + features"):
        kd = KernelDensityScorer.fit(lenet, train[0][:cfg.n_kd_train], train[1][:cfg.n_kd_train], seed=cfg.seed)
        fit = detection_data(lenet, val[0][:cfg.n_detect], val[1][:cfg.n_detect], kd, chosen, cfg.seed, "val",
                             cfg.feature_sets, {"steps": cfg.opt_steps})
        tst = detection_data(lenet, test[0][:cfg.n_detect], test[1][:cfg.n_detect], kd, chosen, cfg.seed + 1, "test",
                             cfg.feature_sets, {"steps": cfg.opt_steps})
    results["kd_bandwidth"] = kd.bandwidth
    results["detection_sets"] = {"val": fit.data.counts(), "test": tst.data.counts(), "val_info": fit.data.info,
                                 "test_info": tst.data.info}
    stages.update()
    with _timed(cfg, "tables 4-5"):
        results["validation"] = validation_table(fit, cfg.seed)
        results["table4"], roc = table4(fit, tst, cfg.seed)
        results["table5"] = {fs: table5(fit, tst, fs, cfg.seed) for fs in ("plain", cfg.ours)}
        results["operating_point"] = {fs: operating_point(fit, tst, fs, cfg.seed) for fs in ("plain", cfg.ours)}
    stages.update()
    with _timed(cfg, "fig 3 + figures"):
        x, y = _correct(lenet, test[0][:cfg.n_fig3], test[1][:cfg.n_fig3])
        from service.fisher import fisher_spectrum

        top = log_eigenvalues(fisher_spectrum(lenet, x, k=1, method="exact").eigenvalues)[:, 0]
        ln = least_norm_search(lenet, x, y, "ossa", high=6.0, tol=1e-2, method="exact")
        found = ln.found.cpu().numpy()
        least = ln.least_norm.cpu().numpy()
        corr = float(np.corrcoef(top[found], least[found])[0, 1]) if found.sum() > 2 else float("nan")
        results["fig3"] = {"images": int(len(x)), "found": int(found.sum()),
                           "pearson_log10_lambda1_vs_least_norm": corr}
        fig4 = _fig4_data(tst)
        results["fig4a"] = {k: {"median_log10_lambda1": float(np.median(v))} for k, v in fig4.items()}
    stages.update()
    stages.close()
    shipped = Path(loaded[cfg.detector_model].card_path).parent / f"{cfg.detector_model}.detector.json" \
        if loaded[cfg.detector_model].card_path else None
    results["shipped_detector"] = json.loads(shipped.read_text()) if shipped and shipped.is_file() else None
    cfg.timings["total"] = round(time.perf_counter() - start, 1)
    results["timings"] = cfg.timings
    return Reproduction(results, roc, top[found], least[found], fig4)


def _fig4_data(tst: DetectionData) -> dict[str, np.ndarray]:
    """log10 top eigenvalue of clean, noisy and FGM-adversarial test rows (FGM group)."""
    rows = tst.data.attack == "fgm"
    lam = tst.fisher["plain"][:, 0]
    return {k: lam[rows & (tst.data.kind == k)] for k in ("clean", "noisy", "adversarial")}
