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
PROBE_CHUNK = 256  # probe images per forward pass

FEATURE_SETS: dict[str, str] = {
    "plain": "log10 of the top-k eigenvalues of G_x (the paper's features)",
    "plain+probs": "plain, plus the entropy and the top probability of the model's output (same spectrum call)",
    "spectral": "plain+probs, plus, for each of the top-3 eigenvectors v_i of G_x: |cos(v_i, x)|, the share of "
                f"|v_i|^2 on dark pixels (x < {DARK}) and ||v_i||_1 (where the vulnerable directions lie), and "
                f"log10 KL(p(x) || p(x +/- t v_1)), larger side, for t in {KL_STEPS} (how fast the output moves along "
                "the top eigenvector); one spectrum call (with eigenvectors) plus forward passes",
    "spectral+noise": "spectral, plus how the output moves off the top eigenvectors: for isotropic probes of L2 norm "
                      f"r in {NOISE_NORMS} ({NOISE_DRAWS} seeded directions per norm, the same for every image) the "
                      "mean, max and min of log10 KL(p(x) || p(x + r u)) and the share of probes that change the "
                      "prediction (locally KL ~ r^2 u^T G_x u / 2, whose mean over u is r^2 tr(G_x) / 2D), and the "
                      "margin to the runner-up class: logit gap, log10 of its gradient norm, log10 of the linearised "
                      f"distance d = gap / norm, and log10 KL and whether the prediction changes after steps of "
                      f"{MARGIN_STEPS} x d toward that class; one spectrum call (one more backward product for the "
                      "margin) plus forward passes",
    "spectral+noise+ratios": "spectral+noise, plus ratios that a depth-5 tree cannot form itself (no extra pass): "
                             "log10 lambda_1 / lambda_2 and lambda_2 / lambda_3, log10 tr(G_x) (the sum of the top-k "
                             "eigenvalues), the effective rank exp(H(lambda / sum lambda)), how far each measured KL "
                             "departs from its Fisher quadratic form (log10 KL - log10(t^2 lambda_1 / 2) for the steps "
                             "t along v_1, log10 mean KL - log10(r^2 tr(G_x) / 2D) for the isotropic probes of norm r),"
                             " and log10(lambda_1 d^2) for the margin's linearised distance d",
    "spectral+noise+fine": "spectral+noise+ratios, plus the Fisher geometry of the image's own fine-scale direction "
                           "u = (blur(x) - x) / ||blur(x) - x|| (blur: 3x3 box mean): the Rayleigh quotient "
                           "log10 u^T G_x u, the share of u in the top-3 eigenvectors, and, after steps of "
                           f"t in {FINE_STEPS} along u, log10 KL, its departure from the quadratic form "
                           "(log10 KL - log10(t^2 u^T G_x u / 2)) and whether the prediction changes; the direction's "
                           "length is left out, so the features do not tell noisy images by their noise energy",
    "spectral+noise+fine+squeeze": "spectral+noise+fine, plus the same Fisher geometry along the image's own "
                                   "squeezing directions w_l = (s_l(x) - x) / ||s_l(x) - x||, s_l the 1-bit squeezing "
                                   "of Xu et al. 2018 at level l (pixels >= l to 1, the rest to 0; it suits digit-like "
                                   f"images) for l in {SQUEEZE_LEVELS}: log10 w^T G_x w, the share of w in the top-3 "
                                   f"eigenvectors, and, after steps of t in {SQUEEZE_STEPS} along w, log10 KL, its "
                                   "departure from t^2 w^T G_x w / 2 and whether the prediction changes (w's length is "
                                   "left out too)",
}

SQUEEZE_SETS = ("spectral+noise+fine+squeeze",)  # the image's squeezing directions
FINE_SETS = ("spectral+noise+fine", *SQUEEZE_SETS)  # its fine-scale direction
RATIO_SETS = ("spectral+noise+ratios", *FINE_SETS)
NOISE_SETS = ("spectral+noise", *RATIO_SETS)  # isotropic probes and the margin
VECTOR_SETS = ("spectral", *NOISE_SETS)  # eigenvectors and forward probes


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
    if feature_set in VECTOR_SETS:
        names += [f"v{i + 1}_{what}" for what in ("abs_cos_x", "dark_energy", "l1") for i in range(VECTORS)]
        names += [f"step{t}_max_log10_kl" for t in KL_STEPS]
    if feature_set in NOISE_SETS:
        names += [f"noise{r}_{what}" for r in NOISE_NORMS for what in ("mean_log10_kl", "max_log10_kl",
                                                                         "min_log10_kl", "flip_share")]
        names += ["margin_logit_gap", "margin_log10_grad_norm", "margin_log10_distance"]
        names += [f"margin{c}d_{what}" for c in MARGIN_STEPS for what in ("log10_kl", "flips")]
    if feature_set in RATIO_SETS:
        names += ["log10_lambda1_over_lambda2", "log10_lambda2_over_lambda3", "log10_trace", "effective_rank"]
        names += [f"step{t}_log10_kl_over_quadratic" for t in KL_STEPS]
        names += [f"noise{r}_log10_kl_over_quadratic" for r in NOISE_NORMS]
        names += ["margin_log10_lambda1_d2"]
    if feature_set in FINE_SETS:
        names += _direction_names("fine", "fine", FINE_STEPS)
    if feature_set in SQUEEZE_SETS:
        for level in SQUEEZE_LEVELS:
            names += _direction_names(f"squeeze{level}", f"squeeze{level}_step", SQUEEZE_STEPS)
    return names


