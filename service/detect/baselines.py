"""The baselines of the paper's Table 4 (Feinman et al. 2017, "Detecting adversarial samples from artifacts").

KD: Gaussian kernel density of the last hidden layer (`model.embed`), one density per class fitted on the
training images of that class, evaluated under the predicted class; the score is -log density (adversarial
images lie off the class manifold). One bandwidth for all classes, chosen by 3-fold cross-validated
log-likelihood on (up to 1000 of) the training embeddings.
BU: Bayesian uncertainty from MC dropout, U = mean_t ||p_t||^2 - ||mean_t p_t||^2 over T stochastic passes.
Dropout is applied to the last hidden layer before the final linear layer: that is where ShallowVGG's own
dropout sits (same rate); LeNet-5 has no dropout, so we use rate 0.5 at that same place (Feinman et al. also put
dropout before the last layer). Only the head is re-run, so T passes cost one forward pass.
KD+BU: logistic regression on the z-scored pair, fitted like our detector (see `detector.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KernelDensity
from torch import Tensor, nn

BASELINES: tuple[str, ...] = ("kd", "bu", "kd+bu")
DEFAULT_DROPOUT = 0.5
MC_SAMPLES = 50
BANDWIDTH_SAMPLE = 1000  # training embeddings used to choose the KD bandwidth


def embeddings(model: nn.Module, images: Tensor, batch_size: int = 500) -> np.ndarray:
    """The last hidden layer (`model.embed`) of each image, (N, H) float64."""
    if not hasattr(model, "embed"):
        raise ValueError("KD/BU need a model with an `embed(x)` method returning the last hidden layer")
    device = next(model.parameters()).device
    with torch.no_grad():
        out = [model.embed(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).double().numpy()


def head_and_rate(model: nn.Module) -> tuple[nn.Linear, float]:
    """The final linear layer and the model's dropout rate before it (DEFAULT_DROPOUT when it has none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    if not linears:
        raise ValueError("BU needs a model whose last layer is nn.Linear")
    return linears[-1], (float(drops[-1].p) if drops else DEFAULT_DROPOUT)


@dataclass
class KernelDensityScorer:
    """Per-class Gaussian KDEs on training embeddings; `score` = -log density under the predicted class."""

    densities: dict[int, KernelDensity]
    bandwidth: float

    @classmethod
    def fit(cls, model: nn.Module, images: Tensor, labels: Tensor, seed: int = 0) -> KernelDensityScorer:
        emb = embeddings(model, images)
        y = labels.cpu().numpy()
        scale = float(np.median(np.linalg.norm(emb - emb.mean(0), axis=1)))
        grid = {"bandwidth": list(scale * np.logspace(-2, 0, 9))}
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(emb))[:BANDWIDTH_SAMPLE]  # shuffled folds, bounded cost
        search = GridSearchCV(KernelDensity(kernel="gaussian"), grid, cv=3).fit(emb[order])
        bw = float(search.best_params_["bandwidth"])
        dens = {int(c): KernelDensity(kernel="gaussian", bandwidth=bw).fit(emb[y == c]) for c in np.unique(y)}
        return cls(dens, bw)

    def score(self, model: nn.Module, images: Tensor, predictions: np.ndarray | None = None) -> np.ndarray:
        emb = embeddings(model, images)
        if predictions is None:
            predictions = self.predict(model, images)
        out = np.zeros(len(emb))
        for c, kde in self.densities.items():
            rows = predictions == c
            if rows.any():
                out[rows] = -kde.score_samples(emb[rows])
        return out

    @staticmethod
    def predict(model: nn.Module, images: Tensor, batch_size: int = 500) -> np.ndarray:
        device = next(model.parameters()).device
        with torch.no_grad():
            return torch.cat([model(images[i:i + batch_size].to(device)).argmax(-1).cpu()
                              for i in range(0, len(images), batch_size)]).numpy()


def bayesian_uncertainty(model: nn.Module, images: Tensor, samples: int = MC_SAMPLES, seed: int = 0) -> np.ndarray:
    """MC-dropout uncertainty per image: mean_t sum_k p_tk^2 - sum_k (mean_t p_tk)^2 (Feinman et al., eq. 4)."""
    head, rate = head_and_rate(model)
    emb = torch.from_numpy(embeddings(model, images)).to(head.weight.dtype).to(head.weight.device)
    generator = torch.Generator(device=emb.device).manual_seed(seed)
    sq, mean = torch.zeros(len(emb), dtype=torch.float64), torch.zeros(len(emb), head.out_features, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(samples):
            keep = (torch.rand(emb.shape, generator=generator, device=emb.device) >= rate).to(emb.dtype)
            p = F.softmax(head(emb * keep / (1 - rate)), -1).double().cpu()
            sq += (p * p).sum(-1)
            mean += p
    mean /= samples
    return (sq / samples - (mean * mean).sum(-1)).numpy()


def baseline_features(kd: KernelDensityScorer, model: nn.Module, images: Tensor, seed: int = 0) -> np.ndarray:
    """(N, 2): KD score (-log density) and BU score, the inputs of the three baselines."""
    return np.stack([kd.score(model, images), bayesian_uncertainty(model, images, seed=seed)], 1)
