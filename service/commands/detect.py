"""`train-detector` and `evaluate`: the shipped detector and the reproduction report (service.detect)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from service.detect.detector import CLASSIFIERS
    from service.detect.features import FEATURE_SETS, SHIPPED_FEATURE_SET

    p = sub.add_parser("train-detector", help="train the adversarial detector of a model and write it to models/",
                       description="Build the detection set (clean + noisy vs FGM/OTCM/Opt/BIM/OSSA) from the "
                       "validation split, fit the classifier, choose the threshold at --fpr on out-of-fold scores, "
                       "measure on the test split, write <models-dir>/<model>.detector.npz and .json.")
    p.add_argument("--model", default="lenet5", help="registry name of the model (default lenet5)")
    p.add_argument("--feature-set", default=SHIPPED_FEATURE_SET, choices=list(FEATURE_SETS),
                   help=f"features (default {SHIPPED_FEATURE_SET}: chosen on validation; plain = the paper's)")
    p.add_argument("--classifier", default="rf", choices=[c for c in CLASSIFIERS if c != "logreg"])
    p.add_argument("--fpr", type=float, default=0.05, help="false-positive rate of the operating threshold")
    p.add_argument("--images", type=int, default=1000, help="images per split to use (default: all 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--models-dir", type=Path, default=None, help="where to write (default: the settings' models_dir)")
    p.set_defaults(handler=train_detector_command)

    e = sub.add_parser("evaluate", help="reproduce the paper's MNIST tables and figures into a Markdown report",
                       description="Tables 2-5 and Figures 2a, 3, 4a and ROC curves on the held-out test split, "
                       "budgets chosen on the validation split; writes <out>/report.md, PNGs and results.json.")
    e.add_argument("--out", type=Path, default=Path("reports/mnist"))
    e.add_argument("--quick", action="store_true", help="a small slice (about a minute), for tests")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    e.set_defaults(handler=evaluate_command)


def _command_line() -> str:
    return "fisher-guard " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def train_detector_command(args: argparse.Namespace) -> int:
    import torch

    from service.config import get_settings
    from service.data.mnist import load_mnist
    from service.detect.detector import train_detector
    from service.detect.files import detector_path, save_detector
    from service.zoo.registry import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", folders=get_settings().model_folders())
    (xv, yv), (xt, yt) = load_mnist("val"), load_mnist("test")
    start = time.perf_counter()
    detector = train_detector(
        loaded.module, model_name=loaded.name, model_sha256=loaded.sha256, fit_images=xv[:args.images],
        fit_labels=yv[:args.images], test_images=xt[:args.images], test_labels=yt[:args.images],
        feature_set=args.feature_set, classifier=args.classifier, target_fpr=args.fpr, seed=args.seed,
        progress=True, command=_command_line(),
        data_description=f"MNIST 'val' split (first {args.images} images) of service/data/mnist_split.json; "
                         f"test metrics on the 'test' split (first {args.images})",
    )
    detector.card["wall_time_s"] = round(time.perf_counter() - start, 1)
    out_dir = args.models_dir or get_settings().models_dir
    path, card = save_detector(detector, detector_path(out_dir, loaded.name))
    val, test = detector.card["validation"], detector.card["test"]
    print(f"wrote {path} and {card}")
    print(f"threshold {detector.threshold:.4f} (FPR {args.fpr} on out-of-fold validation scores); "
          f"validation AUC {100 * val['auc']:.2f}, TPR {100 * val['tpr']:.1f}%; "
          f"test AUC {100 * test['auc']:.2f}, TPR {100 * test['tpr']:.1f}%, FPR {100 * test['fpr']:.1f}%")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    import torch

    from service.reproduce.protocol import EvalConfig
    from service.reproduce.report import write_report
    from service.reproduce.run import run_evaluation

    torch.set_num_threads(args.threads)
    cfg = EvalConfig.make(args.out, quick=args.quick, seed=args.seed, command=_command_line())
    path = write_report(cfg, run_evaluation(cfg))
    print(f"wrote {path} ({cfg.timings.get('total', 0):.0f} s)")
    return 0
