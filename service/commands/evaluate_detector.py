"""`evaluate-detector`: held-out and adaptive attacks, benign shifts and the feature-squeezing baseline against a
model's detector, written as a Markdown report (service.evaluate.evaluation)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.evaluate import PARTS


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated L2 budgets, e.g. 1,2,3: {exc}") from exc


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate-detector", help="measure where a detector holds: held-out and adaptive attacks, "
                       "benign shifts, the squeezing baseline",
                       description="Attack the model's correctly classified --test images with library attacks "
                       "(ART) and with attackers who know the detector, shift clean images benignly, and compare "
                       "with feature squeezing; writes <out>/report.md, results.json and a figure. The --fit images "
                       "(default mnist:val) give the baseline its threshold and the attacker a surrogate of the "
                       "forest. `--effort full` is the honest setting (tuned until more effort stopped lowering "
                       "detection; the report re-checks it at twice the effort); `quick` is for smoke tests.")
    p.add_argument("--model", default="lenet5", help="registry name of the model (default lenet5)")
    p.add_argument("--detector", type=Path, default=None,
                   help="detector file (.npz with its card) to evaluate; default: the model's active detector")
    p.add_argument("--fit", default=None, metavar="DATASET", help="labelled fit images (default mnist:val for "
                   "1x28x28 models): an .npz, a folder of class folders, a zip of one, or a server-side name")
    p.add_argument("--test", default=None, metavar="DATASET", help="labelled test images (default mnist:test)")
    p.add_argument("--images", type=int, default=100, help="attacked test images (default 100)")
    p.add_argument("--shift-images", type=int, default=500, help="clean test images shifted (default 500)")
    p.add_argument("--budgets", type=_floats, default=(1.0, 2.0, 3.0), help="L2 budgets (default 1,2,3)")
    p.add_argument("--effort", choices=["full", "quick"], default="full")
    p.add_argument("--parts", type=_names, default=PARTS, help=f"comma-separated (default {','.join(PARTS)})")
    p.add_argument("--heldout", type=_names, default=None, help="held-out attacks (default all)")
    p.add_argument("--adaptive", type=_names, default=None, help="adaptive attacks (default all)")
    p.add_argument("--check-images", type=int, default=32,
                   help="images of the double-effort check (0: skip it; default 32)")
    p.add_argument("--check-budget", type=float, default=3.0,
                   help="L2 budget of the double-effort check (default 3: where images get through)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="report folder (default reports/evaluate-<model>)")
    p.set_defaults(handler=evaluate_detector_command)


def evaluate_detector_command(args: argparse.Namespace) -> int:
    import torch

    from service.commands.detect import command_line, default_datasets
    from service.config import get_settings
    from service.data.datasets import DatasetError
    from service.evaluate.evaluation import EvaluationPlan
    from service.evaluate.use_case import run_and_write
    from service.jobs.inputs import dataset_limits
    from service.training import open_dataset
    from service.zoo.registry import load_model

    torch.set_num_threads(args.threads)
    settings = get_settings()
    loaded = load_model(args.model, device="cpu", folders=settings.model_folders())
    card = loaded.card
    fit_spec, test_spec = default_datasets(card.input_shape, args.fit, args.test)
    if fit_spec is None or test_spec is None:
        print(f"model {loaded.name} takes {card.input_shape} images: give its labelled images with --fit and --test",
              file=sys.stderr)
        return 2
    try:
        plan = EvaluationPlan(
            images=args.images, budgets=args.budgets, effort=args.effort, check_images=args.check_images,
            check_budget=args.check_budget,
            shift_images=args.shift_images, parts=args.parts, seed=args.seed,
            **({"heldout": args.heldout} if args.heldout is not None else {}),
            **({"adaptive": args.adaptive} if args.adaptive is not None else {}))
        folders, limits = list(settings.dataset_folders), dataset_limits(settings)
        fit = open_dataset(fit_spec, card, folders, limits)
        test = open_dataset(test_spec, card, folders, limits)
    except (DatasetError, ValueError) as exc:
        print(f"evaluate-detector: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path("reports") / f"evaluate-{loaded.name}"
    command = command_line()
    try:
        report = run_and_write(loaded, args.detector, fit, test, plan, out, command=command,
                               progress=lambda part: print(f"... {part}", flush=True))
    except (FileNotFoundError, ValueError) as exc:
        print(f"evaluate-detector: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report}")
    return 0
