"""Least-norm search (paper Table 2, Figure 3): per image, the smallest epsilon in [low, high] at which a
one-step attack fools the model, by binary search along the attack's fixed direction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from service.attacks.common import AttackResult, predict, setup, step
from service.attacks.gradient import fgm_direction
from service.attacks.ossa import signed_step, top_direction
from service.fisher.checks import check_epsilon

ONE_STEP_ATTACKS = ("ossa", "fgm")


def direction_attack(model: nn.Module, x: Tensor, labels: Tensor, attack: str = "ossa",
                     method: str = "auto", max_classes: int | None = None) -> Callable[[float | Tensor], Tensor]:
    """A one-step attack's direction computed once, as `epsilon -> adversarial images` (FGM: the loss gradient;
    OSSA: the top eigenvector of G_x, signed to raise the loss)."""
    if attack not in ONE_STEP_ATTACKS:
        raise ValueError(f"attack: must be one of {', '.join(ONE_STEP_ATTACKS)}, got {attack!r}")
    if attack == "fgm":
        direction = fgm_direction(model, x, labels)
        return lambda eps: step(x, direction, eps)
    direction, _ = top_direction(model, x, method, max_classes)  # type: ignore[arg-type]
    return lambda eps: signed_step(model, x, direction, labels, eps)


@dataclass
class LeastNormResult:
    """least_norm: smallest epsilon found that fools (inf where even `high` does not); lower: the largest
    epsilon found that does not fool (least_norm - lower <= tol where found; `high` where not found; `low`
    where `low` already fools); adversarial at least_norm (at `high` where not found)."""

    least_norm: Tensor
    lower: Tensor
    found: Tensor
    adversarial: Tensor
    perturbation_norm: Tensor
    labels: Tensor
    original_prediction: Tensor
    adversarial_prediction: Tensor


def least_norm_search(model: nn.Module, images: Tensor, labels: Tensor | None = None, attack: str = "ossa", *,
                      low: float = 0.0, high: float = 6.0, tol: float = 1e-3, method: str = "auto") -> LeastNormResult:
    """Binary search of the least L2 epsilon in [low, high] that fools the model, batched over images."""
    if attack not in ONE_STEP_ATTACKS:
        raise ValueError(f"attack: must be one of {', '.join(ONE_STEP_ATTACKS)}, got {attack!r}")
    low, high, tol = check_epsilon(low, "low"), check_epsilon(high, "high"), check_epsilon(tol, "tol")
    if not (high > low and tol > 0):
        raise ValueError(f"high, low, tol: need high > low and tol > 0, got low={low}, high={high}, tol={tol}")
    x, labels, original = setup(model, images, labels)
    attack_at = direction_attack(model, x, labels, attack, method)
    fools = lambda eps: predict(model, attack_at(eps)).argmax(-1) != labels  # noqa: E731
    n = x.shape[0]
    lo = torch.full((n,), low, dtype=x.dtype, device=x.device)
    hi = torch.full((n,), high, dtype=x.dtype, device=x.device)
    already = fools(lo)
    found = already | fools(hi)
    # invariant for the images still searched: `hi` fools and `lo` does not; the others are settled
    hi = torch.where(already, lo, hi)
    lo = torch.where(found, lo, hi)
    while bool(((hi - lo) > tol).any()):
        mid = (lo + hi) / 2
        searching = (hi - lo) > tol
        ok = fools(mid)
        hi = torch.where(searching & ok, mid, hi)
        lo = torch.where(searching & ~ok, mid, lo)
    adversarial = attack_at(hi)
    least = torch.where(found, hi, torch.full_like(hi, float("inf")))
    return LeastNormResult(
        least_norm=least, lower=lo, found=found, adversarial=adversarial,
        perturbation_norm=(adversarial - x).flatten(1).norm(dim=1), labels=labels,
        original_prediction=original, adversarial_prediction=predict(model, adversarial).argmax(-1),
    )


def least_norm(model: nn.Module, images: Tensor, labels: Tensor | None = None, high: float = 6.0, *,
               base_attack: str = "ossa", low: float = 0.0, tol: float = 1e-3, method: str = "auto") -> AttackResult:
    """`least_norm_search` called as every attack is: the adversarial image at the least fooling epsilon (at
    `high` where none fools), with `least_norm`, `lower` and `found` per image in `extras`."""
    search = least_norm_search(model, images, labels, base_attack, low=low, high=high, tol=tol, method=method)
    return AttackResult(adversarial=search.adversarial, perturbation_norm=search.perturbation_norm,
                        labels=search.labels, original_prediction=search.original_prediction,
                        adversarial_prediction=search.adversarial_prediction,
                        fooled=search.adversarial_prediction != search.labels,
                        extras={"least_norm": search.least_norm, "lower": search.lower, "found": search.found})
