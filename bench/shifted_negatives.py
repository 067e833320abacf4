"""How many shifted negatives a detector needs before benign shifts stop raising alarms, per feature set, on
validation data only (LeNet-5; the test split is not touched).

For each feature set: the paper-style detection set of mnist:val[:FIT] (the shipped card's attacks, budgets and
seed), plus S random benign shifts of each correctly classified fit image as negatives
(service.evaluate.shifts.random_shift, the hardening's draw), a 100-tree forest of the shipped depth, its
threshold at 5% FPR on the clean images of mnist:val[FIT:], and on those images the FPR under the mild shifts and
the TPR on the paper's attacks. A diagnostic of what the hardening's shifted negatives can do (no adaptive rounds,
no out-of-fold threshold): `evaluate-detector` measures the hardened detectors.

    .venv/bin/python bench/shifted_negatives.py       # saves bench/results/shifted-negatives-cpu.md
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
from service.detect.detector import make_classifier
from service.detect.features import batched_features
from service.evaluate.shifts import SHIFTS, random_shift

RESULTS = Path(__file__).resolve().parent / "results"
SETS = ("spectral+noise+fine+squeeze", "spectral+noise+fine+squeeze+sharpness", "eigen+fine+squeeze+sharpness")
MILD = ("blur=0.5", "blur=1", "brightness=0.8", "contrast=0.8", "rotation=-10", "rotation=10", "translation=2",
        "jpeg=50")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=int, default=700, help="mnist:val[:FIT] to fit, val[FIT:] to measure")
    parser.add_argument("--shifts", default="0,2,12,20", help="shifted negatives per clean fit image")
    parser.add_argument("--feature-sets", default=",".join(SETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "shifted-negatives-cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    counts = [int(c) for c in args.shifts.split(",")]
    loaded, detector = shipped_lenet5()
    model = loaded.module
    x, y = load_mnist("val")
    attacks, budgets, seed = detector.training_protocol()
    fit_set = build_detection_set(model, x[:args.fit], y[:args.fit], attacks, budgets, seed)
    measure_set = build_detection_set(model, x[args.fit:], y[args.fit:], attacks, budgets, seed)
    with torch.no_grad():
        correct = model(x[:args.fit]).argmax(1) == y[:args.fit]
    generator = torch.Generator().manual_seed(seed + 7)
    shifted = [random_shift(x[:args.fit][correct], generator) for _ in range(max(counts))]
    groups = {"clean": x[args.fit:], **{name: SHIFTS[name](x[args.fit:]) for name in MILD}}
    attacked = measure_set.images[torch.as_tensor(measure_set.is_adversarial)]
    lines = ["# Shifted negatives and benign-shift false alarms (LeNet-5, validation)", "",
             f"`.venv/bin/python bench/shifted_negatives.py --fit {args.fit} --shifts {args.shifts} "
             f"--threads {args.threads}`; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}; commit {commit()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             "", f"Fit: the paper-style detection set of mnist:val[:{args.fit}] ({len(fit_set.images)} rows) plus S "
                 f"random benign shifts of each of its {int(correct.sum())} correctly classified clean images as "
                 f"negatives; 100-tree forests of the shipped depth; threshold at 5% FPR on the "
                 f"{len(groups['clean'])} clean images of mnist:val[{args.fit}:], where everything is measured "
                 f"(FPR % under each mild shift, TPR % on the {len(attacked)} successful adversarials of the paper's "
                 "attacks).", "",
             "| feature set | S | " + " | ".join(MILD) + " | TPR paper attacks |",
             "|---|---|" + "---|" * (len(MILD) + 1)]
    for name in args.feature_sets.split(","):
        features = lambda images, name=name: batched_features(model, images, name)  # noqa: E731
        fit_matrix, shifted_matrices = features(fit_set.images), [features(s) for s in shifted]
        group_matrices = {group: features(images) for group, images in groups.items()}
        attacked_matrix = features(attacked)
        for count in counts:
            matrix = np.concatenate([fit_matrix, *shifted_matrices[:count]])
            labels = np.concatenate([fit_set.is_adversarial, np.zeros(len(matrix) - len(fit_matrix), bool)])
            forest = make_classifier("rf", seed, trees=100).fit(matrix, labels)
            score = lambda m: forest.predict_proba(m)[:, 1]  # noqa: E731, B023
            threshold = np.quantile(score(group_matrices["clean"]), 0.95)
            fpr = [100 * np.mean(score(group_matrices[g]) >= threshold) for g in MILD]
            tpr = 100 * np.mean(score(attacked_matrix) >= threshold)
            lines.append(f"| {name} | {count} | " + " | ".join(f"{v:.1f}" for v in fpr) + f" | {tpr:.1f} |")
            print(lines[-1], flush=True)
    lines += ["", f"{time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
