"""The feature-squeezing detector of Xu, Evans and Qi (NDSS 2018), as a baseline beside ours.

score(x) = max over squeezers s of || softmax(model(x)) - softmax(model(s(x))) ||_1; an image is flagged when its
score reaches the threshold, set on clean images at a target false-positive rate. The squeezers are the paper's:
for MNIST-like (1-channel) images 1-bit depth and 2x2 median smoothing; for other images 5-bit depth and 2x2
median smoothing, and, in place of the paper's third, non-local means (not in torch or torchvision), 3x3 median
smoothing: like non-local means a local, edge-preserving denoiser, and one the paper also measured. The median
smoothing is service.detect.features' (edges replicated; an even window takes the lower middle value).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn

from service.attacks.common import predict
from service.detect.detector import threshold_at_fpr
from service.detect.features import median_smooth
from service.fisher.checks import prepare_inputs

BATCH_SIZE = 256


def bit_depth(images: Tensor, bits: int) -> Tensor:
    """Each value rounded to the nearest of the 2^bits evenly spaced levels of [0, 1] (bit-depth reduction)."""
    levels = 2 ** bits - 1
    return torch.round(images * levels) / levels


SQUEEZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "bits1": partial(bit_depth, bits=1),
    "bits5": partial(bit_depth, bits=5),
    "median2": partial(median_smooth, size=2),
    "median3": partial(median_smooth, size=3),
}
MNIST_SQUEEZERS = ("bits1", "median2")
NATURAL_SQUEEZERS = ("bits5", "median2", "median3")


def squeezers_for(channels: int) -> tuple[str, ...]:
    """The paper's squeezers for 1-channel (MNIST-like) images, else those for natural images."""
    return MNIST_SQUEEZERS if channels == 1 else NATURAL_SQUEEZERS


class FeatureSqueezing:
    """Feature squeezing on `model` (pixel space [0, 1], logits out) with the named squeezers: `fit` sets the
    threshold on clean images, `score` and `flag` screen images."""

    def __init__(self, model: nn.Module, squeezers: Sequence[str]) -> None:
        unknown = [name for name in squeezers if name not in SQUEEZERS]
        if unknown or not squeezers:
            raise ValueError(f"squeezers: unknown or none {unknown} (known: {', '.join(SQUEEZERS)})")
        self.model = model
        self.squeezers = tuple(squeezers)
        self.threshold: float | None = None
        self.target_fpr: float | None = None

    @classmethod
    def for_images(cls, model: nn.Module, image_shape: Sequence[int]) -> FeatureSqueezing:
        """The paper's squeezers for images of this (C, H, W) shape."""
        return cls(model, squeezers_for(int(image_shape[0])))

    def score(self, images: Tensor) -> np.ndarray:
        """(N,) float64: the largest L1 distance between the output probabilities of an image and a squeezing."""
        out = []
        for start in range(0, images.shape[0], BATCH_SIZE):
            x = prepare_inputs(self.model, images[start:start + BATCH_SIZE])
            p = torch.softmax(predict(self.model, x).double(), -1)
            distances = [(p - torch.softmax(predict(self.model, SQUEEZERS[name](x)).double(), -1)).abs().sum(-1)
                         for name in self.squeezers]
            out.append(torch.stack(distances).max(0).values.cpu())
        return torch.cat(out).numpy()

    def fit(self, clean_images: Tensor, target_fpr: float) -> FeatureSqueezing:
        """The threshold: the smallest at which at most `target_fpr` of `clean_images` score at or above it."""
        self.threshold = threshold_at_fpr(self.score(clean_images), target_fpr)
        self.target_fpr = float(target_fpr)
        return self

    def flag(self, images: Tensor) -> np.ndarray:
        """(N,) bool: score >= threshold (fit first)."""
        if self.threshold is None:
            raise ValueError("feature squeezing: fit the threshold on clean images first")
        return self.score(images) >= self.threshold
