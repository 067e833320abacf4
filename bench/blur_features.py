"""Why blur raises false alarms: which of the shipped detector's features a Gaussian blur moves, and whether it moves
them the way an attack does. Validation data only (mnist:val[700:], the shipped detector's selection images).

For the correctly classified clean images, the same images blurred (sigma 1, the mild shift of issue 18), and the
successful adversarial images of the paper's attacks (the shipped card's budgets): each feature's shift from clean,
in clean standard deviations, for blur and for the attacks; how often the forest splits on it; and the detector's
flag rate on each group. A feature that blur moves as far as the attacks do, in the same direction, is one the
forest cannot use to tell them apart; a blur-robust feature set needs its stand-in.

    .venv/bin/python bench/blur_features.py          # saves bench/results/blur-features-cpu.md
"""

from __future__ import annotations

import argparse
import collections
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
from service.detect.features import batched_features, feature_names
from service.evaluate.shifts import MILD_BLUR_SIGMA, gaussian_blur

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=700, help="mnist:val[START:] (the fit used val[:700])")
    parser.add_argument("--rows", type=int, default=15, help="features shown, by how far blur moves them")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "blur-features-cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    loaded, detector = shipped_lenet5()
    x, y = load_mnist("val")
    x, y = x[args.start:], y[args.start:]
    with torch.no_grad():
        correct = loaded.module(x).argmax(1) == y
    clean = x[correct]
    attacks, budgets, seed = detector.training_protocol()
    data = build_detection_set(loaded.module, x, y, attacks, budgets, seed)
    groups = {"clean": clean, f"blur sigma {MILD_BLUR_SIGMA:g}": gaussian_blur(clean, MILD_BLUR_SIGMA),
              "adversarial (paper's attacks)": data.images[torch.as_tensor(data.is_adversarial)]}
    features = {name: batched_features(loaded.module, images, detector.feature_set, detector.k)
                for name, images in groups.items()}
    flagged = {name: float(np.mean(detector.score_features(f) >= detector.threshold)) for name, f in features.items()}
    names = feature_names(detector.feature_set, detector.k)
    forest = detector.classifier
    internal = forest.left != np.arange(forest.left.shape[1])[None]
    splits = collections.Counter(forest.feature[internal].tolist())
    base = features["clean"]
    scale = base.std(0)
    scale[scale == 0] = 1.0
    blur_name, adversarial_name = list(groups)[1], list(groups)[2]
    blur = (features[blur_name].mean(0) - base.mean(0)) / scale
    attack = (features[adversarial_name].mean(0) - base.mean(0)) / scale
    order = np.argsort(-np.abs(blur))[:args.rows]
    lines = [f"# What blur moves in `{detector.feature_set}` (LeNet-5, validation)", "",
             f"`.venv/bin/python bench/blur_features.py --start {args.start} --threads {args.threads}`; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
             f"commit {commit()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"{time.perf_counter() - start:.0f} s.", "",
             f"mnist:val[{args.start}:]: " + ", ".join(f"{name} {len(g)} images, flagged {100 * flagged[name]:.1f}%"
                                                       for name, g in groups.items())
             + f" (the shipped threshold {detector.threshold:.3f}). Shifts of the group means from the clean mean, "
               "in clean standard deviations; splits: internal nodes of the shipped forest (300 trees) on the "
               "feature.", "",
             "| feature | blur shift | attack shift | same direction | forest splits |", "|---|---|---|---|---|"]
    for i in order:
        lines.append(f"| {names[i]} | {blur[i]:+.2f} | {attack[i]:+.2f} | "
                     f"{'yes' if np.sign(blur[i]) == np.sign(attack[i]) else 'no'} | {splits.get(int(i), 0)} |")
    share = sum(splits.get(int(i), 0) for i in range(len(names))
                if np.sign(blur[i]) == np.sign(attack[i]) and abs(blur[i]) >= 0.5 * abs(attack[i]))
    lines += ["", f"Splits on features that blur moves at least half as far as the attacks, the same way: {share} of "
                  f"{sum(splits.values())}."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
