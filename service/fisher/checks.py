"""Argument checks shared by the spectrum routes and the attacks: clear errors that name the argument."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn


def check_images(images: Tensor, name: str = "images") -> Tensor:
    """Return `images` as an (N, C, H, W)-like batch, refusing empty, non-finite or non-tensor input."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.ndim < 2:
        raise ValueError(f"{name}: expected a batch of shape (N, ...) with at least 2 dims, "
                         f"got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty (N = 0)")
    if not images.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return images


def check_k(k: int) -> int:
    """k is the number of eigenpairs asked for: a positive integer."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be an integer >= 1, got {k!r}")
    return k


def check_epsilon(epsilon: float, name: str = "epsilon") -> float:
    """An L2 radius in pixel space: finite and >= 0."""
    eps = float(epsilon)
    if not (eps >= 0.0 and eps != float("inf")):
        raise ValueError(f"{name}: must be a finite number >= 0, got {epsilon!r}")
    return eps


def check_labels(labels: Tensor | None, n: int, num_classes: int) -> Tensor | None:
    """Labels are optional; when given, one integer class per image, in range."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels: expected shape ({n},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError("labels: expected integer class indices")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels: class indices must lie in [0, {num_classes - 1}]")
    return labels.long()


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype that inputs must have for `model` (its first parameter or buffer)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


_num_classes: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def num_classes_of(model: nn.Module, images: Tensor) -> int:
    """K, from one forward pass on the first image; an image shape the model cannot take is a clear error.
    Remembered per model, image shape, dtype and parameter shapes, so a batch costs no extra pass."""
    key = (tuple(images.shape[1:]), images.dtype, images.device, tuple(p.shape for p in model.parameters()))
    known = _num_classes.get(model, {}).get(key)
    if known is not None:
        return known
    try:
        with torch.no_grad():
            logits = model(images[:1])
    except RuntimeError as err:
        raise ValueError(f"images: shape {tuple(images.shape[1:])} per image does not fit the model: {err}") from err
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != 1:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"images: the model must map (N, ...) images to (N, K) logits; got {shape} for one image")
    try:
        _num_classes.setdefault(model, {})[key] = int(logits.shape[1])
    except TypeError:  # a model that cannot be weakly referenced is simply not remembered
        pass
    return int(logits.shape[1])


def prepare_inputs(model: nn.Module, images: Tensor) -> Tensor:
    """Validate `images` and move them to the model's device and dtype."""
    images = check_images(images)
    device, dtype = model_device_dtype(model)
    return images.to(device=device, dtype=dtype)
