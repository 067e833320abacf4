"""`train-detector` (a detector for any model, on the user's labelled images) and `evaluate` (the MNIST
reproduction report)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from service.detect.defaults import DEFAULT_ATTACKS, DEFAULT_FPR, OPT_PARAMS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-detector", help="train the adversarial detector of a model on your labelled images",
                       description="Choose each attack's L2 budget on the fit images (or take --epsilon), build the "
                       "detection set (clean + noisy vs the detection attacks), pick the feature set among the "
                       "candidates for the input by out-of-fold AUC (or take --feature-set), set the threshold at "
                       "--fpr on the clean fit images, measure on the test images, and write the detector as a "
                       "candidate with its card and a Markdown report. Activate it with --activate or "
                       "`fisher-guard activate-detector`.")
    p.add_argument("--model", default="lenet5", help="registry name of the model (default lenet5)")
    p.add_argument("--fit", default=None, metavar="DATASET",
                   help="labelled images to fit on: an .npz (images, labels), a folder of class folders, a .zip of "
                   "one, or a server-side name (mnist:val, data:<name>); default mnist:val for 1x28x28 models")
    p.add_argument("--test", default=None, metavar="DATASET",
                   help="labelled images to measure on (default: mnist:test with mnist:val, else a --test-fraction "
                   "of --fit)")
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="share of --fit held out for testing when --test is not given (stratified, seeded)")
    p.add_argument("--images", type=int, default=None, help="use only the first N images of each part")
    p.add_argument("--attacks", default=None,
                   help=f"comma-separated detection attacks (default: all of {', '.join(DEFAULT_ATTACKS)})")
    p.add_argument("--epsilon", action="append", default=[], metavar="ATTACK=L2",
                   help="an attack's L2 budget instead of the rule's; repeatable")
    p.add_argument("--feature-set", default=None, help="features (default: chosen among the candidates)")
    p.add_argument("--classifier", default="rf", choices=["rf", "gnb"])
    p.add_argument("--fpr", type=float, default=DEFAULT_FPR,
                   help="false-positive rate of the threshold on clean images")
    p.add_argument("--opt-steps", type=int, default=None, help=f"C&W's Adam steps (default {OPT_PARAMS['steps']})")
    p.add_argument("--harden", type=int, default=0, metavar="ROUNDS",
                   help="rounds of hardening after the paper's training: adaptive attacks on the detector as "
                   "positives, benign shifts as negatives (docs/robustness.md; default 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None,
                   help="detector file to write (default: <models_dir>/candidates/<model>.detector.<time>.npz)")
    p.add_argument("--activate", action="store_true", help="make it the model's active detector once written")
    p.set_defaults(handler=train_detector_command)

    e = sub.add_parser("evaluate", help="reproduce the paper's MNIST tables and figures into a Markdown report",
                       description="Tables 2-5 and Figures 2a, 3, 4a and ROC curves on the held-out test split, "
                       "budgets chosen on the validation split; writes <out>/report.md, PNGs and results.json.")
    e.add_argument("--out", type=Path, default=Path("reports/mnist"))
    e.add_argument("--quick", action="store_true", help="a small slice (about a minute), for tests")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    e.add_argument("--robustness", type=Path, default=None, metavar="RESULTS_JSON",
                   help="an `evaluate-detector` results.json: the report adds its envelope (held-out and adaptive "
                        "attacks, benign shifts)")
    e.add_argument("--report-only", action="store_true",
                   help="measure nothing: write <out>/report.md again from <out>/results.json (with --robustness)")
    e.set_defaults(handler=evaluate_command)


def command_line() -> str:
    return "fisher-guard " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def default_datasets(input_shape: list[int], fit: str | None, test: str | None) -> tuple[str | None, str | None]:
    """--fit and --test as given, else mnist:val and mnist:test for 1x28x28 models (no default for others)."""
    fit = fit or ("mnist:val" if list(input_shape) == [1, 28, 28] else None)
    return fit, test or ("mnist:test" if fit == "mnist:val" else None)


def parse_epsilons(pairs: list[str]) -> dict[str, float]:
    """['fgm=3', ...] -> {'fgm': 3.0}; ValueError naming a malformed pair."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--epsilon {pair!r}: expected ATTACK=L2, e.g. fgm=3.0")
    return out


