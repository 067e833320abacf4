"""The runs `train-model` can be asked for, as plain dataclasses without torch: the CLI's parser shows their
defaults and names on every `fisher-guard ... --help`, so they live apart from the training loop
(service.zoo.training), which takes them."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# the builtin architectures by name; service.zoo.architectures.ARCHITECTURES maps each to its class
BUILTIN_ARCHITECTURES: tuple[str, ...] = ("lenet5", "vgg-shallow", "small-cnn")
SHIPPED_MODELS = ("lenet5", "vgg-shallow", "lenet5-adv", "vgg-shallow-adv")
VGG_WIDTH = 16  # a quarter of VGG-16's widths (ShallowVGG defaults to 32): trains on 2 CPU cores in minutes


@dataclass
class TrainConfig:
    """Everything that determines a training run (with the seed, the weights are reproducible on one machine)."""

    name: str = "lenet5"
    epochs: int = 15
    seed: int = 0
    adversarial: bool = False
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epsilon_range: tuple[float, float] = (1.5, 2.0)
    shift: int = 2  # random translation of each training image by up to `shift` pixels (0: none)
    threads: int = 1  # one thread: on a shared 2-core machine, 2 OpenMP threads ran 4x slower
    limit: int | None = None  # use only the first `limit` train/val/test images (tests)

    @property
    def architecture(self) -> str:
        base = self.name.removesuffix("-adv")
        if base not in BUILTIN_ARCHITECTURES:
            raise ValueError(f"unknown model {self.name!r}: expected one of {', '.join(SHIPPED_MODELS)}")
        return base

    @property
    def model_name(self) -> str:
        """'<architecture>-adv' for adversarial training, else the architecture name."""
        return f"{self.architecture}-adv" if self.is_adversarial else self.architecture

    @property
    def is_adversarial(self) -> bool:
        return self.adversarial or self.name.endswith("-adv")

    @property
    def activation(self) -> str:
        return "elu" if self.is_adversarial else "relu"

    @property
    def architecture_kwargs(self) -> dict[str, int]:
        return {"width": VGG_WIDTH} if self.architecture == "vgg-shallow" else {}

    def command(self, out_dir: Path) -> str:
        """The CLI command that reproduces this run."""
        parts = ["fisher-guard", "train-model", "--name", self.model_name, "--epochs", str(self.epochs),
                 "--seed", str(self.seed), "--threads", str(self.threads), "--out", str(out_dir)]
        if self.shift != TrainConfig.shift:
            parts += ["--shift", str(self.shift)]
        if self.lr != TrainConfig.lr:
            parts += ["--lr", str(self.lr)]
        if self.batch_size != TrainConfig.batch_size:
            parts += ["--batch-size", str(self.batch_size)]
        if self.weight_decay != TrainConfig.weight_decay:
            parts += ["--weight-decay", str(self.weight_decay)]
        if self.limit is not None:
            parts += ["--limit", str(self.limit)]
        return shlex.join(parts)


Framework = Literal["builtin", "torchvision"]
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a model name is also its files' name
TORCHVISION_PREFIX = "torchvision:"
# constructor arguments the trainer sets itself (weights: nothing is downloaded, training starts from random values)
RESERVED_KWARGS = frozenset({"num_classes", "in_channels", "mean", "std", "activation", "weights", "weights_backbone",
                             "pretrained", "pretrained_backbone", "progress"})


@dataclass
class DatasetTrainConfig:
    """A run of `train-model --dataset`: a user's labelled images and a builtin or torchvision architecture.

    `dataset` is the `--dataset` spec as given (a .npz / ImageFolder folder / zip path, or a server-side name
    `mnist:*` / `data:<name>`); the caller loads it and passes the data to `train_and_save`."""

    dataset: str
    name: str
    architecture: str = "small-cnn"  # a builtin name, or 'torchvision:<name>' (e.g. 'torchvision:resnet18')
    epochs: int = 15
    seed: int = 0
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    shift: int = 0  # zero-filled shifts suit MNIST's black border, not every dataset: off unless asked for
    threads: int = 1
    limit: int | None = None  # train on a seeded, stratified subset of this many images (smoke runs, tests)
    architecture_kwargs: dict[str, int | float | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"model name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-' (it names "
                             "the weights and card files), starting with a letter or digit")
        if self.framework == "builtin" and self.architecture not in BUILTIN_ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}: expected one of "
                             f"{', '.join(BUILTIN_ARCHITECTURES)} or {TORCHVISION_PREFIX}<name>")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError("val and test fractions must each be in (0, 1) and add up to less than 1, got "
                             f"{self.val_fraction} and {self.test_fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.shift < 0:
            raise ValueError("epochs and batch size must be positive, lr > 0 and shift >= 0")
        reserved = sorted(set(self.architecture_kwargs) & RESERVED_KWARGS)
        if reserved:
            raise ValueError(f"architecture arguments {', '.join(reserved)} are set by the trainer (weights are "
                             "never downloaded: training starts from random values)")
        if self.limit is not None and self.limit < 3:
            raise ValueError(f"limit must be at least 3 images (train, val and test), got {self.limit}")

    @property
    def framework(self) -> Framework:
        return "torchvision" if self.architecture.startswith(TORCHVISION_PREFIX) else "builtin"

    @property
    def architecture_name(self) -> str:
        """The name the card records: 'small-cnn', or the torchvision name without its prefix ('resnet18')."""
        return self.architecture.removeprefix(TORCHVISION_PREFIX)

    def command(self, out_dir: Path) -> str:
        """The CLI command that reproduces this run (every option spelled out, so later defaults do not matter)."""
        parts = ["fisher-guard", "train-model", "--dataset", self.dataset, "--architecture", self.architecture,
                 "--name", self.name, "--epochs", str(self.epochs), "--seed", str(self.seed), "--lr", str(self.lr),
                 "--batch-size", str(self.batch_size), "--val-fraction", str(self.val_fraction),
                 "--test-fraction", str(self.test_fraction), "--shift", str(self.shift),
                 "--threads", str(self.threads), "--out", str(out_dir)]
        if self.weight_decay != DatasetTrainConfig.weight_decay:
            parts += ["--weight-decay", str(self.weight_decay)]
        for key, value in sorted(self.architecture_kwargs.items()):
            parts += ["--arch-arg", f"{key}={value}"]
        if self.limit is not None:
            parts += ["--limit", str(self.limit)]
        return shlex.join(parts)
