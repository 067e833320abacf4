"""Fisher features of an image for the detector, from the engine's exact route.

`plain` is the paper's feature set (section 4): log10 of the top-k eigenvalues of G_x (k = 20; a K-class model
has only K-1 non-zero ones, the rest are floored at EIGENVALUE_FLOOR). The other sets add features derived
from the same Fisher geometry; each is selectable by name and recorded in the detector card.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from service.fisher import FisherSpectrum, fisher_spectrum

EIGENVALUE_FLOOR = 1e-12  # log10 floor for the structural zeros (rank <= K-1) and underflow
DEFAULT_K = 20
STEP_SIZE = 0.5  # L2 step along the top eigenvector for the "geometry" set (paper Figure 4b)
EXTRA_STEPS = (0.25, 1.0)  # further step sizes for the KL features (forward passes only)
KL_FLOOR = 1e-12
KL_STEPS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0)  # L2 steps along +/- the top eigenvector for the "spectral" set
DARK = 0.05  # pixels below this intensity count as background for the eigenvector-energy feature
VECTORS = 3  # eigenvectors described by the "spectral" set

FEATURE_SETS: dict[str, str] = {
    "plain": "log10 of the top-k eigenvalues of G_x (the paper's features)",
    "plain+probs": "plain, plus the entropy and the top probability of the model's output (same spectrum call)",
    "spectral": "plain+probs, plus, for each of the top-3 eigenvectors v_i of G_x: |cos(v_i, x)|, the share of "
                f"|v_i|^2 on dark pixels (x < {DARK}) and ||v_i||_1 (where the vulnerable directions lie), and "
                f"log10 KL(p(x) || p(x +/- t v_1)), larger side, for t in {KL_STEPS} (how fast the output moves along "
                "the top eigenvector); one spectrum call (with eigenvectors) plus forward passes",
    "geometry": "plain+probs, plus, after an L2 step of "
                f"{STEP_SIZE} along +/- the top eigenvector v (paper Figure 4b: eigenvalues rise along the "
                "adversarial direction): the change of log10 of the top-3 eigenvalues and "
                "log10 KL(p(x) || p(x +/- t v)) (larger and smaller side), whether either side flips the prediction, "
                f"and log10 KL at steps {EXTRA_STEPS} (larger side); needs a second spectrum call and two forward "
                "passes per extra step",
}


@dataclass
class FisherFeatures:
    """The feature matrix (N, F) float64 and the spectrum it came from (eigenvalues, probabilities)."""

    matrix: np.ndarray
    spectrum: FisherSpectrum
    feature_set: str
    names: list[str]


def check_feature_set(feature_set: str) -> str:
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"feature_set: must be one of {', '.join(FEATURE_SETS)}; got {feature_set!r}")
    return feature_set


def log_eigenvalues(eigenvalues: Tensor | np.ndarray, floor: float = EIGENVALUE_FLOOR) -> np.ndarray:
    """log10 of eigenvalues, floored (the zeros beyond rank K-1 become log10(floor))."""
    values = eigenvalues.detach().cpu().numpy() if isinstance(eigenvalues, Tensor) else np.asarray(eigenvalues)
    return np.log10(np.maximum(values.astype(np.float64), floor))


def probability_features(probabilities: Tensor) -> np.ndarray:
    """(N, 2): the entropy of p (nats) and max p."""
    p = probabilities.detach().cpu().double().clamp(min=1e-300)
    entropy = -(p * p.log()).sum(-1)
    return torch.stack([entropy, p.max(-1).values], 1).numpy()


def feature_names(feature_set: str, k: int = DEFAULT_K) -> list[str]:
    names = [f"log10_lambda_{i + 1}" for i in range(k)]
    if feature_set != "plain":
        names += ["entropy", "max_prob"]
    if feature_set == "spectral":
        names += [f"v{i + 1}_{what}" for what in ("abs_cos_x", "dark_energy", "l1") for i in range(VECTORS)]
        names += [f"step{t}_max_log10_kl" for t in KL_STEPS]
    if feature_set == "geometry":
        names += [f"step_{side}_dlog10_lambda_{i + 1}" for side in ("max", "min") for i in range(3)]
        names += ["step_max_log10_kl", "step_min_log10_kl", "step_flips"]
        names += [f"step{t}_max_log10_kl" for t in EXTRA_STEPS]
    return names


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """log10 KL(p || q) per row, floored."""
    p, q = p.double().clamp(min=1e-300), q.double().clamp(min=1e-300)
    return (p * (p.log() - q.log())).sum(-1).clamp(min=KL_FLOOR).log10()


def _step_features(model: nn.Module, images: Tensor, spectrum: FisherSpectrum, base: np.ndarray) -> np.ndarray:
    """Fisher geometry along the top eigenvector v (sign-free, no label needed): per feature, the larger and the
    smaller of the +v and -v sides of the change of the top-3 log eigenvalues and of log KL(p(x) || p(x +/- t v))."""
    v = spectrum.eigenvectors[:, 0].to(images.dtype)
    n = images.shape[0]
    moved = lambda t: torch.cat([(images + t * v).clamp(0, 1), (images - t * v).clamp(0, 1)])  # noqa: E731
    stepped = fisher_spectrum(model, moved(STEP_SIZE), k=3, method="exact")
    logs = log_eigenvalues(stepped.eigenvalues)
    p = spectrum.probabilities.to(stepped.probabilities.device)
    both = lambda a: (a[:n], a[n:])  # noqa: E731
    plus, minus = both(logs - np.concatenate([base[:, :3], base[:, :3]]))
    kl_plus, kl_minus = both(_kl(torch.cat([p, p]), stepped.probabilities).cpu().numpy())
    pred = spectrum.predictions.to(stepped.predictions.device)
    flips = (stepped.predictions[:n] != pred) | (stepped.predictions[n:] != pred)
    cols = [np.maximum(plus, minus), np.minimum(plus, minus), np.maximum(kl_plus, kl_minus)[:, None],
            np.minimum(kl_plus, kl_minus)[:, None], flips.cpu().numpy()[:, None].astype(np.float64)]
    with torch.no_grad():
        for t in EXTRA_STEPS:
            q = torch.softmax(model(moved(t)).double(), -1)
            a, b = both(_kl(torch.cat([p, p]).to(q.device), q).cpu().numpy())
            cols.append(np.maximum(a, b)[:, None])
    return np.concatenate(cols, 1)


def _spectral_features(model: nn.Module, images: Tensor, spectrum: FisherSpectrum) -> np.ndarray:
    """Eigenvector shape (|cos with the image|, energy on dark pixels, L1 norm) of the top VECTORS eigenvectors,
    and log10 KL of the output after steps along +/- the top eigenvector (forward passes only)."""
    n = images.shape[0]
    v = spectrum.eigenvectors[:, :VECTORS].flatten(2).to(images.dtype)  # (N, r, D), unit norm (zeros past rank)
    if v.shape[1] < VECTORS:
        v = torch.cat([v, v.new_zeros(n, VECTORS - v.shape[1], v.shape[2])], 1)
    x = images.flatten(1)
    unit = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cos = (v * unit[:, None]).sum(-1).abs()
    dark = ((v * v) * (x < DARK).to(v.dtype)[:, None]).sum(-1)
    l1 = v.abs().sum(-1)
    p = spectrum.probabilities.to(images.device)
    top = v[:, 0].reshape(images.shape)
    steps = torch.tensor([s * t for t in KL_STEPS for s in (1.0, -1.0)], dtype=images.dtype, device=images.device)
    moved = (images.unsqueeze(0) + steps.view(-1, *([1] * images.ndim)) * top.unsqueeze(0)).clamp(0, 1)
    with torch.no_grad():  # every step, both signs, in one forward pass
        q = torch.softmax(model(moved.flatten(0, 1)).double(), -1).view(len(KL_STEPS), 2, n, -1)
    kls = torch.maximum(_kl(p, q[:, 0]), _kl(p, q[:, 1])).T  # (N, steps)
    shape = torch.cat([cos, dark, l1], 1).double().cpu().numpy()
    return np.concatenate([shape, kls.cpu().numpy()], 1)


def fisher_features(model: nn.Module, images: Tensor, feature_set: str = "plain", k: int = DEFAULT_K) -> FisherFeatures:
    """Features of one batch. `plain`, `plain+probs` and `spectral` cost ONE exact spectrum call; `geometry` two."""
    check_feature_set(feature_set)
    vectors = feature_set in ("geometry", "spectral")
    spectrum = fisher_spectrum(model, images, k=k, method="exact", return_vectors=vectors)
    base = log_eigenvalues(spectrum.eigenvalues)
    parts = [base]
    if feature_set != "plain":
        parts.append(probability_features(spectrum.probabilities))
    if feature_set == "spectral":
        parts.append(_spectral_features(model, images.to(spectrum.eigenvectors.device), spectrum))
    if feature_set == "geometry":
        parts.append(_step_features(model, images.to(spectrum.eigenvectors.device), spectrum, base))
    return FisherFeatures(np.concatenate(parts, 1), spectrum, feature_set, feature_names(feature_set, k))


def batched_features(model: nn.Module, images: Tensor, feature_set: str = "plain", k: int = DEFAULT_K,
                     batch_size: int = 256, progress: bool = False, desc: str = "features") -> np.ndarray:
    """Feature matrix of many images, batch by batch (bounded memory), with an optional progress bar."""
    from tqdm.auto import tqdm

    out = []
    starts = range(0, images.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        out.append(fisher_features(model, images[start:start + batch_size], feature_set, k).matrix)
    if not out:
        return np.zeros((0, len(feature_names(feature_set, k))))
    return np.concatenate(out, 0)
