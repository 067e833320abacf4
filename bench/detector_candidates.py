"""Candidate detector features on one attack's validation rows: out-of-fold AUC of `spectral+noise+fine` alone
and with each candidate added, and of the shipped `spectral+noise+fine+squeeze` set. The evidence behind the
choice of the squeezing direction (docs/decisions/detector-feature-set.md, on OTCM, the attack where the
earlier sets fell short).

The detection set is built on the validation split for this attack alone (`build_detection_set`, seed 0), so its
rows differ slightly from `evaluate`'s (there each attack's seeds depend on its place in the attack list).
Scores: 5-fold out-of-fold RF scores grouped by source image, as `evaluate` chooses feature sets. Candidates:

- `blur-kl`: log10 KL(p(x) || p(blur(x))) and whether the prediction changes, blur the 3x3 box mean of
  `fine_direction` (the shipped set steps 1 and 2 along that direction; this goes the whole way);
- `blur-spectrum`: log10 of the eigenvalues of G at blur(x), and their top one minus x's;
- `tempered`: log10 of the eigenvalues of the Fisher information of the tempered model softmax(z / T) at T = 3
  and 10, G_T = J^T (diag(p_T) - p_T p_T^T) J / T^2 (the paper's G_x is T = 1, whose eigenvalues vanish on
  confident images), and of J J^T itself; all from the Gram matrix J J^T of the logits' Jacobian;
- `binarize-kl`: the same as blur-kl for x >= 0.5, Xu et al.'s bit-depth squeezing: the output's change, a
  different detector, measured for scale;
- the shipped set: the Fisher geometry along the unit directions to the 1-bit squeezings at levels 0.3, 0.5 and
  0.7 (Rayleigh quotient, share in the top eigenvectors, KL at fixed steps), the fine set's features for three
  more directions.

    .venv/bin/python bench/detector_candidates.py                 # OTCM, LeNet-5: ~5 minutes on 2 cores
    .venv/bin/python bench/detector_candidates.py --attack fgm
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.data.mnist import load_mnist  # noqa: E402
from service.detect.dataset import DEFAULT_ATTACKS, MNIST_EPSILONS, build_detection_set  # noqa: E402
from service.detect.detector import auc_score, out_of_fold_scores  # noqa: E402
from service.detect.features import (  # noqa: E402
    EIGENVALUE_FLOOR,
    SHIPPED_FEATURE_SET,
    batched_features,
    box_blur,
    log10_kl,
)
from service.fisher import fisher_spectrum  # noqa: E402
from service.zoo.registry import load_model  # noqa: E402

CHUNK = 256
BASE_FEATURE_SET = "spectral+noise+fine"  # the shipped set before the squeezing direction


def probabilities(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.softmax(torch.cat([model(c) for c in images.split(CHUNK)]).double(), -1)


def output_change(model: nn.Module, images: Tensor, squeezed: Tensor) -> np.ndarray:
    """(N, 2): log10 KL(p(x) || p(squeezed x)) and whether the prediction changes."""
    p, q = probabilities(model, images), probabilities(model, squeezed)
    return torch.stack([log10_kl(p, q), (p.argmax(-1) != q.argmax(-1)).double()], 1).numpy()


def log_spectrum(model: nn.Module, images: Tensor) -> np.ndarray:
    parts = [fisher_spectrum(model, c, k=20, method="exact").eigenvalues.double() for c in images.split(CHUNK)]
    return np.log10(np.maximum(torch.cat(parts).numpy(), EIGENVALUE_FLOOR))


def tempered_spectra(model: nn.Module, images: Tensor, temperatures: tuple[float, ...] = (3.0, 10.0)) -> np.ndarray:
    """(N, 9 per temperature + K): log10 eigenvalues of G_T for each T, then of J J^T (float64 Jacobians)."""
    from torch.func import jacrev, vmap

    model64 = copy.deepcopy(model).double()
    grams, logits = [], []
    for chunk in images.double().split(CHUNK):
        jac = vmap(jacrev(lambda image: model64(image[None])[0]))(chunk).flatten(2)  # (B, K, D)
        grams.append(jac @ jac.transpose(1, 2))
        with torch.no_grad():
            logits.append(model64(chunk))
    gram, z = torch.cat(grams), torch.cat(logits)
    parts = []
    for t in temperatures:  # eigenvalues of A^1/2 (J J^T) A^1/2 / T^2 are G_T's non-zero ones
        p = torch.softmax(z / t, -1)
        values, vectors = torch.linalg.eigh(torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
        root = vectors @ torch.diag_embed(values.clamp(min=0).sqrt()) @ vectors.transpose(1, 2)
        parts.append(torch.linalg.eigvalsh(root @ gram @ root / t**2).flip(-1)[:, : z.shape[1] - 1])
    parts.append(torch.linalg.eigvalsh(gram).flip(-1))
    return np.log10(np.maximum(torch.cat(parts, 1).numpy(), EIGENVALUE_FLOOR))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attack", default="otcm", choices=DEFAULT_ATTACKS)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(ROOT / "models" / f"{args.model}.json", device="cpu").module
    images, labels = load_mnist("val")
    data = build_detection_set(model, images, labels, (args.attack,), MNIST_EPSILONS, seed=0)
    x, y, groups = data.images, data.is_adversarial, data.source
    base = batched_features(model, x, BASE_FEATURE_SET)
    blur_spectrum = log_spectrum(model, box_blur(x))
    candidates = {
        "blur-kl": output_change(model, x, box_blur(x)),
        "blur-spectrum": np.hstack([blur_spectrum, blur_spectrum[:, :1] - base[:, :1]]),
        "tempered (T = 3, 10) and J J^T spectra": tempered_spectra(model, x),
        "binarize-kl (feature squeezing's output change)": output_change(model, x, (x >= 0.5).to(x.dtype)),
    }
    rows = [f"`{BASE_FEATURE_SET}` alone"] + [f"+ {name}" for name in candidates]
    rows.append(f"`{SHIPPED_FEATURE_SET}` (shipped: + Fisher geometry along the squeezing directions)")
    matrices = [base] + [np.hstack([base, extra]) for extra in candidates.values()]
    matrices.append(batched_features(model, x, SHIPPED_FEATURE_SET))
    counts = data.counts()[args.attack]
    print(f"# Candidate features, {args.attack}, {args.model}, validation rows: {counts}\n")
    print("| features | out-of-fold AUC % |\n|---|---|")
    for name, features in zip(rows, matrices, strict=True):
        print(f"| {name} | {100 * auc_score(y, out_of_fold_scores(features, y, groups)):.2f} |")
    print(f"\n{time.perf_counter() - start:.0f} s; command: python bench/detector_candidates.py "
          + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
