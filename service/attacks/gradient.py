"""Gradient attacks of Kurakin et al.: FGM (L2-normalised gradient), OTCM (one step toward a random wrong
class) and BIM (iterative FGM projected onto the epsilon ball)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from service.attacks.common import AttackResult, finish, l2_normalize, loss_gradient, project_l2, setup, step
from service.fisher.checks import check_epsilon


def fgm_direction(model: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    """The unit-L2 loss gradient per image."""
    return l2_normalize(loss_gradient(model, x, labels))


def fgm(model: nn.Module, images: Tensor, labels: Tensor | None = None, epsilon: float = 1.0) -> AttackResult:
    """Fast gradient method, L2: x + epsilon * g / ||g||, g = grad_x CE(label)."""
    epsilon = check_epsilon(epsilon)
    x, labels, original = setup(model, images, labels)
    return finish(model, x, step(x, fgm_direction(model, x, labels), epsilon), labels, original)


def random_wrong_class(labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """A class drawn uniformly from the K - 1 classes other than each label."""
    offset = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
    return (labels + offset) % num_classes


def otcm(model: nn.Module, images: Tensor, labels: Tensor | None = None, epsilon: float = 1.0, *,
         seed: int = 0) -> AttackResult:
    """One-step target class method: x - epsilon * grad CE(target) / ||.||, target a random wrong class."""
    epsilon = check_epsilon(epsilon)
    x, labels, original = setup(model, images, labels)
    with torch.no_grad():
        num_classes = model(x[:1]).shape[-1]
    target = random_wrong_class(labels, num_classes, torch.Generator().manual_seed(seed))
    adversarial = step(x, -l2_normalize(loss_gradient(model, x, target)), epsilon)
    return finish(model, x, adversarial, labels, original, target=target)


def bim(model: nn.Module, images: Tensor, labels: Tensor | None = None, epsilon: float = 1.0, *,
        step_size: float = 0.1, steps: int = 20) -> AttackResult:
    """Basic iterative method, L2: FGM steps of `step_size`, projected onto the epsilon ball and the box."""
    epsilon, step_size = check_epsilon(epsilon), check_epsilon(step_size, "step_size")
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    x, labels, original = setup(model, images, labels)
    adv = x.clone()
    for _ in range(steps):
        moved = step(adv, fgm_direction(model, adv, labels), step_size)
        adv = (x + project_l2(moved - x, epsilon)).clamp(0.0, 1.0)
    return finish(model, x, adv, labels, original)
