"""The paper's Algorithm 1, kept faithful for comparison: power iteration on G_x eta = E_y[(g_y . eta) g_y].

g_y = grad_x(-log p(y|x)). "As written" takes the expectation over all K classes with K fresh gradients per
step; with `sampling="alias"` it estimates it from classes drawn with Walker's alias method (Marsaglia, Tsang
and Wang 2004), about K/5 draws per step as the paper suggests; line 7's lambda* = E_y[(g_y . eta)^2] is then evaluated
exactly (one jvp), not from the samples that built eta. One image at a time, as in the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import jvp


class AliasTable:
    """Walker's alias method (Vose's construction): O(K) set-up, O(1) draws from a discrete distribution."""

    def __init__(self, probs: Tensor) -> None:
        p = (probs.double() / probs.double().sum()).tolist()
        n = len(p)
        scaled = [pi * n for pi in p]
        self.prob = [0.0] * n
        self.alias = [0] * n
        small = [i for i, s in enumerate(scaled) if s < 1.0]
        large = [i for i, s in enumerate(scaled) if s >= 1.0]
        while small and large:
            s, big = small.pop(), large.pop()
            self.prob[s], self.alias[s] = scaled[s], big
            scaled[big] = scaled[big] + scaled[s] - 1.0
            (small if scaled[big] < 1.0 else large).append(big)
        for i in small + large:
            self.prob[i] = 1.0
        self.n = n

    def sample(self, count: int, generator: torch.Generator) -> list[int]:
        cols = torch.randint(self.n, (count,), generator=generator).tolist()
        coins = torch.rand(count, generator=generator, dtype=torch.float64).tolist()
        return [c if u < self.prob[c] else self.alias[c] for c, u in zip(cols, coins, strict=True)]


def _class_gradients(model: nn.Module, x: Tensor, classes: list[int]) -> tuple[Tensor, Tensor]:
    """Fresh gradients g_y = grad_x(-log p_y) for the listed classes at one image x (1, *S): (len, D), probs."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logp = torch.log_softmax(model(x), dim=-1)[0]
        grads = [
            torch.autograd.grad(-logp[y], x, retain_graph=i + 1 < len(classes))[0].reshape(-1)
            for i, y in enumerate(classes)
        ]
    return torch.stack(grads), logp.detach().exp()


def power_iteration_top(
    model: nn.Module,
    x: Tensor,
    *,
    sampling: str,
    max_iter: int,
    tol: float,
    num_samples: int | None,
    generator: torch.Generator,
) -> tuple[float, Tensor, Tensor, int, float]:
    """Algorithm 1 lines 1-7 for one image x (1, *S).

    Returns (lambda*, eta (D,), probs (K,), iterations, last step size ||eta_new - eta_old||).
    """
    with torch.no_grad():
        probs = torch.softmax(model(x).double(), dim=-1)[0]
    num_classes = probs.shape[0]
    dim = x[0].numel()
    eta = torch.randn(dim, generator=generator, dtype=torch.float64).to(x.device, x.dtype)
    eta = eta / eta.norm()
    table = AliasTable(probs) if sampling == "alias" else None
    draws = num_samples or max(1, round(num_classes / 5))
    change = float("inf")
    steps = 0
    for step in range(1, max_iter + 1):
        steps = step
        if table is None:
            classes = list(range(num_classes))
            grads, _ = _class_gradients(model, x, classes)
            weights = probs.to(x.dtype)
        else:
            classes = table.sample(draws, generator)
            grads, _ = _class_gradients(model, x, classes)
            weights = torch.full((len(classes),), 1.0 / len(classes), dtype=x.dtype, device=x.device)
        new = (weights * (grads @ eta)) @ grads
        new = new / new.norm().clamp(min=torch.finfo(x.dtype).tiny)
        change = float((new - eta).norm())
        eta = new
        if change <= tol:
            break
    if table is None:
        lam = float((weights.double() * (grads @ eta).double() ** 2).sum())
    else:
        lam = rayleigh_quotient(model, x, eta, probs)
    return lam, eta, probs, steps, change


def rayleigh_quotient(model: nn.Module, x: Tensor, eta: Tensor, probs: Tensor) -> float:
    """Line 7, lambda* = E_y[(g_y . eta)^2] = eta^T G_x eta, evaluated exactly with one jvp: with u = J eta,
    E_y[(g_y . eta)^2] = u^T (diag(p) - p p^T) u. Reusing the sampled gradients of the last step instead
    would bias lambda* upwards (eta was built from those very samples)."""
    _, u = jvp(model, (x,), (eta.reshape(x.shape),))
    u = u[0].double()
    return float((probs * u * u).sum() - (probs * u).sum() ** 2)
