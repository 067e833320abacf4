"""The One-Step Spectral Attack (Algorithm 1 lines 8-10) and its iterative form (Figure 2b)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from service.attacks.common import AttackResult, finish, per_image_loss, project_l2, setup, step
from service.fisher.checks import check_epsilon
from service.fisher.spectrum import Method, fisher_spectrum


def top_direction(model: nn.Module, x: Tensor, method: Method = "auto",
                  max_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """The unit top eigenvector of G_x per image (unsigned) and its eigenvalue (`max_classes`: the truncated
    route's cap on the classes it keeps)."""
    spectrum = fisher_spectrum(model, x, k=1, method=method, return_vectors=True, max_classes=max_classes)
    return spectrum.eigenvectors[:, 0], spectrum.eigenvalues[:, 0]


def signed_step(model: nn.Module, x: Tensor, direction: Tensor, labels: Tensor, epsilon: float | Tensor) -> Tensor:
    """x +/- epsilon * direction in the box, the sign chosen per image so that the loss is the larger one.

    An eigenvector is a line, not a direction; the paper flips eta when J(x + eta) <= J(x). Comparing both
    signs at the step actually taken makes the loss increase whenever either side increases it.
    """
    plus, minus = step(x, direction, epsilon), step(x, -direction, epsilon)
    keep = per_image_loss(model, plus, labels) >= per_image_loss(model, minus, labels)
    return torch.where(keep.view(-1, *([1] * (x.ndim - 1))), plus, minus)


def ossa(model: nn.Module, images: Tensor, labels: Tensor | None = None, epsilon: float = 1.0, *,
         method: Method = "auto", max_classes: int | None = None) -> AttackResult:
    """One step of L2 size epsilon along the top eigenvector of G_x, signed to raise the loss."""
    epsilon = check_epsilon(epsilon)
    x, labels, original = setup(model, images, labels)
    direction, top = top_direction(model, x, method, max_classes)
    adversarial = signed_step(model, x, direction, labels, epsilon)
    return finish(model, x, adversarial, labels, original, top_eigenvalue=top)


def iterative_ossa(model: nn.Module, images: Tensor, labels: Tensor | None = None, epsilon: float = 2.0, *,
                   step_size: float = 0.05, steps: int = 50, method: Method = "auto",
                   max_classes: int | None = None) -> AttackResult:
    """Repeated OSSA steps of size `step_size`, each along the top eigenvector at the current point,
    projected onto the epsilon ball around the original and into the box."""
    epsilon, step_size = check_epsilon(epsilon), check_epsilon(step_size, "step_size")
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    x, labels, original = setup(model, images, labels)
    adv = x.clone()
    top0 = None
    for _ in range(steps):
        direction, top = top_direction(model, adv, method, max_classes)
        top0 = top if top0 is None else top0
        moved = signed_step(model, adv, direction, labels, step_size)
        adv = (x + project_l2(moved - x, epsilon)).clamp(0.0, 1.0)
    return finish(model, x, adv, labels, original, top_eigenvalue=top0)