def _direction_names(head: str, step: str, steps: tuple[float, ...]) -> list[str]:
    return [f"{head}_log10_rayleigh", f"{head}_top3_share"] + [
        f"{step}{t}_{what}" for t in steps for what in ("log10_kl", "log10_kl_over_quadratic", "flips")]


def log10_kl(p: Tensor, q: Tensor) -> Tensor:
    """log10 KL(p || q) over the last axis (broadcasting), floored."""
    p, q = p.double().clamp(min=1e-300), q.double().clamp(min=1e-300)
    return (p * (p.log() - q.log())).sum(-1).clamp(min=KL_FLOOR).log10()


def _probe_probabilities(model: nn.Module, probes: Tensor) -> Tensor:
    """(N, P, K) float64 output probabilities of (N, P, ...) probe images, PROBE_CHUNK images per forward pass
    (on CPU, LeNet-5 ran 1792 probes 1.6x faster in chunks of 256 than in one call: they stay in cache), on the
    model's frozen twin where there is one (2-3x faster on CPU, see `frozen_twin`)."""
    flat = probes.flatten(0, 1)
    with torch.no_grad():
        forward = frozen_twin(model, flat)
        logits = torch.cat([forward(chunk) for chunk in flat.split(PROBE_CHUNK)])
    return torch.softmax(logits.double(), -1).view(*probes.shape[:2], -1)


def _eigenvector_shape(images: Tensor, spectrum: FisherSpectrum) -> np.ndarray:
    """|cos with the image|, energy on dark pixels and L1 norm of the top VECTORS eigenvectors."""
    n = images.shape[0]
    v = spectrum.eigenvectors[:, :VECTORS].flatten(2).to(images.dtype)  # (N, r, D), unit norm (zeros past rank)
    if v.shape[1] < VECTORS:
        v = torch.cat([v, v.new_zeros(n, VECTORS - v.shape[1], v.shape[2])], 1)
    x = images.flatten(1)
    unit = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cos = (v * unit[:, None]).sum(-1).abs()
    dark = ((v * v) * (x < DARK).to(v.dtype)[:, None]).sum(-1)
    l1 = v.abs().sum(-1)
    return torch.cat([cos, dark, l1], 1).double().cpu().numpy()


def _eigenvector_probes(images: Tensor, spectrum: FisherSpectrum) -> Tensor:
    """(N, 2 * len(KL_STEPS), ...): x + t v_1 and x - t v_1 for each step t, clipped to [0, 1]."""
    top = spectrum.eigenvectors[:, 0].to(images.dtype).reshape(images.shape)
    steps = torch.tensor([s * t for t in KL_STEPS for s in (1.0, -1.0)], dtype=images.dtype, device=images.device)
    return (images.unsqueeze(1) + steps.view(1, -1, *([1] * (images.ndim - 1))) * top.unsqueeze(1)).clamp(0, 1)


def _eigenvector_kl(p: Tensor, q: Tensor) -> np.ndarray:
    """log10 KL(p(x) || p(x +/- t v_1)), the larger side, per step: (N, len(KL_STEPS))."""
    q = q.view(q.shape[0], len(KL_STEPS), 2, -1)
    return torch.maximum(log10_kl(p[:, None], q[:, :, 0]), log10_kl(p[:, None], q[:, :, 1])).cpu().numpy()


