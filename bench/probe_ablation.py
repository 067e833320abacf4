"""Which of the shipped feature set's probe blocks earn their forward passes, on validation data only.

The screen's probe round (32 forward passes per image for LeNet-5's `spectral+noise+fine+squeeze`) costs as much
as the exact spectrum (bench/bench_screen_cost.py). This script builds the paper-style detection set of
mnist:val[:FIT] with the shipped detector's attacks and budgets (its card), computes the full feature set once,
and then, for the set without each probe block in turn, the out-of-fold ROC AUC (the feature selection's 3-fold
CV grouped by source image, 100-tree forests) and the probes per image that are left. The test split is not
touched. It answers where a cheaper set could come from; the adaptive and held-out rows of `evaluate-detector`
decide whether it may ship.

    .venv/bin/python bench/probe_ablation.py                 # saves bench/results/probe-ablation-cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from provenance import commit
from shipped import shipped_lenet5

from service.data.mnist import load_mnist
from service.detect.dataset import build_detection_set
from service.detect.detector import SELECTION_FOLDS, SELECTION_TREES, auc_score, out_of_fold_scores
from service.detect.features import FEATURE_SETS, batched_features
from service.fisher import fisher_spectrum

RESULTS = Path(__file__).resolve().parent / "results"


def block_label(block: object) -> str:
    return getattr(block, "head", None) or type(block).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=int, default=700, help="mnist:val[:FIT], the shipped detector's fit images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "probe-ablation-cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    loaded, detector = shipped_lenet5()
    x, y = load_mnist("val")
    attacks, budgets, seed = detector.training_protocol()
    data = build_detection_set(loaded.module, x[:args.fit], y[:args.fit], attacks, budgets, seed, progress=True)
    blocks = FEATURE_SETS[detector.feature_set].blocks
    features = batched_features(loaded.module, data.images, detector.feature_set, detector.k, progress=True)
    spectrum = fisher_spectrum(loaded.module, data.images[:1], k=detector.k, return_vectors=True, return_margin=True)
    names = [name for block in blocks for name in block.names(detector.k)]
    columns, probes, at = [], [], 0
    for block in blocks:
        width = len(block.names(detector.k))
        columns.append(np.arange(at, at + width))
        at += width
        made = block.probes(data.images[:1], spectrum)
        probes.append(0 if made is None else int(made.shape[1]))
    total = sum(probes)
    # the Ratios block's columns that read a probe block's outputs go with it
    ratio_names = set(next(b for b in blocks if type(b).__name__ == "Ratios").names(detector.k))
    derived = {"TopEigenvectorSteps": "step", "IsotropicNoise": "noise", "Margin": "margin"}
    for i, block in enumerate(blocks):
        prefix = derived.get(type(block).__name__)
        if prefix:
            extra = [j for j, name in enumerate(names) if name in ratio_names and name.startswith(prefix)]
            columns[i] = np.concatenate([columns[i], extra])

    def auc_without(dropped: set[int]) -> float:
        gone = set(np.concatenate([columns[i] for i in dropped]).tolist()) if dropped else set()
        keep = np.array([j for j in range(len(names)) if j not in gone])
        scores = out_of_fold_scores(features[:, keep], data.is_adversarial, data.source, "rf", 0, SELECTION_FOLDS,
                                    SELECTION_TREES)
        return auc_score(data.is_adversarial, scores)

    full = auc_without(set())
    rows = [("(the shipped set)", total, full)]
    for i, block in enumerate(blocks):
        if probes[i]:
            rows.append((f"without {block_label(block)}", total - probes[i], auc_without({i})))
    squeezes = {i for i, b in enumerate(blocks) if block_label(b).startswith("squeeze")}
    noise_margin = {i for i, b in enumerate(blocks) if type(b).__name__ in ("IsotropicNoise", "Margin")}
    three = noise_margin | {i for i, b in enumerate(blocks) if type(b).__name__ == "TopEigenvectorSteps"}
    for label, dropped in (("without every squeeze block", squeezes),
                           ("without IsotropicNoise and Margin", noise_margin),
                           ("without TopEigenvectorSteps, IsotropicNoise and Margin", three)):
        rows.append((label, total - sum(probes[i] for i in dropped), auc_without(dropped)))
    seconds = time.perf_counter() - start
    counts = data.counts()
    lines = [f"# Probe blocks of `{detector.feature_set}` on validation (LeNet-5)", "",
             f"`.venv/bin/python bench/probe_ablation.py --fit {args.fit} --threads {args.threads}`; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
             f"commit {commit()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {seconds:.0f} s.", "",
             f"Detection set of mnist:val[:{args.fit}] (the shipped card's attacks and budgets {budgets}, seed "
             f"{seed}): {int(data.is_adversarial.sum())} positives, "
             f"{int((~data.is_adversarial).sum())} negatives ({counts}). Out-of-fold ROC AUC, {SELECTION_FOLDS}-fold "
             f"CV grouped by source image, {SELECTION_TREES}-tree forests of the shipped depth. Paper-style attacks "
             "only: the adaptive and held-out rows are `evaluate-detector`'s. A probe block leaves with the "
             "Ratios columns computed from its outputs (`step*`, `noise*` and `margin*` ratios).", "",
             "| feature set | probes per image | out-of-fold AUC % | vs the shipped set (points) |",
             "|---|---|---|---|"]
    for label, count, auc in rows:
        lines.append(f"| {label} | {count} | {100 * auc:.2f} | {100 * (auc - full):+.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
