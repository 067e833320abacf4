"""The matrix-free route: batched Lanczos on v -> G_x v = J^T (A (J v)), one jvp and one vjp per product.

For large K (ImageNet: K = 1000) when only the top-k eigenpairs are wanted. Each image has its own Krylov
space; all images of a chunk advance together. Full reorthogonalisation keeps the basis orthonormal; the
Krylov space of G_x has dimension <= K - 1, so the iteration is exact once it reaches that size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp


def fisher_matvec(model: nn.Module, x: Tensor):
    """Return (logits, probs, matvec) where matvec(V) = G_x V for V of shape (B, D), batched over images."""
    logits, vjp_fn = vjp(model, x)
    logits = logits.detach()
    probs = torch.softmax(logits.double(), dim=-1).to(logits.dtype)

    def matvec(v: Tensor) -> Tensor:
        _, jv = jvp(model, (x,), (v.reshape(x.shape),))
        a_jv = probs * jv - probs * (probs * jv).sum(-1, keepdim=True)
        (gv,) = vjp_fn(a_jv)
        return gv.reshape(v.shape)

    return logits, probs, matvec


def lanczos_eigenpairs(
    matvec,
    batch: int,
    dim: int,
    k: int,
    rank: int,
    *,
    tol: float,
    max_iter: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    return_vectors: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Top-k Ritz pairs of the symmetric PSD operator `matvec`, batched.

    Stops when every image's top-k residuals |beta_m s_mj| are <= tol * lambda_1, when the Krylov space
    reaches `rank` steps (K + 1 covers the whole Krylov space of G_x in float32: exact then), or after
    `max_iter` steps. Returns (eigenvalues (B, r) float64 descending,
    eigenvectors (B, r, D) or None, error bound (B,): the largest residual plus the rounding of the
    products in `dtype`, inf where the iteration stopped at `max_iter` unconverged, iterations (B,)).
    """
    steps_cap = max(1, min(max_iter, rank, dim))
    q = torch.randn(batch, dim, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    q = q / q.norm(dim=-1, keepdim=True)
    basis = [q]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    active = torch.ones(batch, dtype=torch.bool, device=device)
    iters = torch.zeros(batch, dtype=torch.long, device=device)
    evals = evecs_t = None
    for step in range(steps_cap):
        w = matvec(basis[-1])
        alpha = (w * basis[-1]).sum(-1)
        q_stack = torch.stack(basis, 1)  # (B, j, D)
        # full reorthogonalisation, twice for stability
        for _ in range(2):
            w = w - torch.einsum("bj,bjd->bd", torch.einsum("bjd,bd->bj", q_stack, w), q_stack)
        beta = w.norm(dim=-1)
        alphas.append(alpha.double())
        betas.append(beta.double())
        iters += active.long()
        t = torch.diag_embed(torch.stack(alphas, -1))
        if step > 0:
            off = torch.stack(betas[:-1], -1)
            t = t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        evals, evecs_t = torch.linalg.eigh(t)
        evals, evecs_t = evals.flip(-1), evecs_t.flip(-1)
        r = min(k, step + 1)
        resid = (beta.double().unsqueeze(-1) * evecs_t[:, -1, :r].abs()).amax(-1)
        scale = evals[:, 0].abs().clamp(min=torch.finfo(torch.float64).tiny)
        breakdown = beta <= torch.finfo(dtype).eps * scale.to(dtype) * 10
        converged = (resid <= tol * scale) & (step + 1 >= min(k, steps_cap)) | breakdown
        active = active & ~converged
        if not bool(active.any()) or step + 1 == steps_cap:
            break
        unit = w / beta.clamp(min=torch.finfo(dtype).tiny).unsqueeze(-1)
        nxt = torch.where(breakdown.unsqueeze(-1), torch.zeros_like(w), unit)
        basis.append(nxt)
    r = min(k, len(alphas))
    ritz = evals[:, :r].clamp(min=0)
    resid_all = (betas[-1].unsqueeze(-1) * evecs_t[:, -1, :r].abs()).amax(-1)
    # the residual bounds the Krylov error only; the products G v themselves are rounded in `dtype`
    rounding = evals[:, 0].abs() * torch.finfo(dtype).eps * (4 * len(alphas) + dim**0.5)
    bound = resid_all + rounding
    # a small residual says a Ritz value is near *some* eigenvalue; only a converged run (or one that spanned
    # the whole Krylov space, dimension <= K = rank - 1) makes that the k-th largest: no bound otherwise
    if len(alphas) < rank - 1:
        bound = torch.where(active, torch.full_like(bound, float("inf")), bound)
    vectors = None
    if return_vectors:
        q_stack = torch.stack(basis[: len(alphas)], 1)
        vectors = torch.einsum("bjr,bjd->brd", evecs_t[:, :, :r].to(dtype), q_stack)
        vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)
    return ritz, vectors, bound, iters
