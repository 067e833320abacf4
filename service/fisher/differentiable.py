"""The exact route with its autograd graph: G_x's spectrum as a differentiable function of the image.

For attacks that differentiate through the Fisher quantities a detector reads (service.evaluate's adaptive
attacks). The same algebra as the exact route (service.fisher.gram): rows F^T J with F F^T = A from K-1
backward passes, then the K-1 x K-1 Gram matrix's eigenpairs; here the passes keep their graph
(create_graph) and the factor F keeps its dependence on p(x), so the eigenvalues, eigenvectors and the
margin's gradient can be differentiated again. It costs about three times the plain route, and eigenvector
gradients are undefined where eigenvalues repeat (callers clean non-finite gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from service.fisher.checks import check_k, num_classes_of, prepare_inputs
from service.fisher.gram import gram_eigenpairs, margin_cotangents, reduced_fisher_factor
from service.fisher.result import FisherSpectrum


def differentiable_spectrum(model: nn.Module, images: Tensor, k: int = 10, *, return_vectors: bool = False,
                            return_margin: bool = False) -> FisherSpectrum:
    """`fisher_spectrum(model, images, k, "exact", ...)` with every returned tensor differentiable in `images`."""
    k = check_k(k)
    x = prepare_inputs(model, images)
    num_classes = num_classes_of(model, x.detach())
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        logits = model(x)
        probs = torch.softmax(logits.double(), dim=-1)
        factor = reduced_fisher_factor(probs).to(logits.dtype)  # (B, K, K-1), a function of x through p
        rows = torch.stack([torch.autograd.grad(logits, x, factor[..., j], create_graph=True)[0].flatten(1)
                            for j in range(num_classes - 1)], 1)  # (B, K-1, D)
        evals, vectors, bound = gram_eigenpairs(rows, min(k, num_classes - 1), return_vectors)
        margin = margin_gradient = None
        if return_margin:
            cotangent, _ = margin_cotangents(logits)
            margin = (logits * cotangent).sum(-1).double()
            margin_gradient = torch.autograd.grad(logits, x, cotangent, create_graph=True)[0]
    if evals.shape[1] < k:
        evals = torch.cat([evals, evals.new_zeros(evals.shape[0], k - evals.shape[1])], 1)
    b = x.shape[0]
    return FisherSpectrum(
        eigenvalues=evals, eigenvectors=None if vectors is None else vectors.reshape(b, -1, *x.shape[1:]),
        probabilities=probs, predictions=probs.argmax(-1).detach(), method="exact", error_bound=bound.detach(),
        discarded_mass=torch.zeros(b, dtype=torch.float64, device=x.device),
        iterations=torch.zeros(b, dtype=torch.long, device=x.device),
        notes=["differentiable exact route: eigenvalues beyond index K-2 are exact zeros"],
        margin=margin, margin_gradient=margin_gradient)
