"""Hardening experiment on the validation split only: fit the paper's detector on mnist:val[:FIT] and harden it
(service.detect.hardening), save both, and write val[FIT:] as the selection images (evaluate-detector --test).
With --test N, the hardened detector's card gets the paper-style test metrics on mnist:test[:N] (the fit's
attacks and budgets: service.detect.detector.test_evaluation), as the shipped models/lenet5.detector.json has them.

    .venv/bin/python bench/harden_lenet5.py --fit 700 --rounds 2 --out /tmp/harden
    .venv/bin/python bench/harden_lenet5.py --fit 700 --rounds 2 --test 1000 --out /tmp/harden   # the shipped one
    .venv/bin/python bench/harden_lenet5.py --test 1000 --detector models/lenet5.detector.npz   # its card's test part
    .venv/bin/python bench/harden_lenet5.py --test 1000 --detector /tmp/harden/hardened.detector.npz \
        --save models/lenet5.detector.npz            # a detector chosen on validation, with its card's test part
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from service.data.mnist import load_mnist
from service.detect.detector import Detector, test_evaluation, train_detector
from service.detect.files import load_detector, save_detector
from service.detect.hardening import Hardening, harden_detector
from service.zoo.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=int, default=700)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images-per-round", type=int, default=400)
    parser.add_argument("--feature-set", default=None, help="the detector's feature set (default: the training's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--test", type=int, default=0, help="test images for the card's test metrics (0: none)")
    parser.add_argument("--detector", type=Path, default=None,
                        help="train nothing: compute --test's metrics for this detector and compare its card's")
    parser.add_argument("--save", type=Path, default=None,
                        help="with --detector: save it here with the card's test part computed now")
    parser.add_argument("--out", type=Path, default=Path("/tmp/harden"))
    args = parser.parse_args()
    command = "bench/harden_lenet5.py " + " ".join(sys.argv[1:])
    if args.detector is not None:
        if args.save:
            add_card_test(args)
        else:
            check_card(args)
        return
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("lenet5", device="cpu")
    x, y = load_mnist("val")
    fit_x, fit_y = x[:args.fit], y[:args.fit]
    for name, part in (("fit", slice(0, args.fit)), ("select", slice(args.fit, None))):
        np.savez(args.out / f"val-{name}.npz", images=x[part].numpy(), labels=y[part].numpy())
    start = time.perf_counter()
    run = train_detector(loaded.module, model_name=loaded.name, model_sha256=loaded.sha256, fit_images=fit_x,
                         fit_labels=fit_y, command=command,
                         data_description=f"mnist:val[:{args.fit}]", feature_set=args.feature_set,
                         progress=True)
    print(f"base trained in {time.perf_counter() - start:.0f} s", flush=True)
    save_detector(copy.deepcopy(run.detector), args.out / "base.detector.npz")
    hardened = harden_detector(loaded.module, run, fit_x, fit_y,
                               Hardening(rounds=args.rounds, images_per_round=args.images_per_round),
                               progress=True)
    print(f"hardened in {time.perf_counter() - start:.0f} s", flush=True)
    if args.test:
        hardened.detector.card["test"] = card_test(loaded.module, hardened.detector, args.test)
        hardened.detector.card["training_data"]["description"] += \
            f"; test metrics on the 'test' split (first {args.test})"
    save_detector(hardened.detector, args.out / "hardened.detector.npz")


def card_test(model: torch.nn.Module, detector: Detector, images: int) -> dict:
    """The card's paper-style test section on mnist:test[:images], with the card's own attacks, budgets and seed."""
    test_x, test_y = load_mnist("test")
    attacks, budgets, seed = detector.training_protocol()
    return test_evaluation(model, detector, test_x[:images], test_y[:images], attacks, budgets, seed,
                           progress=True)[2]


def add_card_test(args: argparse.Namespace) -> None:
    """Save the detector at --save with its card's test section on mnist:test[:--test] (it must have none)."""
    loaded = load_model("lenet5", device="cpu")
    detector = load_detector(args.detector, loaded.sha256)
    if detector.card.get("test"):
        sys.exit(f"{args.detector} already has a test section: --save adds one only where there is none")
    images = args.test or 1000
    detector.card["test"] = card_test(loaded.module, detector, images)
    detector.card["training_data"]["description"] += f"; test metrics on the 'test' split (first {images})"
    save_detector(detector, args.save)
    print(f"saved {args.save}: test AUC {detector.card['test']['auc']}, TPR {detector.card['test']['tpr']}")


def check_card(args: argparse.Namespace) -> None:
    """Recompute a detector's card test section and say, figure by figure, whether it is the card's."""
    loaded = load_model("lenet5", device="cpu")
    detector = load_detector(args.detector, loaded.sha256)
    test = card_test(loaded.module, detector, args.test or 1000)
    recorded = detector.card.get("test") or {}
    for key in ("auc", "tpr", "fpr", "clean_fpr", "noisy_fpr"):
        verdict = "same" if recorded.get(key) == test[key] else "DIFFERENT"
        print(f"{key}: card {recorded.get(key)}, now {test[key]}: {verdict}")
    same = all(recorded.get(k) == test[k] for k in ("per_attack", "detection_set"))
    print(f"per attack and detection-set counts: {'same' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
