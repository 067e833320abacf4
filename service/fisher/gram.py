"""The exact route: G_x's spectrum from the small Gram matrix of the Jacobian, batched with torch.func.

With A = diag(p) - p p^T = S S^T, G_x = J^T A J = (S^T J)^T (S^T J). The non-zero eigenvalues of G_x are
those of the K x K matrix M = (S^T J)(S^T J)^T, and G_x's eigenvectors are (S^T J)^T u / sqrt(lambda).
The rows of S^T J are vector-Jacobian products with the columns of S as cotangents, so K backward passes
(vmapped) give them for a whole batch at once: in eval mode images do not interact.

The same code serves the truncated route: restricted to a class subset M, A_M = diag(q) - q q^T (q the
probabilities of the kept classes, summing to sigma <= 1) has the square root
S_M = diag(sqrt q) - alpha q sqrt(q)^T with alpha = (1 - sqrt(1 - sigma)) / sigma.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes for the Jacobian block of one chunk of images


def sqrt_fisher_factor(q: Tensor) -> Tensor:
    """S with S S^T = diag(q) - q q^T for probabilities q (B, m) of total mass <= 1; returns (B, m, m)."""
    sigma = q.sum(-1, keepdim=True).clamp(max=1.0)
    alpha = torch.where(sigma > 0, (1 - torch.sqrt((1 - sigma).clamp(min=0))) / sigma.clamp(min=1e-300), 0)
    sq = q.sqrt()
    return torch.diag_embed(sq) - alpha.unsqueeze(-1) * q.unsqueeze(-1) * sq.unsqueeze(-2)


def images_per_chunk(rows: int, dim: int, itemsize: int, memory_budget: int) -> int:
    """How many images fit in `memory_budget` bytes when each needs a (rows x dim) Jacobian block (x3 slack)."""
    return max(1, memory_budget // max(1, 3 * rows * dim * itemsize))


def factor_rows(model: nn.Module, x: Tensor, classes: Tensor | None, class_chunk: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of S^T J for a chunk of images.

    x: (B, *S). classes: (B, m) indices of kept classes, or None for all K.
    Returns (rows (B, m, D), logits (B, K), probabilities (B, K) in float64).
    """
    logits, vjp_fn = vjp(model, x)
    probs = torch.softmax(logits.detach().double(), dim=-1)
    b, num_classes = probs.shape
    q = probs if classes is None else probs.gather(1, classes)
    s = sqrt_fisher_factor(q)  # (B, m, m): row i of S^T J uses column i of S as cotangent
    if classes is None:
        cot = s.permute(2, 0, 1)  # (m, B, K)
    else:
        m = classes.shape[1]
        cot = torch.zeros(m, b, num_classes, dtype=s.dtype, device=s.device)
        cot.scatter_(2, classes.unsqueeze(0).expand(m, b, m), s.permute(2, 0, 1))
    (rows,) = vmap(vjp_fn, chunk_size=class_chunk)(cot.to(logits.dtype))  # (m, B, *S)
    rows = rows.reshape(rows.shape[0], b, -1).transpose(0, 1)
    return rows, logits.detach(), probs


def gram_eigenpairs(rows: Tensor, k: int, return_vectors: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """Top-k eigenpairs of G = rows^T rows from the m x m Gram matrix.

    Returns eigenvalues (B, min(k, m)) float64 descending, eigenvectors (B, min(k, m), D) or None, and the
    absolute rounding bound per image. Eigenvalues are clamped at zero; the vectors of eigenvalues under the
    rounding bound are returned as zeros: they carry no direction.
    """
    gram = torch.bmm(rows, rows.transpose(1, 2)).double()
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    m = gram.shape[-1]
    eps = torch.finfo(rows.dtype).eps
    bound = evals[:, :1].clamp(min=0) * eps * (4 * m + math.sqrt(rows.shape[-1]))
    r = min(k, m)
    evals = evals[:, :r].clamp(min=0)
    zero = evals <= bound
    vectors = None
    if return_vectors:
        u = evecs[:, :, :r].to(rows.dtype)
        vectors = torch.bmm(u.transpose(1, 2), rows)  # (B, r, D)
        norms = vectors.norm(dim=-1, keepdim=True)
        vectors = torch.where(zero.unsqueeze(-1), torch.zeros_like(vectors), vectors / norms.clamp(min=torch.finfo(rows.dtype).tiny))
    return evals, vectors, bound.squeeze(-1)
