"""Screening cost per image of one or more detectors of a model: `Detector.score` (features on the detector's
route + its classifier) on the same test images, in batches, repeated; the features and the classifier timed
apart. Saves a Markdown table with the machine, versions and commit.

    .venv/bin/python bench/bench_detector_cost.py --detector models/lenet5.detector.npz \\
        --detector /tmp/harden/hardened.detector.npz --out bench/results/detector-cost-cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from provenance import commit

from service.data.mnist import load_mnist
from service.detect.features import fisher_features
from service.detect.files import load_detector
from service.zoo.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--detector", action="append", type=Path, required=True)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")
    x = load_mnist("test")[0][:args.images]
    rows = []
    for path in args.detector:
        detector = load_detector(path, loaded.sha256)
        detector.score(loaded.module, x[:args.batch])  # warm-up
        totals, classifier = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for chunk in x.split(args.batch):
                detector.score(loaded.module, chunk)
            totals.append(time.perf_counter() - start)
            feats = [fisher_features(loaded.module, c, detector.feature_set, detector.k, detector.route).matrix
                     for c in x.split(args.batch)]
            start = time.perf_counter()
            for matrix in feats:
                detector.score_features(matrix)
            classifier.append(time.perf_counter() - start)
        rows.append((path, detector.feature_set, 1e3 * statistics.median(totals) / len(x),
                     1e3 * statistics.median(classifier) / len(x)))
    given = " ".join(f"--detector {p}" for p in args.detector)
    lines = [f"# Screening cost per image ({args.model})", "",
             f"`.venv/bin/python bench/bench_detector_cost.py {given}`"
             f" (--images {args.images} --batch {args.batch} --repeats {args.repeats} --threads {args.threads})", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, {args.threads} thread(s); commit {commit()}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "| detector | features | ms / image (score) | ms / image (classifier alone) | ratio to the first |",
             "|---|---|---|---|---|"]
    for path, features, total, forest in rows:
        lines.append(f"| {path} | {features} | {total:.3f} | {forest:.4f} | {total / rows[0][2]:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
