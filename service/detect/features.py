"""Fisher features of an image for the detector, from the engine's exact route.

`plain` is the paper's feature set (section 4): log10 of the top-k eigenvalues of G_x (k = 20; a K-class model
has only K-1 non-zero ones, the rest are floored at EIGENVALUE_FLOOR). The other sets add features derived
from the same Fisher geometry; each is selectable by name and recorded in the detector card.

A feature set is a list of blocks (`Block`): each names its columns, builds the probe images it needs, and turns
their output probabilities plus the spectrum into its columns. `fisher_features` runs every block's probes in one
round of forward passes and hands each block its own share. A new block is one `Block` subclass plus one row of
`FEATURE_SETS`. Blocks compute in torch, so the same code gives the features with their autograd graph
(`differentiable_features`) for the adaptive attacks that differentiate through them (service.evaluate).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from service.fisher import FisherSpectrum, fisher_spectrum
from service.fisher.differentiable import differentiable_spectrum
from service.zoo.frozen import frozen_twin

EIGENVALUE_FLOOR = 1e-12  # log10 floor for the structural zeros (rank <= K-1) and underflow
DEFAULT_K = 20
SHIPPED_FEATURE_SET = "spectral+noise+fine+squeeze"  # the shipped detectors' set, chosen on validation (reports/mnist)
KL_FLOOR = 1e-12
KL_STEPS = (0.25, 1.0, 3.0)  # L2 steps along +/- the top eigenvector for the "spectral" set
DARK = 0.05  # pixels below this intensity count as background for the eigenvector-energy feature
VECTORS = 3  # eigenvectors described by the "spectral" set
NOISE_NORMS = (1.0, 2.0, 4.0)  # L2 norms of the isotropic probes of the "spectral+noise" set
NOISE_DRAWS = 4  # probe directions per norm: fixed (seeded), the same for every image, so screening is deterministic
NOISE_SEED = 0
MARGIN_STEPS = (1.0, 1.5, 2.0)  # steps toward the runner-up class, in units of the linearised distance
FINE_STEPS = (1.0, 2.0)  # L2 steps along the image's own fine-scale direction (the "spectral+noise+fine" set)
SQUEEZE_LEVELS = (0.3, 0.5, 0.7)  # 1-bit squeezings: pixels at or above the level go to 1, the rest to 0
SQUEEZE_STEPS = (1.0, 2.0, 4.0)  # L2 steps along each squeezing direction (the "+squeeze" set)
BIT_DEPTHS = (4, 5)  # per-channel bit-depth squeezings of the "+natural" set (Xu et al. 2018: 5 bits for CIFAR-10)
MEDIAN_SIZES = (2, 3)  # median smoothings of the "+natural" set (Xu et al.: 2x2 for CIFAR-10 and ImageNet)
PROBE_REFERENCE_DIM = 784  # probe norms are stated for images of this many values, and scaled to keep their RMS
PROBE_CHUNK = 256  # probe images per forward pass
TRUNCATED_CLASSES = 20  # the truncated route's classes for models above EXACT_MAX_CLASSES (bounded screening cost)


@dataclass(frozen=True)
class SpectrumRoute:
    """How the features get G_x's spectrum: the exact Gram route (K-1 backward passes), or the truncated one over
    at most `max_classes` most probable classes (a bounded cost for a large K: its eigenvalues are lower bounds, off
    by at most the discarded probability mass times the largest squared class gradient; service.fisher.gram)."""

    method: str = "exact"
    max_classes: int | None = None

    def __post_init__(self) -> None:
        if self.method not in ("exact", "truncated"):
            raise ValueError(f"spectrum route: method must be 'exact' or 'truncated', got {self.method!r}")
        if self.method == "truncated" and not (type(self.max_classes) is int and self.max_classes >= 2):
            raise ValueError(f"spectrum route: truncated needs max_classes >= 2, got {self.max_classes!r}")

    @classmethod
    def for_classes(cls, num_classes: int) -> SpectrumRoute:
        """Exact up to EXACT_MAX_CLASSES classes, else truncated to TRUNCATED_CLASSES."""
        from service.fisher.spectrum import EXACT_MAX_CLASSES

        return cls() if num_classes <= EXACT_MAX_CLASSES else cls("truncated", TRUNCATED_CLASSES)

    def as_dict(self) -> dict:
        return {"method": self.method, "max_classes": self.max_classes}


EXACT = SpectrumRoute()


@dataclass
class FisherFeatures:
    """The feature matrix (N, F) float64 and the spectrum it came from (eigenvalues, probabilities)."""

    matrix: np.ndarray
    spectrum: FisherSpectrum
    feature_set: str
    names: list[str]


@dataclass(frozen=True)
class BlockInput:
    """What a block computes its columns from, for one batch."""

    images: Tensor  # (N, ...), on the spectrum's device
    spectrum: FisherSpectrum
    p: Tensor | None  # (N, K) float64 probabilities of the images themselves in the probe round (None: no probes)
    q: Tensor | None  # (N, P, K) float64 probabilities of the block's own probes, in its order (None: it has none)
    earlier: dict[str, Tensor]  # the columns of the set's blocks before this one, by name


class Block(ABC):
    """One block of a feature set: its column names, the probe images it needs, and its columns."""

    vectors: ClassVar[bool] = False  # it needs the eigenvectors of G_x
    margin: ClassVar[bool] = False  # it needs the runner-up margin and its gradient

    @abstractmethod
    def names(self, k: int) -> list[str]:
        """Its column names (k: the eigenvalues asked for)."""

    def probes(self, images: Tensor, spectrum: FisherSpectrum) -> Tensor | None:
        """(N, P, ...) probe images, whose output probabilities `columns` gets as `q`; None: none."""
        return None

    @abstractmethod
    def columns(self, data: BlockInput) -> Tensor:
        """(N, len(names)) float64, in torch (differentiable where the block's quantities are)."""


@dataclass(frozen=True)
class FeatureSet:
    """A named list of blocks; the description is what the detector card records."""

    name: str
    description: str
    blocks: tuple[Block, ...]
    channels: tuple[int, ...] | None = None  # the image channels it suits (None: any)
    candidate: bool = False  # compared by a training run that chooses the feature set (`candidate_sets`)


def log_eigenvalues(eigenvalues: Tensor | np.ndarray, floor: float = EIGENVALUE_FLOOR) -> np.ndarray:
    """log10 of eigenvalues, floored (the zeros beyond rank K-1 become log10(floor))."""
    values = eigenvalues.detach().cpu().numpy() if isinstance(eigenvalues, Tensor) else np.asarray(eigenvalues)
    return np.log10(np.maximum(values.astype(np.float64), floor))


def probability_features(probabilities: Tensor) -> Tensor:
    """(N, 2) float64: the entropy of p (nats) and max p."""
    p = probabilities.double().clamp(min=1e-300)
    entropy = -(p * p.log()).sum(-1)
    return torch.stack([entropy, p.max(-1).values], 1)


def log10_kl(p: Tensor, q: Tensor) -> Tensor:
    """log10 KL(p || q) over the last axis (broadcasting), floored."""
    p, q = p.double().clamp(min=1e-300), q.double().clamp(min=1e-300)
    return (p * (p.log() - q.log())).sum(-1).clamp(min=KL_FLOOR).log10()


def _flips(p: Tensor, q: Tensor) -> Tensor:
    """1.0 where the probe's prediction differs from the image's (q: (N, P, K)), else 0.0."""
    return (q.argmax(-1) != p.argmax(-1)[:, None]).double()


def probe_scale(images: Tensor) -> float:
    """The factor on every probe's L2 norm: sqrt(D / PROBE_REFERENCE_DIM), so that a probe changes each of an
    image's D values by the same RMS whatever its size (1 for 28x28 digits)."""
    return math.sqrt(images[0].numel() / PROBE_REFERENCE_DIM)


def _direction_probes(images: Tensor, direction: Tensor, steps: tuple[float, ...]) -> Tensor:
    """(N, len(steps), ...): x + t u for each step t along the direction u, clipped to [0, 1]."""
    t = torch.tensor(steps, dtype=images.dtype, device=images.device).view(1, -1, *[1] * (images.ndim - 1))
    return (images.unsqueeze(1) + t * direction.unsqueeze(1)).clamp(0, 1)


class Eigenvalues(Block):
    """log10 of the top-k eigenvalues of G_x, floored (the paper's features)."""

    def names(self, k: int) -> list[str]:
        return [f"log10_lambda_{i + 1}" for i in range(k)]

    def columns(self, data: BlockInput) -> Tensor:
        return data.spectrum.eigenvalues.double().clamp(min=EIGENVALUE_FLOOR).log10()


class OutputProbabilities(Block):
    """The entropy and the top probability of the model's output (from the spectrum call)."""

    def names(self, k: int) -> list[str]:
        return ["entropy", "max_prob"]

    def columns(self, data: BlockInput) -> Tensor:
        return probability_features(data.spectrum.probabilities)


class EigenvectorShape(Block):
    """|cos with the image|, energy on dark pixels and L1 norm of the top VECTORS eigenvectors."""

    vectors = True

    def names(self, k: int) -> list[str]:
        return [f"v{i + 1}_{what}" for what in ("abs_cos_x", "dark_energy", "l1") for i in range(VECTORS)]

    def columns(self, data: BlockInput) -> Tensor:
        images = data.images
        n = images.shape[0]
        v = data.spectrum.eigenvectors[:, :VECTORS].flatten(2).to(images.dtype)  # (N, r, D), unit (zeros past rank)
        if v.shape[1] < VECTORS:
            v = torch.cat([v, v.new_zeros(n, VECTORS - v.shape[1], v.shape[2])], 1)
        x = images.flatten(1)
        unit = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
        cos = (v * unit[:, None]).sum(-1).abs()
        dark = ((v * v) * (x < DARK).to(v.dtype)[:, None]).sum(-1)
        l1 = v.abs().sum(-1)
        return torch.cat([cos, dark, l1], 1).double()


class TopEigenvectorSteps(Block):
    """log10 KL(p(x) || p(x +/- t v_1)), the larger side, per step t in KL_STEPS."""

    vectors = True

    def names(self, k: int) -> list[str]:
        return [f"step{t}_max_log10_kl" for t in KL_STEPS]

    def probes(self, images: Tensor, spectrum: FisherSpectrum) -> Tensor:
        """x + t v_1 and x - t v_1 for each step t."""
        top = spectrum.eigenvectors[:, 0].to(images.dtype).reshape(images.shape)
        scale = probe_scale(images)
        return _direction_probes(images, top, tuple(s * t * scale for t in KL_STEPS for s in (1.0, -1.0)))

    def columns(self, data: BlockInput) -> Tensor:
        q = data.q.view(data.q.shape[0], len(KL_STEPS), 2, -1)
        p = data.p[:, None]
        return torch.maximum(log10_kl(p, q[:, :, 0]), log10_kl(p, q[:, :, 1]))


def noise_directions(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(NOISE_DRAWS, *shape) unit-norm Gaussian directions from NOISE_SEED: the same probes on every call."""
    generator = torch.Generator().manual_seed(NOISE_SEED)
    u = torch.randn((NOISE_DRAWS, *shape), generator=generator, dtype=torch.float64)
    return (u / u.flatten(1).norm(dim=1).view(-1, *([1] * len(shape)))).to(device=device, dtype=dtype)


class IsotropicNoise(Block):
    """Per probe norm r: mean, max and min of log10 KL(p(x) || p(x + r u)) over the fixed directions u, and the
    share of them that change the prediction."""

    def names(self, k: int) -> list[str]:
        return [f"noise{r}_{what}" for r in NOISE_NORMS
                for what in ("mean_log10_kl", "max_log10_kl", "min_log10_kl", "flip_share")]

    def probes(self, images: Tensor, spectrum: FisherSpectrum) -> Tensor:
        """x + r u for each norm r and fixed direction u, clipped."""
        u = noise_directions(images.shape[1:], images.dtype, images.device)
        norms = torch.tensor(NOISE_NORMS, dtype=images.dtype, device=images.device) * probe_scale(images)
        directions = (norms.view(-1, *([1] * images.ndim)) * u.unsqueeze(0)).flatten(0, 1)
        return (images.unsqueeze(1) + directions.unsqueeze(0)).clamp(0, 1)

    def columns(self, data: BlockInput) -> Tensor:
        q = data.q.view(data.q.shape[0], len(NOISE_NORMS), NOISE_DRAWS, -1)
        kl = log10_kl(data.p[:, None, None], q)
        flips = (q.argmax(-1) != data.p.argmax(-1)[:, None, None]).double().mean(-1)
        return torch.stack([kl.mean(-1), kl.max(-1).values, kl.min(-1).values, flips], -1).flatten(1)


def _margin_distance(images: Tensor, spectrum: FisherSpectrum) -> tuple[Tensor, Tensor, Tensor]:
    """The gradient of the margin z_1 - z_2 (images' dtype), its float64 norm (floored) and the linearised distance
    d = gap / norm to the runner-up class."""
    grad = spectrum.margin_gradient.to(images.dtype)
    norm = grad.flatten(1).norm(dim=1).double().clamp(min=1e-30)
    return grad, norm, spectrum.margin.to(images.device).clamp(min=0) / norm


class Margin(Block):
    """The margin to the runner-up class: logit gap z_1 - z_2, log10 ||grad_x (z_1 - z_2)||, log10 of the
    linearised distance d, then log10 KL and prediction change after steps of c * d toward it, c in MARGIN_STEPS."""

    margin = True

    def names(self, k: int) -> list[str]:
        return ["margin_logit_gap", "margin_log10_grad_norm", "margin_log10_distance"] + [
            f"margin{c}d_{what}" for c in MARGIN_STEPS for what in ("log10_kl", "flips")]

    def probes(self, images: Tensor, spectrum: FisherSpectrum) -> Tensor:
        grad, norm, distance = _margin_distance(images, spectrum)
        shape = (-1, *([1] * (images.ndim - 1)))
        toward = -grad / norm.view(shape).to(grad.dtype)
        return _direction_probes(images, distance.view(shape).to(images.dtype) * toward, MARGIN_STEPS)

    def columns(self, data: BlockInput) -> Tensor:
        _, norm, distance = _margin_distance(data.images, data.spectrum)
        kl = log10_kl(data.p[:, None], data.q)
        head = torch.stack([data.spectrum.margin.double(), norm.log10(), distance.clamp(min=1e-30).log10()], 1)
        return torch.cat([head.to(kl.device), torch.stack([kl, _flips(data.p, data.q)], -1).flatten(1)], 1)


def _padded_eigenvalues(spectrum: FisherSpectrum) -> Tensor:
    """(N, >= 3) float64 eigenvalues, clamped at 0 and zero-padded to at least three."""
    lam = spectrum.eigenvalues.double().clamp(min=0)
    return torch.nn.functional.pad(lam, (0, 3 - lam.shape[1])) if lam.shape[1] < 3 else lam


def spread_columns(lam: Tensor) -> Tensor:
    """(N, 4): log10 lambda_1 / lambda_2, log10 lambda_2 / lambda_3, log10 of their sum (the trace of the top-k)
    and the effective rank exp(H(lambda / sum lambda)), from (N, >= 3) eigenvalues."""
    log_lam = lam.clamp(min=EIGENVALUE_FLOOR).log10()
    trace = lam.sum(1).clamp(min=EIGENVALUE_FLOOR)
    share = lam / trace[:, None]
    effective_rank = (-(share * share.clamp(min=1e-300).log()).sum(1)).exp()
    return torch.stack([log_lam[:, 0] - log_lam[:, 1], log_lam[:, 1] - log_lam[:, 2], trace.log10(), effective_rank], 1)


SPREAD_NAMES = ["log10_lambda1_over_lambda2", "log10_lambda2_over_lambda3", "log10_trace", "effective_rank"]


class Spread(Block):
    """How the spectrum spreads (no probe): the first columns of Ratios (`spread_columns`)."""

    def names(self, k: int) -> list[str]:
        return list(SPREAD_NAMES)

    def columns(self, data: BlockInput) -> Tensor:
        return spread_columns(_padded_eigenvalues(data.spectrum))


class Ratios(Block):
    """Ratios of quantities the earlier blocks hold (see the "spectral+noise+ratios" set; it reads the
    TopEigenvectorSteps and IsotropicNoise columns): the Fisher quadratic form is the local KL, so log10 KL minus
    its log10 measures how non-quadratic the output is there."""

    margin = True

    def names(self, k: int) -> list[str]:
        return [*SPREAD_NAMES, *[f"step{t}_log10_kl_over_quadratic" for t in KL_STEPS],
                *[f"noise{r}_log10_kl_over_quadratic" for r in NOISE_NORMS], "margin_log10_lambda1_d2"]

    def columns(self, data: BlockInput) -> Tensor:
        lam = _padded_eigenvalues(data.spectrum)
        trace = lam.sum(1).clamp(min=EIGENVALUE_FLOOR)
        scale = probe_scale(data.images)
        steps = lam.new_tensor([(t * scale) ** 2 / 2 for t in KL_STEPS])
        norms = lam.new_tensor([(r * scale) ** 2 / (2 * data.images[0].numel()) for r in NOISE_NORMS])
        step_kl = torch.stack([data.earlier[f"step{t}_max_log10_kl"] for t in KL_STEPS], 1).to(lam.device)
        mean_noise_kl = torch.stack([data.earlier[f"noise{r}_mean_log10_kl"] for r in NOISE_NORMS], 1).to(lam.device)
        d = _margin_distance(data.images, data.spectrum)[2].double().to(lam.device).clamp(min=1e-30)
        return torch.cat([
            spread_columns(lam),
            step_kl - (steps[None] * lam[:, :1]).clamp(min=EIGENVALUE_FLOOR).log10(),
            mean_noise_kl - (norms[None] * trace[:, None]).clamp(min=EIGENVALUE_FLOOR).log10(),
            (lam[:, 0] * d * d).clamp(min=EIGENVALUE_FLOOR).log10()[:, None],
        ], 1)


def box_blur(images: Tensor) -> Tensor:
    """The 3x3 box mean of each (N, C, H, W) image (edges replicated)."""
    return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"), 3, 1)


def _unit(directions: Tensor) -> Tensor:
    return directions / directions.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *[1] * (directions.ndim - 1))


def fine_direction(images: Tensor) -> Tensor:
    """The unit direction from each (N, C, H, W) image to its 3x3 box-mean blur (zeros for a flat image)."""
    if images.ndim != 4:
        raise ValueError(f"images: the fine-scale features need (N, C, H, W) images, got shape {tuple(images.shape)}")
    return _unit(box_blur(images) - images)


def squeeze_direction(images: Tensor, level: float) -> Tensor:
    """The unit direction from each image to its 1-bit squeezing at `level` (zeros where that changes nothing)."""
    return _unit((images >= level).to(images.dtype) - images)


def bit_depth_direction(images: Tensor, bits: int) -> Tensor:
    """The unit direction from each image to its per-channel squeezing to `bits` bits (Xu et al. 2018)."""
    levels = 2 ** bits - 1
    return _unit(torch.round(images * levels) / levels - images)


def median_smooth(images: Tensor, size: int) -> Tensor:
    """The per-channel median over each size x size window of (N, C, H, W) images, same size out (edges
    replicated; an even window takes the lower middle value, as torch.median does)."""
    if images.ndim != 4:
        raise ValueError(f"images: median smoothing needs (N, C, H, W) images, got shape {tuple(images.shape)}")
    before, after = (size - 1) // 2, size // 2
    padded = torch.nn.functional.pad(images, (before, after, before, after), mode="replicate")
    windows = padded.unfold(2, size, 1).unfold(3, size, 1)  # (N, C, H, W, size, size)
    return windows.flatten(-2).median(-1).values


def median_direction(images: Tensor, size: int) -> Tensor:
    """The unit direction from each image to its size x size median smoothing (Xu et al. 2018)."""
    return _unit(median_smooth(images, size) - images)


@dataclass(frozen=True)
class Direction(Block):
    """The Fisher geometry of the image's own unit direction u: the Rayleigh quotient u^T G_x u from the eigenpairs,
    the share of u in the top-3 eigenvectors, then per step t log10 KL, its departure from the quadratic form
    t^2 u^T G_x u / 2 and the prediction change."""

    head: str  # name of the direction's columns
    step: str  # prefix of its per-step columns
    direction: Callable[[Tensor], Tensor]  # (N, ...) images -> (N, ...) unit directions
    steps: tuple[float, ...]

    vectors = True

    def names(self, k: int) -> list[str]:
        return [f"{self.head}_log10_rayleigh", f"{self.head}_top3_share"] + [
            f"{self.step}{t}_{what}" for t in self.steps for what in ("log10_kl", "log10_kl_over_quadratic", "flips")]

    def probes(self, images: Tensor, spectrum: FisherSpectrum) -> Tensor:
        scale = probe_scale(images)
        return _direction_probes(images, self.direction(images), tuple(t * scale for t in self.steps))

    def columns(self, data: BlockInput) -> Tensor:
        spectrum, q = data.spectrum, data.q
        v = spectrum.eigenvectors.flatten(2).double()  # (N, r, D), zeros past the rank
        projections = (v * self.direction(data.images).flatten(1).double().to(v.device)[:, None]).sum(-1) ** 2
        rayleigh = (spectrum.eigenvalues[:, :v.shape[1]].to(v.device) * projections).sum(-1).clamp(min=EIGENVALUE_FLOOR)
        kl = log10_kl(data.p[:, None], q)
        t = torch.tensor(self.steps, dtype=torch.float64, device=kl.device) * probe_scale(data.images)
        quadratic = t ** 2 / 2 * rayleigh[:, None].to(kl.device)
        head = torch.stack([rayleigh.log10(), projections[:, :3].sum(-1)], 1).to(kl.device)
        per_step = torch.stack([kl, kl - quadratic.clamp(min=EIGENVALUE_FLOOR).log10(), _flips(data.p, q)], -1)
        return torch.cat([head, per_step.flatten(1)], 1)


SHARPNESS_MEDIAN = 2  # the median window that takes small-amplitude perturbations out before sharpness is measured


class Sharpness(Block):
    """How sharp the image's edges are, with no probe: after a 2x2 median smoothing m(x), which takes out
    small-amplitude perturbations (noise, an L2 attack) and keeps edges, log10 of the share of m(x)'s centred
    energy at fine scale, ||m - b(m)||^2 / ||m - mean(m)||^2, and at a coarser one (b twice; b: the 3x3 box mean).
    Blur lowers both; noise and attacks leave them (on validation, bench/blur_features.py): the forest can tell a
    blurred image, whose Fisher features move the way an attack's do, from an attacked one, and cannot use them to
    tell noise from an attack (the raw image's share would: noise is whiter than an attack). Invariant to
    brightness and contrast factors (up to clipping)."""

    def names(self, k: int) -> list[str]:
        return ["fine_log10_energy_share", "coarse_log10_energy_share"]

    def columns(self, data: BlockInput) -> Tensor:
        smooth = median_smooth(data.images.double(), SHARPNESS_MEDIAN)
        centred = (smooth - smooth.mean(dim=(1, 2, 3), keepdim=True)).flatten(1).pow(2).sum(1).clamp(min=1e-30)
        once = box_blur(smooth)
        shares = [(smooth - once).flatten(1).pow(2).sum(1), (smooth - box_blur(once)).flatten(1).pow(2).sum(1)]
        return torch.stack([(share / centred).clamp(min=EIGENVALUE_FLOOR).log10() for share in shares], 1)


def _table(*rows: tuple) -> dict[str, FeatureSet]:
    """The feature sets from rows (name, the earlier set it extends or None, description, its own blocks, and
    optionally the channels it suits and whether a training run compares it)."""
    table: dict[str, FeatureSet] = {}
    for name, base, description, blocks, *rest in rows:
        channels, candidate = (*rest, None, False)[:2]
        table[name] = FeatureSet(name, description, (*(table[base].blocks if base else ()), *blocks), channels,
                                 candidate)
    return table


FEATURE_SETS: dict[str, FeatureSet] = _table(
    ("plain", None, "log10 of the top-k eigenvalues of G_x (the paper's features)", (Eigenvalues(),), None, True),
    ("plain+probs", "plain",
     "plain, plus the entropy and the top probability of the model's output (same spectrum call)",
     (OutputProbabilities(),)),
    ("spectral", "plain+probs",
     "plain+probs, plus, for each of the top-3 eigenvectors v_i of G_x: |cos(v_i, x)|, the share of "
     f"|v_i|^2 on dark pixels (x < {DARK}) and ||v_i||_1 (where the vulnerable directions lie), and "
     f"log10 KL(p(x) || p(x +/- t v_1)), larger side, for t in {KL_STEPS} (how fast the output moves along "
     "the top eigenvector); one spectrum call (with eigenvectors) plus forward passes",
     (EigenvectorShape(), TopEigenvectorSteps())),
    ("spectral+noise", "spectral",
     "spectral, plus how the output moves off the top eigenvectors: for isotropic probes of L2 norm "
     f"r in {NOISE_NORMS} ({NOISE_DRAWS} seeded directions per norm, the same for every image) the "
     "mean, max and min of log10 KL(p(x) || p(x + r u)) and the share of probes that change the "
     "prediction (locally KL ~ r^2 u^T G_x u / 2, whose mean over u is r^2 tr(G_x) / 2D), and the "
     "margin to the runner-up class: logit gap, log10 of its gradient norm, log10 of the linearised "
     f"distance d = gap / norm, and log10 KL and whether the prediction changes after steps of "
     f"{MARGIN_STEPS} x d toward that class; one spectrum call (one more backward product for the "
     "margin) plus forward passes",
     (IsotropicNoise(), Margin()), None, True),
    ("spectral+noise+ratios", "spectral+noise",
     "spectral+noise, plus ratios that a depth-5 tree cannot form itself (no extra pass): "
     "log10 lambda_1 / lambda_2 and lambda_2 / lambda_3, log10 tr(G_x) (the sum of the top-k "
     "eigenvalues), the effective rank exp(H(lambda / sum lambda)), how far each measured KL "
     "departs from its Fisher quadratic form (log10 KL - log10(t^2 lambda_1 / 2) for the steps "
     "t along v_1, log10 mean KL - log10(r^2 tr(G_x) / 2D) for the isotropic probes of norm r),"
     " and log10(lambda_1 d^2) for the margin's linearised distance d",
     (Ratios(),)),
    ("spectral+noise+fine", "spectral+noise+ratios",
     "spectral+noise+ratios, plus the Fisher geometry of the image's own fine-scale direction "
     "u = (blur(x) - x) / ||blur(x) - x|| (blur: 3x3 box mean): the Rayleigh quotient "
     "log10 u^T G_x u, the share of u in the top-3 eigenvectors, and, after steps of "
     f"t in {FINE_STEPS} along u, log10 KL, its departure from the quadratic form "
     "(log10 KL - log10(t^2 u^T G_x u / 2)) and whether the prediction changes; the direction's "
     "length is left out, so the features do not tell noisy images by their noise energy",
     (Direction("fine", "fine", fine_direction, FINE_STEPS),), None, True),
    ("spectral+noise+fine+squeeze", "spectral+noise+fine",
     "spectral+noise+fine, plus the same Fisher geometry along the image's own "
     "squeezing directions w_l = (s_l(x) - x) / ||s_l(x) - x||, s_l the 1-bit squeezing "
     "of Xu et al. 2018 at level l (pixels >= l to 1, the rest to 0; it suits digit-like "
     f"images) for l in {SQUEEZE_LEVELS}: log10 w^T G_x w, the share of w in the top-3 "
     f"eigenvectors, and, after steps of t in {SQUEEZE_STEPS} along w, log10 KL, its "
     "departure from t^2 w^T G_x w / 2 and whether the prediction changes (w's length is "
     "left out too)",
     tuple(Direction(f"squeeze{level}", f"squeeze{level}_step", partial(squeeze_direction, level=level), SQUEEZE_STEPS)
           for level in SQUEEZE_LEVELS), (1,), True),
    ("spectral+noise+fine+squeeze+sharpness", "spectral+noise+fine+squeeze",
     "spectral+noise+fine+squeeze, plus how sharp the image's edges are (no probe): after a 2x2 median smoothing "
     "m (it takes out small-amplitude perturbations), log10 of the share of m's centred energy at fine scale, "
     "||m - b(m)||^2, and at a coarser one, ||m - b(b(m))||^2 (b: 3x3 box mean); blur lowers them, noise and "
     "attacks do not, so a detector trained with blurred negatives (train-detector --harden) tells the two apart",
     (Sharpness(),), (1,)),
    ("eigen+fine+squeeze+sharpness", None,
     "spectral+noise+fine+squeeze+sharpness without the probes that the forest does not need "
     "(bench/probe_ablation.py, on validation): the eigenvalues, the output's entropy and top probability, the "
     "top-3 eigenvectors' shape, how the spectrum spreads (log10 lambda_1 / lambda_2 and lambda_2 / lambda_3, "
     "log10 tr, the effective rank), the Fisher geometry of the fine-scale and the three squeezing directions "
     f"and the sharpness; no steps along v_1, no isotropic probes, no margin: {len(FINE_STEPS)} + "
     f"{len(SQUEEZE_LEVELS) * len(SQUEEZE_STEPS)} forward probes per image instead of 32",
     (Eigenvalues(), OutputProbabilities(), EigenvectorShape(), Spread(),
      Direction("fine", "fine", fine_direction, FINE_STEPS),
      *(Direction(f"squeeze{level}", f"squeeze{level}_step", partial(squeeze_direction, level=level), SQUEEZE_STEPS)
        for level in SQUEEZE_LEVELS), Sharpness()), (1,)),
    ("spectral+noise+fine+natural", "spectral+noise+fine",
     "spectral+noise+fine, plus the same Fisher geometry along the squeezings that Xu et al. 2018 use for "
     f"natural images (CIFAR-10, ImageNet), per channel: bit-depth reduction to b bits for b in {BIT_DEPTHS} "
     f"and median smoothing over s x s windows for s in {MEDIAN_SIZES}; per squeezing w: log10 w^T G_x w, the "
     f"share of w in the top-3 eigenvectors, and, after steps of t in {SQUEEZE_STEPS} along w, log10 KL, its "
     "departure from t^2 w^T G_x w / 2 and whether the prediction changes",
     (*(Direction(f"bits{b}", f"bits{b}_step", partial(bit_depth_direction, bits=b), SQUEEZE_STEPS)
        for b in BIT_DEPTHS),
      *(Direction(f"median{s}", f"median{s}_step", partial(median_direction, size=s), SQUEEZE_STEPS)
        for s in MEDIAN_SIZES)), None, True),
)


def check_feature_set(feature_set: str) -> str:
    """`feature_set` when it names a set of FEATURE_SETS, else a ValueError that lists them."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"feature_set: must be one of {', '.join(FEATURE_SETS)}; got {feature_set!r}")
    return feature_set


def feature_names(feature_set: str, k: int = DEFAULT_K) -> list[str]:
    """The set's column names, block by block."""
    return [name for block in FEATURE_SETS[check_feature_set(feature_set)].blocks for name in block.names(k)]


def _probe_round(model: nn.Module, images: Tensor, probes: list[Tensor | None],
                 differentiable: bool = False) -> tuple[Tensor | None, list[Tensor | None]]:
    """One round of forward passes over the images and every block's probes: p (N, K) and each block's q
    (N, P, K), float64 probabilities. PROBE_CHUNK images per pass (on CPU, LeNet-5 ran 1792 probes 1.6x faster
    in chunks of 256 than in one call: they stay in cache), on the model's frozen twin where there is one (2-3x
    faster on CPU, see `frozen_twin`); `differentiable`: on the model itself, keeping the autograd graph."""
    own = [probe for probe in probes if probe is not None]
    if not own:
        return None, [None] * len(probes)
    # the image itself comes first: KL(p || q) compares outputs of the same forward implementation, so a
    # probe that changes nothing gives exactly 0, whatever rounding the probe passes have (`frozen_twin`)
    everything = torch.cat([images.unsqueeze(1), *own], 1)
    flat = everything.flatten(0, 1)
    if differentiable:
        logits = torch.cat([model(chunk) for chunk in flat.split(PROBE_CHUNK)])
    else:
        with torch.no_grad():
            forward = frozen_twin(model, flat)
            logits = torch.cat([forward(chunk) for chunk in flat.split(PROBE_CHUNK)])
    q = torch.softmax(logits.double(), -1).view(*everything.shape[:2], -1)
    shares = iter(q[:, 1:].split([probe.shape[1] for probe in own], 1))
    return q[:, 0], [None if probe is None else next(shares) for probe in probes]


def _block_columns(model: nn.Module, images: Tensor, blocks: tuple[Block, ...], k: int, route: SpectrumRoute,
                   differentiable: bool = False) -> tuple[FisherSpectrum, list[Tensor]]:
    """Each block's columns for one batch: ONE spectrum call on `route` (with the eigenvectors and the margin's
    gradient from the same forward pass where a block needs them), then one round of forward-only probe passes.
    `differentiable` (exact route): the spectrum and the probes keep their autograd graph."""
    vectors, margin = any(b.vectors for b in blocks), any(b.margin for b in blocks)
    if differentiable:
        if route.method != "exact":
            raise ValueError("differentiable features: only the exact spectrum route keeps its graph")
        spectrum = differentiable_spectrum(model, images, k=k, return_vectors=vectors, return_margin=margin)
    else:
        spectrum = fisher_spectrum(model, images, k=k, method=route.method,  # type: ignore[arg-type]
                                   max_classes=route.max_classes, return_vectors=vectors, return_margin=margin)
    images = images.to(spectrum.eigenvalues.device)
    p, shares = _probe_round(model, images, [block.probes(images, spectrum) for block in blocks], differentiable)
    parts: list[Tensor] = []
    earlier: dict[str, Tensor] = {}
    for block, q in zip(blocks, shares, strict=True):
        block_names = block.names(k)
        columns = block.columns(BlockInput(images, spectrum, p, q, earlier))
        assert columns.shape == (images.shape[0], len(block_names)), (type(block).__name__, columns.shape)
        parts.append(columns)
        earlier.update(zip(block_names, columns.T, strict=True))
    return spectrum, parts


def _numpy(parts: list[Tensor]) -> list[np.ndarray]:
    return [part.detach().double().cpu().numpy() for part in parts]


def fisher_features(model: nn.Module, images: Tensor, feature_set: str = "plain", k: int = DEFAULT_K,
                    route: SpectrumRoute = EXACT) -> FisherFeatures:
    """Features of one batch: one spectrum call, then one round of forward-only probe passes for all blocks."""
    blocks = FEATURE_SETS[check_feature_set(feature_set)].blocks
    spectrum, parts = _block_columns(model, images, blocks, k, route)
    return FisherFeatures(np.concatenate(_numpy(parts), 1), spectrum, feature_set, feature_names(feature_set, k))


def differentiable_features(model: nn.Module, images: Tensor, feature_set: str, k: int = DEFAULT_K) -> Tensor:
    """(N, F) float64 features of one batch with their autograd graph to `images` (exact route; the same blocks as
    `fisher_features`, on the model itself rather than its frozen twin). The prediction-change columns are
    piecewise constant (zero gradient); the rest are smooth almost everywhere. For adaptive attacks."""
    blocks = FEATURE_SETS[check_feature_set(feature_set)].blocks
    with torch.enable_grad():
        _, parts = _block_columns(model, images, blocks, k, EXACT, differentiable=True)
    return torch.cat([part.to(parts[0].device) for part in parts], 1)


def batched_features(model: nn.Module, images: Tensor, feature_set: str = "plain", k: int = DEFAULT_K,
                     batch_size: int = 256, progress: bool = False, desc: str = "features",
                     route: SpectrumRoute = EXACT) -> np.ndarray:
    """Feature matrix of many images, batch by batch (bounded memory), with an optional progress bar."""
    return candidate_features(model, images, (feature_set,), k, batch_size, progress, desc, route)[feature_set]


def candidate_sets(image_shape: tuple[int, ...]) -> tuple[str, ...]:
    """The feature sets a training run compares for images of this [C, H, W] shape: the candidates that suit its
    channels (the 1-bit squeezing suits one-channel, digit-like images; the natural-image squeezings any)."""
    return tuple(name for name, fs in FEATURE_SETS.items()
                 if fs.candidate and (fs.channels is None or image_shape[0] in fs.channels))


def candidate_features(model: nn.Module, images: Tensor, feature_sets: tuple[str, ...], k: int = DEFAULT_K,
                       batch_size: int = 256, progress: bool = False, desc: str = "features",
                       route: SpectrumRoute = EXACT) -> dict[str, np.ndarray]:
    """The feature matrix of each set, from ONE pass over the union of their blocks (sets share the blocks of the
    sets they extend), batch by batch with bounded memory."""
    from tqdm.auto import tqdm

    union: list[Block] = []
    for name in feature_sets:
        union += [block for block in FEATURE_SETS[check_feature_set(name)].blocks
                  if not any(block is seen for seen in union)]
    blocks = tuple(union)
    per_block: list[list[np.ndarray]] = [[] for _ in blocks]
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        _, parts = _block_columns(model, images[start:start + batch_size], blocks, k, route)
        for store, part in zip(per_block, _numpy(parts), strict=True):
            store.append(part)
    columns = [np.concatenate(store, 0) if store else np.zeros((0, len(block.names(k))))
               for store, block in zip(per_block, blocks, strict=True)]
    return {name: np.concatenate([columns[next(i for i, b in enumerate(blocks) if b is block)]
                                  for block in FEATURE_SETS[name].blocks], 1) for name in feature_sets}