def train_detector_command(args: argparse.Namespace) -> int:
    import torch

    from service.config import get_settings
    from service.data.datasets import DatasetError, split
    from service.jobs.inputs import dataset_limits
    from service.training import TrainingOptions, candidate_path, open_dataset, train_and_write
    from service.zoo.registry import load_model

    torch.set_num_threads(args.threads)
    settings = get_settings()
    loaded = load_model(args.model, device="cpu", folders=settings.model_folders())
    card = loaded.card
    fit_spec, test_spec = default_datasets(card.input_shape, args.fit, args.test)
    if fit_spec is None:
        print(f"model {loaded.name} takes {card.input_shape} images: give its labelled images with --fit",
              file=sys.stderr)
        return 2
    try:
        attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip()) if args.attacks else None
        options = TrainingOptions(attacks=attacks or TrainingOptions.attacks,
                                  epsilons=parse_epsilons(args.epsilon), feature_set=args.feature_set,
                                  classifier=args.classifier, target_fpr=args.fpr, seed=args.seed,
                                  opt_steps=args.opt_steps, hardening_rounds=args.harden)
        folders, limits = list(settings.dataset_folders), dataset_limits(settings)
        fit = open_dataset(fit_spec, card, folders, limits, args.images)
        if test_spec:
            test = open_dataset(test_spec, card, folders, limits, args.images)
        else:
            fit, test = split(fit, args.test_fraction, args.seed)
    except (DatasetError, ValueError) as exc:
        print(f"train-detector: {exc}", file=sys.stderr)
        return 2
    out = args.out or candidate_path(settings.models_dir, loaded.name)
    files = train_and_write(loaded, fit, test, out, options, command=command_line(), progress=True)
    detector = files.run.detector
    val, tst = detector.card["validation"], detector.card["test"]
    print(f"wrote {files.detector}, {files.card} and {files.report} ({files.seconds:.0f} s)")
    print(f"feature set {detector.feature_set}; threshold {detector.threshold:.4f} (FPR {args.fpr} on clean fit "
          f"images); validation AUC {100 * val['auc']:.2f}; test AUC {100 * tst['auc']:.2f}, "
          f"TPR {100 * tst['tpr']:.1f}%, clean FPR {100 * tst['clean_fpr']:.1f}%")
    if args.activate:
        from service.detect.files import activate_detector

        active = activate_detector(files.detector, loaded.card_path, loaded.sha256)
        print(f"activated: {active}")
    else:
        print(f"activate with: fisher-guard activate-detector {files.detector}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    import torch

    from service.reproduce.protocol import EvalConfig
    from service.reproduce.report import markdown, write_report
    from service.reproduce.run import run_evaluation

    if args.robustness is not None and not args.robustness.is_file():
        raise SystemExit(f"evaluate: --robustness {args.robustness} is not a file")
    if args.report_only:
        results_file = args.out / "results.json"
        if not results_file.is_file():
            raise SystemExit(f"evaluate --report-only: {results_file} does not exist (run `fisher-guard evaluate` "
                             "first)")
        results = json.loads(results_file.read_text())
        config = {**results["config"], "out": args.out, "robustness": args.robustness}
        config["feature_sets"] = tuple(config["feature_sets"])
        cfg = EvalConfig(**config)
        path = args.out / "report.md"
        path.write_text(markdown(results, cfg))
        print(f"wrote {path} from {results_file}")
        return 0
    torch.set_num_threads(args.threads)
    cfg = EvalConfig.make(args.out, quick=args.quick, seed=args.seed, command=command_line(),
                          robustness=args.robustness)
    path = write_report(cfg, run_evaluation(cfg))
    print(f"wrote {path} ({cfg.timings.get('total', 0):.0f} s)")
    return 0
