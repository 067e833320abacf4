"""Adaptive attacks: attackers who know the detector (white-box) or may query its score (black-box).

Every attack is called the same way, `run_adaptive(name, target, images, labels, budget, effort, seed)`, and returns
per image its best adversarial within the L2 budget: among the candidates the model misclassifies, the one the REAL
detector scores lowest (the clean image where none fooled). White-box attacks minimise, with PGD-L2 in the [0, 1]
box (random restarts, a decaying step), a misclassification hinge plus an evasion term, and score every few
iterates with the real detector, keeping each image's best; each sweeps a few settings (confidence, weight) and
keeps the best per image, so a setting that suits one image does not have to suit all.

- high-confidence: the hinge alone at confidence kappa (logit margin), deep past the boundary;
- squeeze-bpda: misclassified through the squeezings the features probe as well (1-bit or bit-depth reduction with
  a straight-through backward pass, BPDA; median smoothing and the 3x3 blur differentiated as they are);
- blur-start: the hinge from a Gaussian blur of the image (projected onto the ball): an attacker who knows that the
  detector lets blurred images through and starts from one;
- fisher-penalty: plus the distance of the detector's features to their clean mean (z-scored), so that the Fisher
  quantities look clean (service.detect.features.differentiable_features: the exact route with its graph);
- surrogate: plus the logit of a differentiable surrogate of the forest, an MLP distilled from the detector's own
  scores on the same features (`fit_surrogate`);
- score-query: black-box on the detector: a random search (localised Gaussian squares, shrinking; Square-attack
  style) that queries only the screen's score and the model's label, from a high-confidence start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from service.attacks.common import l2_normalize, project_l2
from service.detect.detector import Detector
from service.detect.features import box_blur, differentiable_features, median_smooth
from service.evaluate.shifts import gaussian_blur

NOT_FOOLED = 2.0  # the key of a candidate the model still classifies right (detector scores lie in [0, 1])


@dataclass(frozen=True)
class Effort:
    """How hard the attacks try: PGD steps and restarts (fewer for the attacks that differentiate the Fisher
    features, whose steps cost K-1 double-backward passes each), how often the real detector scores the iterates,
    and the score-query attack's queries per image."""

    steps: int
    restarts: int
    check_every: int
    queries: int
    feature_steps: int
    feature_restarts: int

    def for_features(self) -> Effort:
        """The effort of an attack through the features: its own steps and restarts."""
        return replace(self, steps=self.feature_steps, restarts=self.feature_restarts)


EFFORTS: dict[str, Effort] = {
    "quick": Effort(steps=10, restarts=1, check_every=5, queries=20, feature_steps=4, feature_restarts=1),  # tests
    "full": Effort(steps=100, restarts=2, check_every=10, queries=500, feature_steps=30, feature_restarts=1),
    # the convergence check of `full`: twice everything
    "double": Effort(steps=200, restarts=4, check_every=10, queries=1000, feature_steps=60, feature_restarts=2),
}