def noise_directions(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(NOISE_DRAWS, *shape) unit-norm Gaussian directions from NOISE_SEED: the same probes on every call."""
    generator = torch.Generator().manual_seed(NOISE_SEED)
    u = torch.randn((NOISE_DRAWS, *shape), generator=generator, dtype=torch.float64)
    return (u / u.flatten(1).norm(dim=1).view(-1, *([1] * len(shape)))).to(device=device, dtype=dtype)


def _noise_probes(images: Tensor) -> Tensor:
    """(N, len(NOISE_NORMS) * NOISE_DRAWS, ...): x + r u for each norm r and fixed direction u, clipped."""
    u = noise_directions(images.shape[1:], images.dtype, images.device)
    norms = torch.tensor(NOISE_NORMS, dtype=images.dtype, device=images.device)
    directions = (norms.view(-1, *([1] * images.ndim)) * u.unsqueeze(0)).flatten(0, 1)
    return (images.unsqueeze(1) + directions.unsqueeze(0)).clamp(0, 1)


def _noise_statistics(p: Tensor, q: Tensor) -> np.ndarray:
    """Per probe norm: mean, max and min of log10 KL over the directions, and the share that change the
    prediction: (N, 4 * len(NOISE_NORMS))."""
    q = q.view(q.shape[0], len(NOISE_NORMS), NOISE_DRAWS, -1)
    kl = log10_kl(p[:, None, None], q)
    flips = (q.argmax(-1) != p.argmax(-1)[:, None, None]).double().mean(-1)
    return torch.stack([kl.mean(-1), kl.max(-1).values, kl.min(-1).values, flips], -1).flatten(1).cpu().numpy()


def _margin_probes(images: Tensor, spectrum: FisherSpectrum) -> tuple[Tensor, Tensor, Tensor]:
    """Steps of c * d toward the runner-up class, d = gap / ||grad|| the linearised distance, for c in MARGIN_STEPS:
    (probes (N, len(MARGIN_STEPS), ...) clipped to [0, 1], gradient norms (N,), distances (N,)), float64 norms."""
    gap, grad = spectrum.margin.to(images.device), spectrum.margin_gradient.to(images.dtype)
    shape = (-1, *([1] * (images.ndim - 1)))
    norm = grad.flatten(1).norm(dim=1).double().clamp(min=1e-30)
    distance = gap.clamp(min=0) / norm
    toward = -grad / norm.view(shape).to(grad.dtype)
    c = torch.tensor(MARGIN_STEPS, dtype=images.dtype, device=images.device).view(1, -1, *([1] * (images.ndim - 1)))
    step = (distance.view(shape).to(images.dtype) * toward).unsqueeze(1)
    return (images.unsqueeze(1) + c * step).clamp(0, 1), norm, distance


def _margin_features(p: Tensor, q: Tensor, gap: Tensor, norm: Tensor, distance: Tensor) -> np.ndarray:
    """The margin to the runner-up class: logit gap z_1 - z_2, log10 ||grad_x (z_1 - z_2)||, log10 of the
    linearised distance d, then log10 KL and prediction change after each step toward it (q: (N, steps, K))."""
    kl = log10_kl(p[:, None], q)
    flips = (q.argmax(-1) != p.argmax(-1)[:, None]).double()
    head = torch.stack([gap.double(), norm.log10(), distance.clamp(min=1e-30).log10()], 1)
    return torch.cat([head, torch.stack([kl, flips], -1).flatten(1)], 1).cpu().numpy()


def _ratio_features(eigenvalues: Tensor, step_kl: np.ndarray, noise: np.ndarray, distance: Tensor,
                    dim: int) -> np.ndarray:
    """Ratios of quantities the other features hold (see FEATURE_SETS["spectral+noise+ratios"]): the Fisher
    quadratic form is the local KL, so log10 KL minus its log10 measures how non-quadratic the output is there."""
    lam = eigenvalues.detach().double().cpu().clamp(min=0).numpy()
    if lam.shape[1] < 3:
        lam = np.pad(lam, ((0, 0), (0, 3 - lam.shape[1])))
    log_lam = np.log10(np.maximum(lam, EIGENVALUE_FLOOR))
    trace = np.maximum(lam.sum(1), EIGENVALUE_FLOOR)
    share = lam / trace[:, None]
    effective_rank = np.exp(-(share * np.log(np.maximum(share, 1e-300))).sum(1))
    steps = np.asarray(KL_STEPS) ** 2 / 2
    norms = np.asarray(NOISE_NORMS) ** 2 / (2 * dim)
    mean_noise_kl = noise.reshape(len(noise), len(NOISE_NORMS), -1)[:, :, 0]  # (mean, max, min, flips) per norm
    d = distance.detach().double().cpu().clamp(min=1e-30).numpy()
    return np.concatenate([
        np.stack([log_lam[:, 0] - log_lam[:, 1], log_lam[:, 1] - log_lam[:, 2], np.log10(trace), effective_rank], 1),
        step_kl - np.log10(np.maximum(steps[None] * lam[:, :1], EIGENVALUE_FLOOR)),
        mean_noise_kl - np.log10(np.maximum(norms[None] * trace[:, None], EIGENVALUE_FLOOR)),
        np.log10(np.maximum(lam[:, 0] * d * d, EIGENVALUE_FLOOR))[:, None],
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


def _direction_probes(images: Tensor, direction: Tensor, steps: tuple[float, ...]) -> Tensor:
    """(N, len(steps), ...): x + t u for each step t along the unit direction u, clipped to [0, 1]."""
    t = torch.tensor(steps, dtype=images.dtype, device=images.device).view(1, -1, *[1] * (images.ndim - 1))
    return (images.unsqueeze(1) + t * direction.unsqueeze(1)).clamp(0, 1)


def _direction_features(p: Tensor, q: Tensor, direction: Tensor, spectrum: FisherSpectrum,
                        steps: tuple[float, ...]) -> np.ndarray:
    """The Fisher geometry of a unit direction u: the Rayleigh quotient u^T G_x u from the eigenpairs, the share of
    u in the top-3 eigenvectors, then per step t log10 KL, its departure from the quadratic form t^2 u^T G_x u / 2
    and the prediction change (q: the probes' probabilities, (N, len(steps), K))."""
    v = spectrum.eigenvectors.flatten(2).double()  # (N, r, D), zeros past the rank
    projections = (v * direction.flatten(1).double().to(v.device)[:, None]).sum(-1) ** 2
    rayleigh = (spectrum.eigenvalues[:, :v.shape[1]].to(v.device) * projections).sum(-1).clamp(min=EIGENVALUE_FLOOR)
    kl = log10_kl(p[:, None], q)
    quadratic = torch.tensor(steps, dtype=torch.float64, device=kl.device) ** 2 / 2 * rayleigh[:, None].to(kl.device)
    flips = (q.argmax(-1) != p.argmax(-1)[:, None]).double()
    head = torch.stack([rayleigh.log10(), projections[:, :3].sum(-1)], 1).to(kl.device)
    per_step = torch.stack([kl, kl - quadratic.clamp(min=EIGENVALUE_FLOOR).log10(), flips], -1).flatten(1)
    return torch.cat([head, per_step], 1).cpu().numpy()


def fisher_features(model: nn.Module, images: Tensor, feature_set: str = "plain", k: int = DEFAULT_K) -> FisherFeatures:
    """Features of one batch: ONE exact spectrum call (for the `spectral+noise` sets with the margin's gradient from
    the same forward pass), then one round of forward-only probe passes."""
    check_feature_set(feature_set)
    vectors = feature_set in VECTOR_SETS
    noise = feature_set in NOISE_SETS
    spectrum = fisher_spectrum(model, images, k=k, method="exact", return_vectors=vectors, return_margin=noise)
    base = log_eigenvalues(spectrum.eigenvalues)
    parts = [base]
    if feature_set != "plain":
        parts.append(probability_features(spectrum.probabilities))
    if vectors:  # every probe of every image shares the forward passes
        images = images.to(spectrum.eigenvectors.device)
        # the image itself comes first: KL(p || q) compares outputs of the same forward implementation, so a
        # probe that changes nothing gives exactly 0, whatever rounding the probe passes have (`frozen_twin`)
        probes = [images.unsqueeze(1), _eigenvector_probes(images, spectrum)]
        if noise:
            margin_probes, norm, distance = _margin_probes(images, spectrum)
            probes += [_noise_probes(images), margin_probes]
        directions = []  # (direction, steps) of the image's own directions: fine scale, squeezing
        if feature_set in FINE_SETS:
            directions.append((fine_direction(images), FINE_STEPS))
        if feature_set in SQUEEZE_SETS:
            directions += [(squeeze_direction(images, level), SQUEEZE_STEPS) for level in SQUEEZE_LEVELS]
        probes += [_direction_probes(images, direction, steps) for direction, steps in directions]
        q = _probe_probabilities(model, torch.cat(probes, 1)).split([probe.shape[1] for probe in probes], 1)
        p = q[0][:, 0]
        step_kl = _eigenvector_kl(p, q[1])
        parts += [_eigenvector_shape(images, spectrum), step_kl]
        if noise:
            noise_stats = _noise_statistics(p, q[2])
            parts += [noise_stats, _margin_features(p, q[3], spectrum.margin, norm, distance)]
        if feature_set in RATIO_SETS:
            parts.append(_ratio_features(spectrum.eigenvalues, step_kl, noise_stats, distance, images[0].numel()))
        parts += [_direction_features(p, q_dir, direction, spectrum, steps)
                  for (direction, steps), q_dir in zip(directions, q[4:], strict=True)]
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
