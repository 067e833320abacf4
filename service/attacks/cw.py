"""Opt: an optimisation attack in the manner of Carlini & Wagner's L2 attack.

minimise ||delta||_2^2 + c * max(Z_y - max_{i != y} Z_i, -confidence) over x + delta = (tanh(w) + 1) / 2,
which keeps the image in the box. The smallest successful perturbation seen is kept per image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from service.attacks.common import AttackResult, finish, project_l2, setup
from service.fisher.checks import check_epsilon


def cw_l2(model: nn.Module, images: Tensor, labels: Tensor | None = None, *, c: float = 1.0,
          confidence: float = 0.0, steps: int = 100, lr: float = 0.05, max_norm: float | None = None) -> AttackResult:
    """C&W-style L2 attack with a fixed trade-off `c`; `max_norm` (optional) projects the result onto that ball."""
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    c, confidence, lr = check_epsilon(c, "c"), check_epsilon(confidence, "confidence"), check_epsilon(lr, "lr")
    x, labels, original = setup(model, images, labels)
    w = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6)).detach().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    best = x.clone()
    best_norm = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    with torch.enable_grad():
        for _ in range(steps):
            adv = (torch.tanh(w) + 1) / 2
            logits = model(adv)
            true = logits.gather(1, labels[:, None]).squeeze(1)
            other = logits.masked_fill(torch.nn.functional.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
            margin = (true - other.amax(1)).clamp(min=-confidence)
            dist = (adv - x).flatten(1).pow(2).sum(1)
            optimizer.zero_grad()
            (dist + c * margin).sum().backward()
            optimizer.step()
            with torch.no_grad():
                success = (logits.argmax(1) != labels) & (dist.sqrt() < best_norm)
                best_norm = torch.where(success, dist.sqrt(), best_norm)
                best[success] = adv.detach()[success]
    if max_norm is not None:
        best = (x + project_l2(best - x, check_epsilon(max_norm, "max_norm"))).clamp(0, 1)
    return finish(model, x, best, labels, original)
