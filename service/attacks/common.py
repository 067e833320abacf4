"""What every attack shares: labels, losses, gradients, L2 steps in the [0, 1] box, and the result type."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.fisher.checks import check_labels, num_classes_of, prepare_inputs


@dataclass
class AttackResult:
    """Per image: the adversarial image, its L2 distance to the original, predictions before and after."""

    adversarial: Tensor
    perturbation_norm: Tensor
    labels: Tensor
    original_prediction: Tensor
    adversarial_prediction: Tensor
    fooled: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def fooling_rate(self) -> float:
        return float(self.fooled.float().mean())


def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Logits without a graph."""
    with torch.no_grad():
        return model(x)


def setup(model: nn.Module, images: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Validated images on the model's device, labels (default: the model's prediction), original prediction."""
    x = prepare_inputs(model, images)
    labels = check_labels(labels, x.shape[0], num_classes_of(model, x))
    pred = predict(model, x).argmax(-1)
    return x, (pred.clone() if labels is None else labels.to(x.device)), pred


def per_image_loss(model: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy per image, without a graph."""
    return F.cross_entropy(predict(model, x), labels, reduction="none")


def loss_gradient(model: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    """grad_x of the summed cross-entropy: per-image gradients (images do not interact in eval mode)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def l2_normalize(v: Tensor) -> Tensor:
    """Each image scaled to unit L2 norm (zero stays zero)."""
    norms = v.flatten(1).norm(dim=1).clamp(min=torch.finfo(v.dtype).tiny)
    return v / norms.view(-1, *([1] * (v.ndim - 1)))


def project_l2(delta: Tensor, epsilon: float) -> Tensor:
    """Project each perturbation onto the L2 ball of radius epsilon."""
    norms = delta.flatten(1).norm(dim=1)
    tiny = torch.finfo(delta.dtype).tiny
    scale = torch.where(norms > epsilon, epsilon / norms.clamp(min=tiny), torch.ones_like(norms))
    return delta * scale.view(-1, *([1] * (delta.ndim - 1)))


def step(x: Tensor, direction: Tensor, epsilon: float | Tensor) -> Tensor:
    """x + epsilon * direction, clipped to the [0, 1] box (so the perturbation's norm is <= epsilon)."""
    eps = torch.as_tensor(epsilon, dtype=x.dtype, device=x.device)
    if eps.ndim == 1:
        eps = eps.view(-1, *([1] * (x.ndim - 1)))
    return (x + eps * direction).clamp(0.0, 1.0)


def finish(model: nn.Module, x: Tensor, adversarial: Tensor, labels: Tensor, original: Tensor,
           **extras: Tensor) -> AttackResult:
    """Measure an attack's outcome: norms, new predictions, fooled = new prediction differs from the label."""
    adversarial = adversarial.detach()
    new = predict(model, adversarial).argmax(-1)
    return AttackResult(
        adversarial=adversarial,
        perturbation_norm=(adversarial - x).flatten(1).norm(dim=1),
        labels=labels,
        original_prediction=original,
        adversarial_prediction=new,
        fooled=new != labels,
        extras=extras,
    )