class Surrogate(nn.Module):
    """A differentiable stand-in for the forest: an MLP on z-scored features whose logit tracks the forest's score."""

    def __init__(self, mean: Tensor, std: Tensor, hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        width = mean.shape[0]
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        z = ((features - self.mean) / self.std).clamp(-50, 50)
        return self.net(z.to(self.net[0].weight.dtype)).squeeze(-1)


def feature_scale(features: np.ndarray) -> tuple[Tensor, Tensor]:
    """Column means and standard deviations (floored) of a feature matrix, as float64 tensors."""
    mean = torch.from_numpy(features.mean(0))
    std = torch.from_numpy(features.std(0)).clamp(min=1e-6)
    return mean, std


def fit_surrogate(features: np.ndarray, scores: np.ndarray, seed: int = 0, epochs: int = 400) -> Surrogate:
    """Distil the detector's scores (in [0, 1]) on these feature rows into a Surrogate (cross-entropy to the soft
    scores, Adam, full batch)."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = feature_scale(features)
    torch.manual_seed(seed)
    surrogate = Surrogate(mean, std).double()
    x = torch.from_numpy(features)
    y = torch.from_numpy(np.clip(scores, 0, 1)).double()
    optimiser = torch.optim.Adam(surrogate.parameters(), lr=3e-3, weight_decay=1e-4)
    order = torch.randperm(len(x), generator=generator)
    x, y = x[order], y[order]
    for _ in range(epochs):
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(surrogate(x), y)
        loss.backward()
        optimiser.step()
    return surrogate.eval().requires_grad_(False)


@dataclass
class Target:
    """What the attacker attacks: the model, the detector (its threshold is the verdict), and what the feature
    attacks need: the clean fit images' feature scale and the surrogate (None: those attacks are skipped)."""

    model: nn.Module
    detector: Detector
    clean_mean: Tensor | None = None
    clean_std: Tensor | None = None
    surrogate: Surrogate | None = None
    batch_size: int = 128

    def screen(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The real detector's scores and the model's predictions."""
        scores, predictions = [], []
        for chunk in images.split(self.batch_size):
            result = self.detector.score(self.model, chunk.detach())
            scores.append(result.scores)
            predictions.append(result.predictions)
        return np.concatenate(scores), np.concatenate(predictions)

    def keys(self, images: Tensor, labels: Tensor) -> np.ndarray:
        """Per candidate: its detector score where the model misclassifies it, else NOT_FOOLED (lower is better)."""
        scores, predictions = self.screen(images)
        return np.where(predictions != labels.cpu().numpy(), scores, NOT_FOOLED)


@dataclass
class AdaptiveResult:
    """Per image: the best adversarial found, whether it fools the model, the detector's score and verdict, its L2."""

    adversarial: Tensor
    fooled: np.ndarray
    scores: np.ndarray
    flagged: np.ndarray
    norms: np.ndarray
    settings: list[dict[str, Any]] = field(default_factory=list)


def hinge(logits: Tensor, labels: Tensor, kappa: float) -> Tensor:
    """max(0, z_y - max_{j != y} z_j + kappa) per image: zero once misclassified with logit margin kappa."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(torch.nn.functional.one_hot(labels, logits.shape[1]).bool(), -torch.inf).amax(1)
    return (true - other + kappa).clamp(min=0)


def straight_through(x: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
    """transform(x) forward, identity backward (BPDA for a non-differentiable step such as quantisation)."""
    return x + (transform(x) - x).detach()


def squeezings(images: Tensor) -> list[Callable[[Tensor], Tensor]]:
    """The squeezings the attacker passes through: for one-channel images the 1-bit squeezing at 0.5 (straight
    through), else 5-bit depth (straight through); both: 2x2 median smoothing and the 3x3 box blur."""
    if images.shape[1] == 1:
        quantise = lambda x: straight_through(x, lambda t: (t >= 0.5).to(t.dtype))  # noqa: E731
    else:
        quantise = lambda x: straight_through(x, lambda t: torch.round(t * 31) / 31)  # noqa: E731
    return [quantise, lambda x: median_smooth(x, 2), box_blur]


Loss = Callable[[Tensor, Tensor], Tensor]  # (candidates, labels) -> per-image loss to minimise


def high_confidence_loss(target: Target, kappa: float, **start: float) -> Loss:
    """The hinge alone (`start`: the settings of a spec's start, which the loss does not read)."""
    return lambda x, labels: hinge(target.model(x), labels, kappa)


def blurred(images: Tensor, sigma: float, **loss: float) -> Tensor:
    """The blur-start attack's starting images: a Gaussian blur of `sigma` pixels."""
    return gaussian_blur(images, sigma)


def squeeze_loss(target: Target, kappa: float) -> Loss:
    def loss(x: Tensor, labels: Tensor) -> Tensor:
        return sum((hinge(target.model(s(x)), labels, kappa) for s in squeezings(x)),
                   hinge(target.model(x), labels, kappa))
    return loss


def fisher_penalty_loss(target: Target, kappa: float, weight: float) -> Loss:
    mean, std = target.clean_mean, target.clean_std

    def loss(x: Tensor, labels: Tensor) -> Tensor:
        features = differentiable_features(target.model, x, target.detector.feature_set, target.detector.k)
        z = (features - mean.to(features)) / std.to(features)
        return hinge(target.model(x), labels, kappa) + weight * (z * z).clamp(max=1e4).mean(1).to(x.dtype)
    return loss


def surrogate_loss(target: Target, kappa: float, weight: float) -> Loss:
    def loss(x: Tensor, labels: Tensor) -> Tensor:
        features = differentiable_features(target.model, x, target.detector.feature_set, target.detector.k)
        return hinge(target.model(x), labels, kappa) + weight * target.surrogate(features).to(x.dtype)
    return loss


def _random_start(images: Tensor, budget: float, generator: torch.Generator) -> Tensor:
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
    return ((images + 0.5 * budget * l2_normalize(noise)).clamp(0, 1) - images)


def pgd_l2(target: Target, loss: Loss, images: Tensor, labels: Tensor, budget: float, effort: Effort,
           generator: torch.Generator, best: tuple[Tensor, np.ndarray],
           start: Tensor | None = None) -> tuple[Tensor, np.ndarray]:
    """Minimise `loss` over the L2 ball of radius `budget` around `images` inside [0, 1]: normalised-gradient steps
    from budget/4 down to budget/50, from `start` (default: the images; projected onto the ball), restarts from
    random points about it; every `check_every` steps and at the end the real detector scores the iterates and each
    image keeps its best (`best`: the candidates and keys so far)."""
    best_x, best_key = best[0].clone(), best[1].copy()
    origin = torch.zeros_like(images) if start is None else project_l2(start.detach() - images, budget)
    for restart in range(effort.restarts):
        delta = origin.clone() if restart == 0 else origin + _random_start(images, budget, generator)
        if start is not None:
            delta = (images + project_l2(delta, budget)).clamp(0, 1) - images
        for step in range(effort.steps):
            candidate = (images + delta).detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(loss(candidate, labels).sum(), candidate)
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            rate = budget * (0.25 + (0.02 - 0.25) * step / max(1, effort.steps - 1))
            delta = project_l2(delta - rate * l2_normalize(grad), budget)
            delta = (images + delta).clamp(0, 1) - images
            if (step + 1) % effort.check_every == 0 or step + 1 == effort.steps:
                keys = target.keys(images + delta, labels)
                better = keys < best_key
                best_x[torch.as_tensor(better)] = (images + delta)[torch.as_tensor(better)].detach()
                best_key = np.where(better, keys, best_key)
    return best_x, best_key


def score_query(target: Target, images: Tensor, labels: Tensor, budget: float, effort: Effort,
                generator: torch.Generator, best: tuple[Tensor, np.ndarray]) -> tuple[Tensor, np.ndarray]:
    """Black-box random search on the detector's score: from `best` (a high-confidence start), each query adds a
    Gaussian square of side from 30% of the image down to 2 px and of L2 size from budget/3 down to budget/30,
    projects onto the ball and the box, and keeps it where the model is still fooled and the score is lower."""
    x, key = best[0].clone(), best[1].copy()
    n, _, height, width = images.shape
    for query in range(effort.queries):
        progress = query / max(1, effort.queries - 1)
        side = max(2, round(min(height, width) * (0.3 + (0.0 - 0.3) * progress)))
        size = budget * (1 / 3 + (1 / 30 - 1 / 3) * progress)
        rows = torch.randint(0, height - side + 1, (n,), generator=generator)
        cols = torch.randint(0, width - side + 1, (n,), generator=generator)
        noise = torch.zeros_like(images)
        patch = torch.randn((n, images.shape[1], side, side), generator=generator, dtype=images.dtype)
        for i in range(n):
            noise[i, :, rows[i]:rows[i] + side, cols[i]:cols[i] + side] = patch[i].to(images.device)
        delta = project_l2(x - images + size * l2_normalize(noise), budget)
        proposal = (images + delta).clamp(0, 1)
        keys = target.keys(proposal, labels)
        better = keys < key
        x[torch.as_tensor(better)] = proposal[torch.as_tensor(better)]
        key = np.where(better, keys, key)
    return x, key


@dataclass(frozen=True)
class AdaptiveSpec:
    """One adaptive attack: its name, title, what it needs (the surrogate, the clean feature scale), the settings
    it sweeps, and how one setting runs (a PGD loss, or a search from the high-confidence start)."""

    name: str
    title: str
    needs: str | None  # "surrogate", "scale" or None
    settings: tuple[dict[str, float], ...]
    loss: Callable[..., Loss] | None  # (target, **setting) -> Loss for PGD; None: the score-query search
    start: Callable[..., Tensor] | None = None  # (images, **setting) -> PGD's starting images (None: the images)

    @property
    def white_box(self) -> bool:
        """Whether it follows gradients (PGD on a loss); the score-query search only queries."""
        return self.loss is not None


ADAPTIVE_SPECS: dict[str, AdaptiveSpec] = {spec.name: spec for spec in (
    AdaptiveSpec("high-confidence", "High-confidence PGD-L2", None,
                 ({"kappa": 0.0}, {"kappa": 5.0}, {"kappa": 15.0}, {"kappa": 40.0}), high_confidence_loss),
    AdaptiveSpec("squeeze-bpda", "PGD-L2 through the squeezings (BPDA)", None,
                 ({"kappa": 0.0}, {"kappa": 10.0}), squeeze_loss),
    AdaptiveSpec("blur-start", "High-confidence PGD-L2 from a blurred image", None,
                 ({"kappa": 0.0, "sigma": 0.7}, {"kappa": 0.0, "sigma": 1.0}, {"kappa": 5.0, "sigma": 1.0}),
                 high_confidence_loss, blurred),
    AdaptiveSpec("fisher-penalty", "PGD-L2 with a penalty on the Fisher features", "scale",
                 ({"kappa": 2.0, "weight": 0.1}, {"kappa": 2.0, "weight": 1.0}, {"kappa": 10.0, "weight": 1.0}),
                 fisher_penalty_loss),
    AdaptiveSpec("surrogate", "PGD-L2 on a differentiable surrogate of the forest", "surrogate",
                 ({"kappa": 2.0, "weight": 0.3}, {"kappa": 2.0, "weight": 3.0}, {"kappa": 10.0, "weight": 1.0}),
                 surrogate_loss),
    AdaptiveSpec("score-query", "Score-query random search on the detector", None, ({"kappa": 5.0},), None),
)}
ADAPTIVE_NAMES = tuple(ADAPTIVE_SPECS)


def adaptive_spec(name: str) -> AdaptiveSpec:
    if name not in ADAPTIVE_SPECS:
        raise ValueError(f"unknown adaptive attack {name!r} (known: {', '.join(ADAPTIVE_SPECS)})")
    return ADAPTIVE_SPECS[name]


def available(spec: AdaptiveSpec, target: Target) -> bool:
    """Whether the target carries what the attack needs."""
    return {"surrogate": target.surrogate is not None, "scale": target.clean_mean is not None,
            None: True}[spec.needs]


def run_adaptive(name: str, target: Target, images: Tensor, labels: Tensor, budget: float,
                 effort: str | Effort = "full", seed: int = 0) -> AdaptiveResult:
    """The attack `name` at L2 `budget`: each of its settings in turn, each image keeping its best candidate."""
    spec = adaptive_spec(name)
    if not available(spec, target):
        raise ValueError(f"adaptive attack {name!r} needs the target's {spec.needs}")
    plan = EFFORTS[effort] if isinstance(effort, str) else effort
    plan = plan.for_features() if spec.needs else plan
    generator = torch.Generator().manual_seed(seed)
    labels = labels.to(images.device)
    best = (images.clone(), np.full(len(images), NOT_FOOLED))
    for setting in spec.settings:
        if spec.loss is None:
            start = pgd_l2(target, high_confidence_loss(target, setting["kappa"]), images, labels, budget, plan,
                           generator, best)
            best = score_query(target, images, labels, budget, plan, generator, start)
        else:
            begin = spec.start(images, **setting) if spec.start else None
            best = pgd_l2(target, spec.loss(target, **setting), images, labels, budget, plan, generator, best, begin)
    adversarial, keys = best
    scores, predictions = target.screen(adversarial)
    fooled = predictions != labels.cpu().numpy()
    norms = (adversarial - images).flatten(1).norm(dim=1).cpu().numpy()
    assert bool((norms <= budget * (1 + 1e-4) + 1e-6).all()), "adaptive attack left the L2 ball"
    return AdaptiveResult(adversarial, fooled, scores, scores >= target.detector.threshold, norms,
                          list(spec.settings))

