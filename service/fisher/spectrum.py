"""`fisher_spectrum`: one entry point over the four routes to the spectrum of G_x."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from service.fisher.checks import check_k, num_classes_of, prepare_inputs
from service.fisher.gram import DEFAULT_MEMORY_BUDGET, factor_rows, gram_eigenpairs, images_per_chunk
from service.fisher.lanczos import fisher_matvec, lanczos_eigenpairs
from service.fisher.power import power_iteration_top
from service.fisher.result import FisherSpectrum

Method = Literal["auto", "exact", "lanczos", "truncated", "power", "power-alias"]
METHODS: tuple[str, ...] = ("auto", "exact", "lanczos", "truncated", "power", "power-alias")
EXACT_MAX_CLASSES = 100  # `auto` uses the exact Gram route up to this many classes, Lanczos above


def choose_method(num_classes: int) -> str:
    """`auto`: the exact Gram route costs K backward passes; above EXACT_MAX_CLASSES Lanczos is cheaper for top-k."""
    return "exact" if num_classes <= EXACT_MAX_CLASSES else "lanczos"


def fisher_spectrum(
    model: nn.Module,
    images: Tensor,
    k: int = 10,
    method: Method = "auto",
    *,
    return_vectors: bool = False,
    return_margin: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    class_chunk: int | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
    mass: float = 0.999,
    max_classes: int | None = None,
    num_samples: int | None = None,
    seed: int = 0,
) -> FisherSpectrum:
    """Top-k eigenvalues (and optionally unit eigenvectors) of G_x = J^T (diag(p) - p p^T) J per image.

    model: a classifier in eval mode mapping pixel-space images (N, *S) to logits (N, K); the images follow
    the model's device and dtype. method: "exact" (Gram route), "lanczos" (matrix-free, tolerance `tol`,
    iteration cap `max_iter`), "truncated" (Gram route over the most probable classes covering `mass` of the
    probability, at most `max_classes`), "power" / "power-alias" (the paper's Algorithm 1, top-1 only), or
    "auto". `memory_budget` bounds the Jacobian block held at once (bytes); `class_chunk` > 1 vmaps that
    many backward passes together (default: one after another, which measured fastest on CPU).
    `return_margin` (Gram routes only) also returns the gap between the top two logits and its gradient, from
    the same forward pass: one more backward product (the detector's margin features use them).
    """
    k = check_k(k)
    if method not in METHODS:
        raise ValueError(f"method: must be one of {', '.join(METHODS)}; got {method!r}")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass: must lie in (0, 1], got {mass!r}")
    x = prepare_inputs(model, images)
    num_classes = num_classes_of(model, x)
    if method == "auto":
        method = choose_method(num_classes)
    if return_margin and method not in ("exact", "truncated"):
        raise ValueError(f"return_margin: only the Gram routes (exact, truncated) return it, not {method!r}")
    generator = torch.Generator().manual_seed(seed)
    if method in ("power", "power-alias"):
        if k != 1:
            raise ValueError("k: the paper's Algorithm 1 ('power', 'power-alias') computes only the top eigenpair; "
                             "use k=1")
        return _power(model, x, method, return_vectors, tol, max_iter or 50, num_samples, generator)
    dim = x[0].numel()
    rows = num_classes
    if method == "truncated":
        rows = min(max_classes or num_classes, num_classes)
    chunk = images_per_chunk(rows, dim, x.element_size(), memory_budget)
    parts = []
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk]
        if method == "lanczos":
            parts.append(_lanczos(model, xc, k, return_vectors, tol, max_iter, generator))
        else:
            parts.append(_gram(model, xc, k, return_vectors, method, mass, max_classes, class_chunk, num_classes,
                               return_margin))
    return _concat(parts, method, x.shape[1:])


def _pad(evals: Tensor, k: int) -> Tensor:
    """Pad to k columns with exact zeros (eigenvalues beyond the rank of G_x)."""
    if evals.shape[1] >= k:
        return evals[:, :k]
    return torch.cat([evals, evals.new_zeros(evals.shape[0], k - evals.shape[1])], 1)


def _gram(model, x, k, return_vectors, method, mass, max_classes, class_chunk, num_classes, margin) -> dict:
    if method == "exact":
        mass, max_classes = 1.0, None
    rows, probs, discarded, gap = factor_rows(model, x, mass=mass, max_classes=max_classes, class_chunk=class_chunk,
                                              num_classes=num_classes, margin=margin)
    # all K classes give K-1 rows: G_x has rank <= K - 1, the eigenvalues from K-1 on are exact zeros (padded)
    evals, vectors, bound = gram_eigenpairs(rows, min(k, rows.shape[1]), return_vectors)
    return dict(
        evals=_pad(evals, k), vectors=vectors, probs=probs, bound=bound, discarded=discarded,
        iters=torch.zeros(x.shape[0], dtype=torch.long, device=x.device),
        margin=None if gap is None else gap[0], margin_gradient=None if gap is None else gap[1],
    )


def _lanczos(model, x, k, return_vectors, tol, max_iter, generator) -> dict:
    logits, probs, matvec = fisher_matvec(model, x)
    num_classes = logits.shape[-1]
    dim = x[0].numel()
    evals, vectors, resid, iters = lanczos_eigenpairs(
        matvec, x.shape[0], dim, min(k, num_classes - 1), num_classes + 1, tol=tol,
        max_iter=max_iter or max(3 * k + 20, 60), dtype=x.dtype, device=x.device, generator=generator,
        return_vectors=return_vectors,
    )
    return dict(
        evals=_pad(evals, k), vectors=vectors, probs=probs.double(), bound=resid,
        discarded=torch.zeros(x.shape[0], dtype=torch.float64, device=x.device), iters=iters, kept=num_classes,
    )


def _power(model, x, method, return_vectors, tol, max_iter, num_samples, generator) -> FisherSpectrum:
    sampling = "alias" if method == "power-alias" else "full"
    lams, etas, probs, iters, changes = [], [], [], [], []
    for i in range(x.shape[0]):
        lam, eta, p, steps, change = power_iteration_top(
            model, x[i : i + 1], sampling=sampling, max_iter=max_iter, tol=tol, num_samples=num_samples,
            generator=generator,
        )
        lams.append(lam)
        etas.append(eta)
        probs.append(p)
        iters.append(steps)
        changes.append(change)
    probs_t = torch.stack(probs)
    evals = torch.tensor(lams, dtype=torch.float64).unsqueeze(1).to(x.device)
    return FisherSpectrum(
        eigenvalues=evals,
        eigenvectors=torch.stack(etas).reshape(x.shape[0], 1, *x.shape[1:]) if return_vectors else None,
        probabilities=probs_t,
        predictions=probs_t.argmax(-1),
        method=method,
        error_bound=evals.squeeze(1) * torch.tensor(changes, dtype=torch.float64, device=x.device),
        discarded_mass=torch.zeros(x.shape[0], dtype=torch.float64, device=x.device),
        iterations=torch.tensor(iters, device=x.device),
        notes=["error_bound is an estimate: lambda * ||eta_t - eta_(t-1)|| at the last step of the power iteration"],
    )


def _concat(parts: list[dict], method: str, image_shape: torch.Size) -> FisherSpectrum:
    cat = lambda key: torch.cat([p[key] for p in parts])  # noqa: E731
    vectors = None
    if parts[0]["vectors"] is not None:
        width = min(p["vectors"].shape[1] for p in parts)
        vectors = torch.cat([p["vectors"][:, :width] for p in parts])
        vectors = vectors.reshape(vectors.shape[0], width, *image_shape)
    probs = cat("probs")
    margin = parts[0].get("margin") is not None
    notes = ["eigenvalues beyond index K-2 are exact zeros: G_x has rank at most K-1"]
    if method == "exact":
        notes.append("error_bound: float rounding bound of the Gram route")
    elif method == "lanczos":
        notes.append("error_bound: largest Lanczos residual |beta_m s_mj| of the returned Ritz pairs plus float "
                     "rounding; inf where the iteration was not converged at max_iter")
    else:
        notes.append("error_bound: float rounding of the Gram route over the kept classes; see discarded_mass")
    return FisherSpectrum(
        eigenvalues=cat("evals"), eigenvectors=vectors, probabilities=probs, predictions=probs.argmax(-1),
        method=method, error_bound=cat("bound"), discarded_mass=cat("discarded"), iterations=cat("iters"),
        notes=notes, margin=cat("margin") if margin else None,
        margin_gradient=cat("margin_gradient") if margin else None,
    )
