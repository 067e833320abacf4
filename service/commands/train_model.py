"""`fisher-guard train-model`: train one of the paper's MNIST models, or a builtin / torchvision architecture on
a user's labelled images (`--dataset`), and write its weights and card."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service.zoo.train_config import BUILTIN_ARCHITECTURES, SHIPPED_MODELS, DatasetTrainConfig, TrainConfig

if TYPE_CHECKING:  # torch-heavy: imported inside the handlers only
    from service.data.datasets import LabelledImages

DATASET_ONLY = ("architecture", "val_fraction", "test_fraction", "arch_arg")  # options that need --dataset


def register(sub: argparse._SubParsersAction) -> None:
    defaults, data_defaults = TrainConfig(), DatasetTrainConfig(dataset="", name="x")
    p = sub.add_parser("train-model", help="Train a model (the paper's MNIST models, or any architecture on your "
                       "labelled images with --dataset); write <out>/<name>.pt and .json.",
                       description="Without --dataset: train LeNet-5 or the shallow VGG on the bundled MNIST split "
                       "(train: 3000, val: 1000 for model selection, test: 1000 for the card's accuracy); "
                       "--adversarial (or a name ending in -adv) uses ELU and FGM adversarial training, as in the "
                       "paper's Table 3. With --dataset: train --architecture (a builtin one, or "
                       "torchvision:<name> with random initial weights) on those labelled images, split seeded "
                       "and stratified into train / val (best epoch) / test (the card's accuracy), the train "
                       "part's per-channel mean and std inside the model. The card loads like any other model.")
    p.add_argument("--name", default=None,
                   help=f"model name (and file names). Without --dataset one of {', '.join(SHIPPED_MODELS)} "
                   f"(default {defaults.name}); with --dataset any name (default <architecture>-<dataset>)")
    p.add_argument("--dataset", metavar="SPEC", default=None,
                   help="train on these labelled images: a .npz (images, labels[, class_names]), an ImageFolder "
                   "folder or a zip of one, or a server-side name (mnist:*, data:<name>)")
    p.add_argument("--architecture", metavar="NAME", default=None,
                   help=f"with --dataset: a builtin architecture ({', '.join(BUILTIN_ARCHITECTURES)}; default "
                   f"{data_defaults.architecture}) or torchvision:<name>, e.g. torchvision:resnet18")
    p.add_argument("--arch-arg", metavar="KEY=VALUE", action="append", default=None,
                   help="with --dataset: an extra constructor argument of the architecture (repeatable), e.g. width=16")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--seed", type=int, default=defaults.seed, help="seeds the initial weights, batches and split")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"with --dataset: share of the images for model selection (default "
                   f"{data_defaults.val_fraction})")
    p.add_argument("--test-fraction", type=float, default=None,
                   help=f"with --dataset: share of the images for the card's test accuracy (default "
                   f"{data_defaults.test_fraction})")
    p.add_argument("--adversarial", action="store_true",
                   help="MNIST models: ELU + FGM adversarial training (name gets -adv)")
    p.add_argument("--shift", type=int, default=None,
                   help=f"augmentation: random zero-filled shifts up to N pixels (default {defaults.shift} for MNIST, "
                   f"{data_defaults.shift} with --dataset)")
    p.add_argument("--out", type=Path, default=Path("models"), help="folder for weights and card")
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    p.add_argument("--limit", type=int, default=None,
                   help="smoke runs: the first N images of each MNIST split, or with --dataset a seeded, stratified "
                   "subset of N images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def _fail(message: str) -> int:
    print(f"fisher-guard train-model: {message}", file=sys.stderr)
    return 2


def _arch_args(items: list[str] | None) -> dict[str, int | float | str]:
    """KEY=VALUE pairs; values read as int, then float, else kept as text."""
    out: dict[str, int | float | str] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--arch-arg {item!r} is not KEY=VALUE")
        value: int | float | str = text
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        out[key] = value
    return out


def default_name(architecture: str, dataset: str) -> str:
    """'<architecture>-<dataset>' in file-name characters, e.g. 'small-cnn-digits', 'resnet18-rgb-digits'."""
    arch = architecture.removeprefix("torchvision:")
    if dataset.startswith(("mnist:", "data:")):
        stem = dataset.removeprefix("data:")
    else:
        path = Path(dataset)
        stem = path.name if path.is_dir() else path.stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{arch}-{stem}").strip("-.")
    return name[:64] or arch


def load_training_data(spec: str) -> LabelledImages:
    """The labelled images a `--dataset` spec names: a server-side name through the settings' data folders, or
    a path (.npz, ImageFolder folder, zip); the shape and classes come from the data."""
    from service.config import get_settings
    from service.data.datasets import DatasetLimits, load_dataset_by_name, read_labelled

    settings = get_settings()
    limits = DatasetLimits(max_items=settings.dataset_max_items, max_bytes=int(settings.dataset_max_mb * 1024 * 1024),
                           max_side=settings.max_image_side, max_pixels=settings.max_image_pixels)
    if spec.startswith(("mnist:", "data:")):
        return load_dataset_by_name(spec, settings.dataset_folders, None, None, None, limits)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--dataset {spec}: no such file or folder (nor a name mnist:* / data:<name>)")
    return read_labelled(path, name=path.name, shape=None, num_classes=None, limits=limits)


def run(args: argparse.Namespace) -> int:
    if args.dataset is None:
        return _run_mnist(args)
    return _run_dataset(args)


def mnist_config(args: argparse.Namespace) -> TrainConfig:
    """The MNIST run that parsed arguments without --dataset ask for."""
    return TrainConfig(name=args.name or TrainConfig.name, epochs=args.epochs, seed=args.seed,
                       adversarial=args.adversarial, threads=args.threads, limit=args.limit,
                       shift=TrainConfig.shift if args.shift is None else args.shift, lr=args.lr,
                       batch_size=args.batch_size, weight_decay=args.weight_decay)


def dataset_config(args: argparse.Namespace) -> DatasetTrainConfig:
    """The dataset run that parsed arguments with --dataset ask for (ValueError for inconsistent options)."""
    defaults = DatasetTrainConfig(dataset="", name="x")
    architecture = args.architecture or defaults.architecture
    return DatasetTrainConfig(
        dataset=args.dataset, name=args.name or default_name(architecture, args.dataset),
        architecture=architecture, epochs=args.epochs, seed=args.seed, lr=args.lr, batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        val_fraction=defaults.val_fraction if args.val_fraction is None else args.val_fraction,
        test_fraction=defaults.test_fraction if args.test_fraction is None else args.test_fraction,
        shift=defaults.shift if args.shift is None else args.shift, threads=args.threads, limit=args.limit,
        architecture_kwargs=_arch_args(args.arch_arg))


def _run_mnist(args: argparse.Namespace) -> int:
    from service.zoo.training import train_and_save

    given = [f"--{opt.replace('_', '-')}" for opt in DATASET_ONLY if getattr(args, opt) is not None]
    if given:
        return _fail(f"{', '.join(given)}: only with --dataset (the MNIST models have fixed architectures "
                     "and a fixed split)")
    if (args.name or TrainConfig.name) not in SHIPPED_MODELS:
        return _fail(f"--name {args.name!r}: without --dataset one of {', '.join(SHIPPED_MODELS)}")
    card = train_and_save(mnist_config(args), args.out, progress=not args.no_progress)
    print(f"{card.name}: test accuracy {card.test_accuracy:.4f} -> {args.out / card.weights} (sha256 {card.sha256})")
    return 0


def _run_dataset(args: argparse.Namespace) -> int:
    import time

    from service.zoo.training import train_and_save

    if args.adversarial:
        return _fail("--adversarial is for the MNIST models; it does not combine with --dataset")
    try:
        config = dataset_config(args)
        data = load_training_data(args.dataset)
        start = time.perf_counter()
        card = train_and_save(config, args.out, progress=not args.no_progress, data=data)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    seconds = time.perf_counter() - start
    print(f"{card.name}: test accuracy {card.test_accuracy:.4f}, trained in {seconds:.1f} s -> "
          f"{args.out / card.weights} (sha256 {card.sha256})")
    return 0
