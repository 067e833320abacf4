"""Attack budgets from the data: the rule that chooses each detection attack's L2 budget on the fit images.

An L2 budget means something else for every input size, so the grid is stated per pixel: a budget of RMS r
changes each of the D values of an image by r on average, an L2 norm of r * sqrt(D) in [0, 1] pixel space.
The rule (`select_budgets`): for each attack with a budget, the smallest grid budget whose fooling rate on the
correctly classified fit images reaches `target` (default 80%); the largest grid budget when none does (and the
choice says it fell short). One-step attacks along a fixed direction (FGM, OSSA) compute it once for the whole
grid; the others run at each budget in increasing order and stop at the first that reaches the target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from service.attacks import attack_spec, direction_attack
from service.attacks.common import predict

# per-pixel RMS budgets (x sqrt(D) gives the L2 norm): about x1.4 apart, from invisible (a fragile model, such as a
# briefly trained ResNet-18, is fooled at RMS 0.0125 already: bench/results/byom-cpu.md) to coarse
RMS_GRID: tuple[float, ...] = (0.0045, 0.0063, 0.009, 0.0125, 0.018, 0.025, 0.035, 0.05, 0.07, 0.1, 0.14, 0.2, 0.28)
SELECT_RATE = 0.80
SELECT_IMAGES = 200  # correctly classified fit images the rule measures on (the first ones)
RULE = ("smallest L2 budget of the grid (per-pixel RMS x sqrt(D)) whose fooling rate on the correctly "
        "classified fit images reaches the target; the largest grid budget when none does")


@dataclass
class BudgetChoice:
    """One attack's budget: the grid it was chosen on, the fooling rate measured at each budget tried, the choice,
    whether the target was reached, and whether the user gave it instead."""

    attack: str
    chosen: float
    grid: list[float]
    fooling_rates: list[float | None]  # None: not measured (the scan stopped earlier)
    target: float
    reached: bool
    images: int
    overridden: bool = False
    rule: str = RULE

    def as_dict(self) -> dict:
        return asdict(self)


def budget_grid(image_shape: tuple[int, ...] | torch.Size, rms: tuple[float, ...] = RMS_GRID) -> list[float]:
    """The L2 budgets for images of this shape: each RMS of the grid times sqrt(D), rounded to 3 significant digits."""
    dim = math.prod(image_shape)
    return [float(f"{r * math.sqrt(dim):.3g}") for r in rms]


def _fooling_rates(model: nn.Module, name: str, images: Tensor, labels: Tensor, grid: list[float],
                   options: dict, target: float, full_curve: bool) -> list[float | None]:
    """Fooling rate at each budget, in increasing order; None past the first that reaches `target` unless
    `full_curve`."""
    rates: list[float | None] = [None] * len(grid)
    if name in ("fgm", "ossa"):
        at = direction_attack(model, images, labels, name, options.get("method", "exact"), options.get("max_classes"))
        measure = lambda eps: float((predict(model, at(eps)).argmax(-1) != labels).float().mean())  # noqa: E731
    else:
        spec = attack_spec(name)
        measure = lambda eps: spec.bind(eps, options_at(name, options, eps))(model, images, labels).fooling_rate  # noqa: E731
    for i, eps in enumerate(grid):
        rates[i] = measure(eps)
        if rates[i] >= target and not full_curve:
            break
    return rates


def options_at(name: str, options: dict, epsilon: float) -> dict:
    """An attack's options at a budget: BIM's step is a tenth of its budget (as in the detection protocol)."""
    if name == "bim":
        return {**options, "step_size": epsilon / 10}
    return options


def select_budgets(model: nn.Module, images: Tensor, labels: Tensor, attacks: dict[str, dict], *,
                   grid: list[float] | None = None, target: float = SELECT_RATE, max_images: int = SELECT_IMAGES,
                   overrides: dict[str, float] | None = None, full_curve: bool = False) -> dict[str, BudgetChoice]:
    """The budget of each attack (name -> its options) that has one, by the rule of this module, on the first
    `max_images` correctly classified images; `overrides` (name -> L2) are taken as given."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(attacks)
    if unknown:
        raise ValueError(f"epsilons: given for attacks that are not trained on: {', '.join(sorted(unknown))}")
    with torch.no_grad():
        correct = predict(model, images).argmax(-1).cpu() == labels.cpu()
    x, y = images[correct][:max_images], labels[correct][:max_images]
    grid = grid or budget_grid(tuple(images.shape[1:]))
    out: dict[str, BudgetChoice] = {}
    for name, options in attacks.items():
        if attack_spec(name).budget is None or name == "opt":  # C&W finds its own norm
            continue
        if name in overrides:
            eps = float(overrides[name])
            if not (math.isfinite(eps) and eps > 0):
                raise ValueError(f"epsilons: {name} must be a positive L2 norm, got {overrides[name]!r}")
            out[name] = BudgetChoice(name, eps, [], [], target, True, 0, overridden=True,
                                     rule="given by the user")
            continue
        if len(x) == 0:
            raise ValueError("select_budgets: the model classifies none of the fit images correctly")
        rates = _fooling_rates(model, name, x, y, grid, options, target, full_curve)
        hits = [eps for eps, r in zip(grid, rates, strict=True) if r is not None and r >= target]
        out[name] = BudgetChoice(name, hits[0] if hits else grid[-1], list(grid), rates, target, bool(hits), len(x))
    return out
