"""The paper's MNIST architectures, in pixel space: normalisation lives inside the model.

LeNet-5 and the shallow VGG (VGG-16 without conv4-1..conv5-3, adapted to 28x28), each with ReLU or ELU
(the adversarially trained variants of the paper's Table 3 use ELU), and a small CNN for users' datasets of any
image size from 8x8 up (`fisher-guard train-model --dataset ... --architecture small-cnn`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from service.zoo.train_config import BUILTIN_ARCHITECTURES

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU}


class Normalize(nn.Module):
    """(x - mean) / std per channel, so that callers and attacks work in [0, 1] pixel space."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class LeNet5(nn.Module):
    """LeNet-5 for 1x28x28 inputs: conv 6@5x5 (pad 2), pool, conv 16@5x5, pool, fc 120, 84, K."""

    def __init__(self, num_classes: int = 10, activation: str = "relu", in_channels: int = 1,
                 mean: list[float] | None = None, std: list[float] | None = None) -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        self.normalize = Normalize(mean or [0.1307] * in_channels, std or [0.3081] * in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), act(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), act(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), act(), nn.Linear(120, 84), act(), nn.Linear(84, num_classes),
        )

    def embed(self, x: Tensor) -> Tensor:
        """The last hidden layer (84 units), used by the KD baseline."""
        return self.classifier[:-1](self.features(self.normalize(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)))


class ShallowVGG(nn.Module):
    """VGG-16's blocks 1-3 (conv 64,64 / 128,128 / 256,256,256, each block then max-pool) for 28x28, then
    fc 256, dropout, K. conv4-1..conv5-3 removed as in the paper; widths halved to train on a CPU."""

    def __init__(self, num_classes: int = 10, activation: str = "relu", in_channels: int = 1, width: int = 32,
                 mean: list[float] | None = None, std: list[float] | None = None, dropout: float = 0.5) -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        self.normalize = Normalize(mean or [0.1307] * in_channels, std or [0.3081] * in_channels)
        layers: list[nn.Module] = []
        c = in_channels
        for width_mult, repeats in ((1, 2), (2, 2), (4, 3)):
            for _ in range(repeats):
                layers += [nn.Conv2d(c, width * width_mult, 3, padding=1), nn.BatchNorm2d(width * width_mult), act()]
                c = width * width_mult
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)  # 28 -> 14 -> 7 -> 3
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * 3 * 3, 256), act(), nn.Dropout(dropout), nn.Linear(256, num_classes),
        )

    def embed(self, x: Tensor) -> Tensor:
        """The last hidden layer (256 units), used by the KD baseline."""
        return self.classifier[:-1](self.features(self.normalize(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)))


class SmallCNN(nn.Module):
    """Three 3x3 convolutions (padding 1; width, 2 width, 2 width channels), each with BatchNorm (folded into
    the convolution when served), a 2x2 max-pool after the second, a global average pool and one linear layer:
    any input of at least 2x2 pixels (sklearn's 8x8 digits, 32x32 RGB), any number of channels. About 57k
    parameters at width 32; 4 epochs on sklearn's digits take ~3 s on one CPU thread (~97% test accuracy; without
    BatchNorm, Adam at lr 1e-3 needed ~10 epochs for 93%)."""

    def __init__(self, num_classes: int = 10, activation: str = "relu", in_channels: int = 1, width: int = 32,
                 mean: list[float] | None = None, std: list[float] | None = None) -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        self.normalize = Normalize(mean or [0.5] * in_channels, std or [0.25] * in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), act(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), act(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), act(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """The pooled features (2 width units), used by the KD baseline."""
        return self.features(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)))


# the classes of BUILTIN_ARCHITECTURES, in its order (its names live without torch, for the CLI)
ARCHITECTURES: dict[str, type[nn.Module]] = dict(zip(BUILTIN_ARCHITECTURES, (LeNet5, ShallowVGG, SmallCNN),
                                                     strict=True))
