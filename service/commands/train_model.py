"""`fisher-guard train-model`: train one of the paper's MNIST models and write its weights and card."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from service.zoo.training import SHIPPED_MODELS, TrainConfig

    defaults = TrainConfig()
    p = sub.add_parser("train-model", help="Train an MNIST model on the fixed split; write <out>/<name>.pt and .json.",
                       description="Train LeNet-5 or the shallow VGG on the bundled MNIST split (train: 3000, "
                       "val: 1000 for model selection, test: 1000 for the card's accuracy). --adversarial (or a "
                       "name ending in -adv) uses ELU and FGM adversarial training, as in the paper's Table 3.")
    p.add_argument("--name", default=defaults.name, choices=SHIPPED_MODELS, help="model to train")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--adversarial", action="store_true", help="ELU + FGM adversarial training (name gets -adv)")
    p.add_argument("--shift", type=int, default=defaults.shift, help="augmentation: random shifts up to N pixels")
    p.add_argument("--out", type=Path, default=Path("models"), help="folder for weights and card")
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of each split (smoke runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from service.zoo.training import TrainConfig, train_and_save

    config = TrainConfig(name=args.name, epochs=args.epochs, seed=args.seed, adversarial=args.adversarial,
                         threads=args.threads, limit=args.limit, shift=args.shift)
    card = train_and_save(config, args.out, progress=not args.no_progress)
    print(f"{card.name}: test accuracy {card.test_accuracy:.4f} -> {args.out / card.weights} (sha256 {card.sha256})")
    return 0
