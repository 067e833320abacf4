"""Dense float64 references for G_x, for tests and small inputs: the full Jacobian, built explicitly."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import jacrev


def dense_fisher(model: nn.Module, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """G_x = J^T (diag(p) - p p^T) J in float64 for one image (*S). Returns (G (D, D), J (K, D), p (K,)).

    Computed on the image's device, with a float64 copy of the model moved there (a CPU image of a GPU model
    gives a CPU reference)."""
    model64 = copy.deepcopy(model).to(device=image.device, dtype=torch.float64).eval()
    x = image.detach().double().unsqueeze(0)
    jac = jacrev(lambda t: model64(t)[0])(x).reshape(-1, x[0].numel())
    with torch.no_grad():
        p = torch.softmax(model64(x)[0], dim=-1)
    a = torch.diag(p) - torch.outer(p, p)
    return jac.T @ a @ jac, jac, p


def fisher_by_class_sum(jac: Tensor, p: Tensor) -> Tensor:
    """The paper's equation (4): G_x = sum_i p_i g_i g_i^T with g_i = grad_x(-log p_i) = -J^T (e_i - p)."""
    eye = torch.eye(p.shape[0], dtype=jac.dtype, device=jac.device)
    grads = -(eye - p.unsqueeze(0)) @ jac  # (K, D): row i is g_i
    return (grads.T * p) @ grads


def dense_spectrum(g: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues descending and the matching eigenvectors (columns) of a symmetric matrix."""
    evals, evecs = torch.linalg.eigh(g)
    return evals.flip(0), evecs.flip(1)
